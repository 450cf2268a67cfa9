"""BEiT (Bao et al. 2021; v2: Peng et al. 2022): predict the visual tokens of masked patches.

A frozen tokenizer (`ssl_vit.objectives.vqkd`, BEiT v2's VQ-KD, trained by this suite: no tokenizer
weights are downloaded) turns each image into one code per patch. The encoder sees the same image with
a block-wise mask (`beit_masking`: blocks of at least `min_block_patches`, aspect 0.3..1/0.3, until
`mask_ratio` of the patches) whose patch embeddings are replaced by a learned mask token
(`backbone.forward_features(x, mask=..., mask_token=...)`); a linear head over the codebook predicts the
code of every masked patch, cross-entropy on masked positions only (microsoft/unilm beit
`modeling_pretrain.py` `VisionTransformerForMaskedImageModeling`, `engine_for_pretraining.py`).

The mask token and the head live here, so the exported backbone keeps timm's keys. Layer scale (the
paper's 0.1) is the backbone's `model.args.init_values`.

Masks are drawn in the data pipeline from each sample's seed (the loader seeds torch per sample), like
SimMIM's: a resumed run and a 2-process run see the masks of an uninterrupted 1-process run. Every mask
has the same count, so the loss over a split batch averages to the whole batch's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit.accepts import Range, at_least, between, non_negative, setting
from ssl_vit.objectives import register_objective
from ssl_vit.objectives.beit_masking import blockwise_mask, num_block_masked
from ssl_vit.objectives.shared import beit_init_, masked_image_crop
from ssl_vit.objectives.vqkd import TokenizerError, VQKDTokenizer, load_tokenizer

__all__ = ["BEiT", "BEiTConfig", "BlockMaskedCrop"]

# microsoft/unilm beit: RandomResizedCropAndInterpolationWithTwoPic(scale=(0.08, 1.0), ratio=(3/4, 4/3)).
CROP_SCALE_MIN = 0.08


@dataclass
class BEiTConfig:
    """`beit.*`: the paper's ViT-B/16 values (75 of 196 patches, blocks of >= 16); small-image configs scale them."""

    # A trained tokenizer: a directory holding tokenizer.safetensors + tokenizer.json, or the file.
    tokenizer: str | None = None
    # A tokenizer-recipe YAML (recipes/configs/beit_tokenizer_*.yaml): when `tokenizer` is unset or holds
    # none yet, recipes/beit_pretrain.py first trains one there (default <output_dir>/tokenizer).
    train_tokenizer: str | None = None
    codebook_size: int = setting(8192, at_least(2), 'codes of the tokenizer = classes of the head (must match it)')
    mask_ratio: float = setting(0.4, between(0, 1, open=True), 'fraction of patches masked (rounded; paper 75 of 196)')
    min_block_patches: int = setting(16, at_least(1), 'smallest masked block, in patches (paper 16 of 196)')
    min_aspect: float = setting(0.3, Range(0, 1, low_open=True), 'block aspect range: min_aspect .. 1 / min_aspect')
    # DataAugmentationForBEiT's ColorJitter(0.4, 0.4, 0.4) on every image, before the crop; 0: none.
    color_jitter: float = setting(0.4, non_negative(), 'brightness / contrast / saturation jitter of every view')


class BlockMaskedCrop:
    """PIL RGB image -> {"pixel_values": (3, S, S), "mask": (N,) bool}: BEiT's crop + flip and a block-wise mask.

    The mask's draws come from a `random.Random` seeded from torch's stream, which the loader seeds per
    sample. Picklable, for loader workers.
    """

    def __init__(
        self, crop: Any, *, grid_size: tuple[int, int], num_masked: int, min_block: int, min_aspect: float
    ) -> None:
        self.crop = crop  # shared.masked_image_crop
        self.grid_size, self.num_masked = tuple(grid_size), num_masked
        self.min_block, self.min_aspect = min_block, min_aspect

    def mask(self) -> torch.Tensor:
        rng = random.Random(int(torch.randint(0, 2**62, (1,)).item()))
        return blockwise_mask(self.grid_size, self.num_masked, self.min_block, rng, min_aspect=self.min_aspect)

    def __call__(self, image: Any) -> dict[str, torch.Tensor]:
        pixels = self.crop(image)
        return {"pixel_values": pixels, "mask": self.mask()}


@register_objective("beit")
class BEiT(nn.Module):
    """BEiT objective around a ViT backbone.

    Args:
        backbone: the shared `ssl_vit.models.ViT` (`num_classes=0`).
        tokenizer: a `VQKDTokenizer` (or any module mapping images (B, 3, H, W) to ids (B, N)) or a path
            `load_tokenizer` reads; frozen and kept in eval mode.
        train_tokenizer: the tokenizer YAML recipes/beit_pretrain.py trains a missing tokenizer with (read by
            the recipe; here it only improves the error message).
        codebook_size: the head's classes; must equal the tokenizer's.
        mask_ratio, min_block_patches, min_aspect: the block-wise masking.
        color_jitter: ColorJitter(c, c, c) on every image before the crop (the official 0.4).
    Batch: `pixel_values` (B, 3, H, W); `mask` (B, N) bool, True = masked (from `train_transform`; drawn
    here from torch's stream when absent).
    forward -> {"loss" (CE on masked positions), "mlm_acc" (top-1 of the masked codes), "mask_ratio"}.
    """

    needs_labels: ClassVar[bool] = False
    config_groups: ClassVar[dict[str, type]] = {"beit": BEiTConfig}

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: str | Path | nn.Module | None = None,
        train_tokenizer: str | None = None,
        codebook_size: int = 8192,
        mask_ratio: float = 0.4,
        min_block_patches: int = 16,
        min_aspect: float = 0.3,
        color_jitter: float = 0.4,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"beit.mask_ratio must be strictly between 0 and 1, got {mask_ratio}: use e.g. 0.4.")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"beit.min_aspect must be in (0, 1], got {min_aspect}: the paper uses 0.3.")
        if tokenizer is None:
            how = f" or let recipes/beit_pretrain.py train one from {train_tokenizer}" if train_tokenizer else ""
            raise TokenizerError(
                f"beit needs a tokenizer: set beit.tokenizer to the output_dir of recipes/beit_tokenizer.py{how}."
            )
        self.backbone = backbone
        self.patch_size: int = backbone.patch_embed.patch_size[0]
        self.grid: tuple[int, int] = tuple(backbone.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = num_block_masked(self.num_patches, mask_ratio)
        if min_block_patches > self.num_masked:
            raise ValueError(
                f"beit.min_block_patches={min_block_patches} is more than the {self.num_masked} patches masked of "
                f"{self.num_patches}: scale it with the grid (paper 16 of 196; e.g. 5 for an 8x8 grid)."
            )
        self.mask_ratio, self.min_block, self.min_aspect = float(mask_ratio), int(min_block_patches), float(min_aspect)
        self.color_jitter = float(color_jitter)
        self.num_prefix_tokens: int = backbone.num_prefix_tokens
        self.tokenizer = tokenizer if isinstance(tokenizer, nn.Module) else load_tokenizer(tokenizer)
        self.tokenizer.requires_grad_(False)
        self.tokenizer.eval()
        own = getattr(self.tokenizer, "codebook_size", codebook_size)
        if own != codebook_size:
            raise TokenizerError(
                f"beit.codebook_size={codebook_size} but the tokenizer has {own} codes: set beit.codebook_size={own} "
                f"(or train a tokenizer with vqkd.codebook_size={codebook_size})."
            )
        if isinstance(self.tokenizer, VQKDTokenizer):
            tok_grid = tuple(self.tokenizer.encoder.patch_embed.grid_size)
            if tok_grid != self.grid:
                raise TokenizerError(
                    f"the tokenizer gives a {tok_grid[0]}x{tok_grid[1]} grid of codes but the backbone has "
                    f"{self.grid[0]}x{self.grid[1]} patches: train the tokenizer with the same patch size and image size."
                )
        self.codebook_size = int(codebook_size)
        embed_dim = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.lm_head = nn.Linear(embed_dim, codebook_size)  # the official name
        self._init_weights()

    def _init_weights(self) -> None:
        """microsoft/unilm beit's pretraining init (`beit_init_`), the LM head's linear with the backbone's;
        the official BEiT has no distillation token, so a distilled backbone's keeps its own init."""
        beit_init_(self.backbone, self.mask_token, heads=[self.lm_head], tokens=("cls_token", "pos_embed"))

    def train(self, mode: bool = True) -> BEiT:
        """Train the encoder; the tokenizer stays frozen in eval mode."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    # -- masks ---------------------------------------------------------------------------------

    def train_transform(self, data_cfg: Any) -> BlockMaskedCrop:
        """BEiT's colour jitter + crop (scale from data.crop_scale_min, paper 0.08) + flip, and a block-wise mask
        per image."""
        side = data_cfg.image_size // self.patch_size
        return BlockMaskedCrop(
            masked_image_crop(data_cfg, CROP_SCALE_MIN, self.color_jitter),
            grid_size=(side, side),
            num_masked=num_block_masked(side * side, self.mask_ratio),
            min_block=self.min_block,
            min_aspect=self.min_aspect,
        )

    def make_masks(self, images: torch.Tensor) -> torch.Tensor:
        """Block-wise masks for a batch (B, 3, H, W) -> (B, N) bool, from torch's random stream."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        count = num_block_masked(grid[0] * grid[1], self.mask_ratio)
        masks = []
        for _ in range(images.shape[0]):
            rng = random.Random(int(torch.randint(0, 2**62, (1,)).item()))
            masks.append(blockwise_mask(grid, count, self.min_block, rng, min_aspect=self.min_aspect))
        return torch.stack(masks).to(images.device)

    # -- the model -----------------------------------------------------------------------------

    def masked_logits(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Codebook logits of the masked patches (seen as the mask token), in (sample, patch) order: (M, K)."""
        z = self.backbone.forward_features(images, mask=mask, mask_token=self.mask_token)  # (B, P + N, D)
        return self.lm_head(z[:, self.num_prefix_tokens :][mask])  # masked positions only, as the official head

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["pixel_values"]  # (B, 3, H, W)
        mask = batch.get("mask")
        mask = self.make_masks(images) if mask is None else mask.to(device=images.device, dtype=torch.bool)
        with torch.no_grad():
            ids = self.tokenizer(images)  # (B, N)
        if ids.shape != mask.shape:
            raise TokenizerError(
                f"the tokenizer gives {tuple(ids.shape)} codes for masks of shape {tuple(mask.shape)}: it must give one "
                f"code per patch of the backbone; train it at this run's data.image_size with the same patch size."
            )
        logits = self.masked_logits(images, mask).float()  # (M, K)
        targets = ids[mask]  # (M,)
        loss = F.cross_entropy(logits, targets)
        acc = (logits.detach().argmax(-1) == targets).float().mean()
        return {"loss": loss, "mlm_acc": acc, "mask_ratio": mask.float().mean().detach()}
