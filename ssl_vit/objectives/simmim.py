"""SimMIM (Xie et al. 2022): mask large random patches, encode every token, regress the raw pixels.

Masks are drawn per sample in the data pipeline, as the official code (microsoft/SimMIM
`data/data_simmim.py`): random cells of `mask_patch_size` pixels (several ViT patches each), an exact
count per sample. The encoder is the shared backbone with the masked patch embeddings replaced by a
learned mask token (`backbone.forward_features(x, mask=..., mask_token=...)`); the token and the
one-layer head (1x1 conv + pixel shuffle, the official `decoder`) live here, so the exported
backbone keeps timm's keys. Loss: L1 on the masked pixels only.

Where the masks come from: the objective's `train_transform` returns {"pixel_values", "mask"}, so a
mask is drawn from the loader's per-sample seed (run seed, epoch, position in the epoch;
`ssl_vit.engine.seeding`), like the crop of the same image. A resumed run therefore sees the same
masks, and 2 processes see the masks 1 process sees. A batch without `mask` (a user's own loader)
gets masks from torch's global random stream, which checkpoints save.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit.accepts import at_least, between, setting
from ssl_vit.objectives import register_objective
from ssl_vit.objectives.masking import cell_masks
from ssl_vit.objectives.shared import beit_init_, masked_image_crop
from ssl_vit.viz.simmim import reconstruction_grid

__all__ = ["MaskedCrop", "SimMIM", "SimMIMConfig", "norm_targets"]

# microsoft/SimMIM data/data_simmim.py: RandomResizedCrop(scale=(0.67, 1.), ratio=(3/4, 4/3)) + flip.
CROP_SCALE_MIN = 0.67


@dataclass
class SimMIMConfig:
    """`simmim.*`: the paper's ViT-B values (32-px masks, ratio 0.6); small-image configs scale the mask patch."""

    mask_patch_size: int = setting(
        32, at_least(1), 'side of a masked square in pixels: a multiple of the ViT patch that divides data.image_size'
    )
    mask_ratio: float = setting(0.6, between(0, 1, open=True), 'the fraction of mask patches masked (rounded up)')
    # "beit": the official encoder init (BEiT's N(0, 0.02) cut at +-0.02, proj / fc2 divided by sqrt(2 layer)),
    # tuned for 768-wide encoders; "timm": keep the backbone's own timm init (N(0, 0.02) cut at +-2, as a random
    # init and the supervised recipe start from), mask token N(0, 0.02).
    init: Literal["beit", "timm"] = "beit"
    norm_target_window: int = setting(
        0, at_least(0), "0: raw pixels (the paper's ViT); odd N: pixels normalised over their NxN window (official NORM_TARGET)"
    )


class MaskedCrop:
    """PIL RGB image -> {"pixel_values": (3, S, S), "mask": (N,) bool}: SimMIM's `SimMIMTransform`.

    RandomResizedCrop(scale_min-1, ratio 3/4-4/3) + flip + normalisation, and a random mask of
    `cell` x `cell`-patch squares over the (S / patch)^2 patch grid, drawn from torch's random stream
    (the loader seeds it per sample). Picklable, for loader workers.
    """

    def __init__(self, crop: Any, *, grid_size: tuple[int, int], cell: int, mask_ratio: float) -> None:
        self.crop = crop  # shared.masked_image_crop
        self.grid_size, self.cell, self.mask_ratio = tuple(grid_size), cell, mask_ratio
        cell_masks(1, self.grid_size, cell, mask_ratio)  # a grid the cells cannot tile fails here, not in a worker

    def __call__(self, image: Any) -> dict[str, torch.Tensor]:
        pixels = self.crop(image)
        mask = cell_masks(1, self.grid_size, self.cell, self.mask_ratio)[0]  # (N,)
        return {"pixel_values": pixels, "mask": mask}


def norm_targets(targets: torch.Tensor, window: int) -> torch.Tensor:
    """microsoft/SimMIM's `norm_targets` (NORM_TARGET): each pixel minus the mean of its `window` x `window`
    neighbourhood (zero padding not counted), over that neighbourhood's unbiased std. (B, C, H, W) -> same."""
    pool = {"kernel_size": window, "stride": 1, "padding": window // 2}
    mean = F.avg_pool2d(targets, count_include_pad=False, **pool)
    square_mean = F.avg_pool2d(targets**2, count_include_pad=False, **pool)
    ones = targets.new_ones(1, 1, *targets.shape[-2:])  # the count depends on the position only: one plane
    count = F.avg_pool2d(ones, count_include_pad=True, **pool) * window**2  # (1, 1, H, W): pixels inside
    var = ((square_mean - mean**2) * (count / (count - 1))).clamp(min=0.0)
    return (targets - mean) / (var + 1e-6) ** 0.5


@register_objective("simmim")
class SimMIM(nn.Module):
    """SimMIM objective around a ViT backbone.

    Args:
        backbone: the shared `ssl_vit.models.ViT` (`num_classes=0`).
        mask_patch_size: side in pixels of the masked squares (paper: 32 over 16-px patches).
        mask_ratio: fraction of the squares masked per sample, rounded up (paper: 0.6).
        init: "beit" initialises the backbone as microsoft/SimMIM's encoder; "timm" keeps the backbone's
            timm init (a run from `model.checkpoint` loads its weights afterwards either way).
        norm_target_window: 0 regresses the raw (normalised-image) pixels; an odd N regresses each pixel
            normalised by the mean / std of its N x N window (the official NORM_TARGET, `norm_targets`).
    Batch: `pixel_values` (B, 3, H, W); `mask` (B, N) bool, True = masked (from `train_transform`; drawn
    here when absent).
    """

    needs_labels: ClassVar[bool] = False
    config_groups: ClassVar[dict[str, type]] = {"simmim": SimMIMConfig}
    loss_eps: ClassVar[float] = 1e-5  # the official loss's epsilon under the masked-pixel count

    def __init__(
        self,
        backbone: nn.Module,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        init: str = "beit",
        norm_target_window: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"simmim.mask_ratio must be strictly between 0 and 1, got {mask_ratio}: use e.g. 0.6.")
        if init not in ("beit", "timm"):
            raise ValueError(f"simmim.init must be 'beit' (the paper's) or 'timm', got {init!r}.")
        if norm_target_window and norm_target_window % 2 == 0:
            raise ValueError(f"simmim.norm_target_window must be 0 (off) or odd, got {norm_target_window}: use e.g. 7.")
        self.backbone = backbone
        self.patch_size: int = backbone.patch_embed.patch_size[0]
        if mask_patch_size % self.patch_size:
            raise ValueError(
                f"simmim.mask_patch_size={mask_patch_size} is not a multiple of the ViT patch size {self.patch_size}: "
                f"use e.g. {2 * self.patch_size} (the paper masks 32-px squares over 16-px patches)."
            )
        self.mask_patch_size = int(mask_patch_size)
        self.cell = self.mask_patch_size // self.patch_size  # patches per side of a masked square
        self.mask_ratio = float(mask_ratio)
        gh, gw = backbone.patch_embed.grid_size
        if gh % self.cell or gw % self.cell:
            raise ValueError(
                f"simmim.mask_patch_size={mask_patch_size} does not divide the {gh * self.patch_size}x"
                f"{gw * self.patch_size} images into whole squares: choose a mask patch size that divides the image "
                f"size (and is a multiple of the patch size {self.patch_size})."
            )
        self.num_prefix_tokens: int = backbone.num_prefix_tokens
        self.in_chans: int = backbone.patch_embed.proj.in_channels
        embed_dim = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # The official head and its names: a linear map of each token to its patch's pixels.
        self.decoder = nn.Sequential(
            nn.Conv2d(embed_dim, self.patch_size**2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.patch_size),
        )
        self.norm_target_window = int(norm_target_window)
        self._init_weights(init)

    # -- initialisation ------------------------------------------------------------------------

    def _init_weights(self, init: str) -> None:
        """"beit": microsoft/SimMIM's encoder init (VisionTransformerForSimMIM, from BEiT): `beit_init_`,
        which also cuts the class token, learned positions and the mask token at +-0.02. "timm": the backbone
        as created, the mask token N(0, 0.02). The head keeps PyTorch's default Conv2d init, as the official
        SimMIM module leaves it."""
        if init == "beit":
            beit_init_(self.backbone, self.mask_token)
        else:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # -- masks ---------------------------------------------------------------------------------

    def train_transform(self, data_cfg: Any) -> MaskedCrop:
        """The paper's crop (scale from data.crop_scale_min, paper 0.67) + flip, and a mask per image."""
        if data_cfg.image_size % self.mask_patch_size:
            raise ValueError(
                f"data.image_size={data_cfg.image_size} is not a multiple of simmim.mask_patch_size="
                f"{self.mask_patch_size}: masks tile the image with whole squares; change either."
            )
        side = data_cfg.image_size // self.patch_size
        return MaskedCrop(
            masked_image_crop(data_cfg, CROP_SCALE_MIN),
            grid_size=(side, side),
            cell=self.cell,
            mask_ratio=self.mask_ratio,
        )

    def make_masks(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Masks for a batch of images (B, 3, H, W) -> (B, N) bool, from `generator` or torch's stream."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return cell_masks(images.shape[0], grid, self.cell, self.mask_ratio, generator=generator).to(images.device)

    def pixel_mask(self, mask: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Patch mask (B, N) -> pixel mask (B, 1, H, W) float, 1 on masked pixels."""
        p = self.patch_size
        gh, gw = image_size[0] // p, image_size[1] // p
        grid = mask.view(mask.shape[0], gh, gw)
        return grid.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()

    # -- the model -----------------------------------------------------------------------------

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode with the masked patches replaced by the mask token, predict every pixel: (B, 3, H, W)."""
        z = self.backbone.forward_features(images, mask=mask, mask_token=self.mask_token)  # (B, P + N, D)
        z = z[:, self.num_prefix_tokens :]  # (B, N, D)
        b, _, d = z.shape
        gh, gw = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        z = z.transpose(1, 2).reshape(b, d, gh, gw)  # (B, D, gh, gw)
        return self.decoder(z)  # (B, C, H, W): 1x1 conv to p*p*C channels, then pixel shuffle

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss = L1 on masked pixels (the official normalisation); also the (detached) L1 on visible ones."""
        images = batch["pixel_values"]  # (B, 3, H, W)
        mask = batch.get("mask")
        mask = self.make_masks(images) if mask is None else mask.to(device=images.device, dtype=torch.bool)
        rec = self.reconstruct(images, mask).float()  # loss in fp32 under autocast
        target = images.float()
        if self.norm_target_window:
            target = norm_targets(target, self.norm_target_window)  # (B, C, H, W), local mean 0 / std 1
        l1 = (target - rec).abs()  # (B, C, H, W)
        pix = self.pixel_mask(mask, images.shape[-2:])  # (B, 1, H, W)
        loss = (l1 * pix).sum() / (pix.sum() + self.loss_eps) / self.in_chans
        visible = 1.0 - pix
        loss_visible = (l1.detach() * visible).sum() / (visible.sum() + self.loss_eps) / self.in_chans
        return {"loss": loss, "loss_visible": loss_visible, "mask_ratio": mask.float().mean().detach()}

    # -- pictures ------------------------------------------------------------------------------

    def visualize(
        self, batch: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        """The reconstruction grid (`ssl_vit.viz.simmim`), masks from `batch['mask']` or a fixed seed."""
        grid = reconstruction_grid(self, batch["pixel_values"], mean, std, mask=batch.get("mask"))
        return {"simmim_reconstruction": grid}
