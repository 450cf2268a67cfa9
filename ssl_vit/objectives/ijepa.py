"""I-JEPA (Assran et al. 2023): predict the target encoder's features of image blocks from a context block.

Per image: 4 target blocks and one large context block with the target patches removed
(`masking.multiblock_masks`). The context encoder is the shared backbone on the context patches only
(`backbone.forward_features(x, ids_keep)`); the target encoder, an EMA copy of it, sees the whole
image; a narrow ViT predictor takes the context tokens plus mask tokens at each target block's
positions and regresses the layer-normalised target features of those blocks (smooth L1). The target
encoder is exported and evaluated. Follows facebookresearch/ijepa: `src/train.py` (forward_target,
forward_context, loss_fn, momentum_scheduler), `src/models/vision_transformer.py`
(VisionTransformerPredictor, init), `src/masks/multiblock.py` (MaskCollator).

The class token: I-JEPA's encoder has none, ours keeps the backbone's (timm's layout, so every tool
and eval reads the checkpoint as any other). It runs through both encoders like a register token;
the predictor sees the context's patch tokens only and the loss covers patch tokens only, so nothing
trains it directly. Evaluate I-JEPA checkpoints on average-pooled patch tokens (`features.pool=avg`),
as the paper does.

Masks: the masks of a step are drawn for the whole global batch (every process draws the same, from
a generator seeded by the run's seed, the step and the micro-batch, then takes its own rows), and
every context is cut to the global batch's smallest. So a resumed run draws the masks it would have
drawn, and 2 processes x batch B train as 1 process x batch 2B. (The official collator cuts within
each GPU's batch: at ViT-H's 16 x 128 that keeps ~31% of the patches as context on average, ours
~28%.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torchvision import transforms as T

from ssl_vit.accepts import Range, at_least, positive, probability, setting, span
from ssl_vit.engine.seeding import mix_seed
from ssl_vit.models import sincos_pos_embed_2d
from ssl_vit.objectives import register_objective
from ssl_vit.objectives.masking import gather_tokens, multiblock_masks
from ssl_vit.objectives.shared import copy_params_, ema_update_
from ssl_vit.ops.linear import use_onednn_linears

__all__ = ["IJEPA", "IJEPAConfig", "IJEPAPredictor", "ijepa_momentum", "ijepa_transform"]


_AREA = Range(0, 1, low_open=True)  # an area fraction of the patch grid: (0, 1]


@dataclass
class IJEPAConfig:
    """`ijepa.*`: facebookresearch/ijepa configs/in1k_vith14_ep300.yaml (../shared/PROTOCOLS.md)."""

    # The predictor: a narrow ViT (paper: 384 wide, 12 blocks for ViT-H/14). Heads None: the encoder's.
    predictor_dim: int = setting(384, at_least(4), "predictor width (a multiple of 4 and of the predictor's heads)")
    predictor_depth: int = setting(12, at_least(1), "predictor blocks")
    predictor_heads: Optional[int] = setting(None, at_least(1), "predictor heads; null: the encoder's")
    # Multi-block masking: target blocks (scale = area fraction, aspect = height / width) and the context block.
    num_targets: int = setting(4, at_least(1), "target blocks per image")
    target_scale: tuple[float, float] = setting((0.15, 0.2), span(_AREA), "area fraction range of a target block")
    target_aspect_ratio: tuple[float, float] = setting(
        (0.75, 1.5), span(positive()), "height / width range of a target block"
    )
    context_scale: tuple[float, float] = setting((0.85, 1.0), span(_AREA), "area fraction range of the context block")
    # Fewest context patches a sample may keep (official min_keep); lower it for small patch grids.
    min_context: int = setting(10, at_least(1), "fewest context patches a sample may keep")
    # EMA momentum of the target encoder: linear from `momentum` (first step) to `momentum_end` (last).
    momentum: float = setting(0.996, probability(), "the target encoder's EMA momentum at the first step")
    momentum_end: float = setting(1.0, probability(), "the EMA momentum at the last step (>= ijepa.momentum)")


def ijepa_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """The official momentum_scheduler (ipe_scale 1): start + step * (end - start) / total_steps."""
    return start + step * (end - start) / max(total_steps, 1)


def ijepa_transform(data_cfg: Any) -> Callable[..., torch.Tensor]:
    """I-JEPA's views (src/transforms.py as configured): RandomResizedCrop(scale 0.3-1) only, normalised.

    `data.crop_scale_min` (None: the paper's 0.3), `data.interpolation` and `data.hflip` apply (the
    paper: no flip; the I-JEPA configs set data.hflip=0).
    """
    low = 0.3 if data_cfg.crop_scale_min is None else data_cfg.crop_scale_min
    if not 0.0 < low <= 1.0:
        raise ValueError(f"data.crop_scale_min={low} must be in (0, 1]: the smallest crop area fraction.")
    interpolation = T.InterpolationMode(data_cfg.interpolation)
    views: list[Any] = [T.RandomResizedCrop(data_cfg.image_size, scale=(low, 1.0), interpolation=interpolation)]
    if data_cfg.hflip > 0:
        views.append(T.RandomHorizontalFlip(data_cfg.hflip))
    return T.Compose([*views, T.ToTensor(), T.Normalize(list(data_cfg.mean), list(data_cfg.std))])


def _init_vit_weights(module: nn.Module, std: float = 0.02) -> None:
    """The official init as training starts: truncated-normal linears and convs with zero biases, unit LayerNorms.

    The official constructors also divide each block's attn.proj and mlp.fc2 by sqrt(2 * layer)
    (fix_init_weight), but src/helper.py's init_model then redraws every Linear and LayerNorm, which undoes
    it: the encoder and predictor train from the plain init.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class IJEPAPredictor(nn.Module):
    """The predictor (VisionTransformerPredictor): context tokens + mask tokens at target positions -> target features.

    Names follow the official module (predictor_embed, mask_token, predictor_pos_embed, predictor_blocks,
    predictor_norm, predictor_proj); positions are fixed 2-D sin-cos over the patch grid (no prefix).
    """

    def __init__(
        self, embed_dim: int, grid_size: tuple[int, int], dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.predictor_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("predictor_pos_embed", sincos_pos_embed_2d(dim, grid_size))  # (1, N, Dp)
        self.predictor_blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        for block in self.predictor_blocks:
            block.attn.fused_attn = True  # F.scaled_dot_product_attention, like the backbone
        self.predictor_norm = norm_layer(dim)
        self.predictor_proj = nn.Linear(dim, embed_dim)
        _init_vit_weights(self)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, context_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Predict each target block's features.

        Args: context (B, Kc, D) context-encoder patch tokens; context_ids (B, Kc); target_ids (B, T, Kt).
        Returns: (T * B, Kt, D), block-major (block 0 of every sample, then block 1, ...) as the official apply_masks.
        """
        b, t, kt = target_ids.shape
        pos = self.predictor_pos_embed.expand(b, -1, -1)  # (B, N, Dp)
        x = self.predictor_embed(context) + gather_tokens(pos, context_ids)  # (B, Kc, Dp)
        target_pos = gather_tokens(pos, target_ids.reshape(b, t * kt)).view(b, t, kt, -1)  # (B, T, Kt, Dp)
        target_pos = target_pos.transpose(0, 1).reshape(t * b, kt, -1)  # (T * B, Kt, Dp)
        queries = (self.mask_token + target_pos).to(x.dtype)  # (T * B, Kt, Dp)
        x = torch.cat([x.repeat(t, 1, 1), queries], dim=1)  # (T * B, Kc + Kt, Dp)
        x = self.predictor_norm(self.predictor_blocks(x))
        return self.predictor_proj(x[:, -kt:])  # (T * B, Kt, D): the mask tokens' outputs


@register_objective("ijepa")
class IJEPA(nn.Module):
    """I-JEPA objective around a ViT backbone.

    Args:
        backbone: the shared `ssl_vit.models.ViT` (fixed sin-cos positions by default, as the paper).
        predictor_dim / predictor_depth / predictor_heads: the predictor's width, blocks and heads
            (heads None: the backbone's, as the official code).
        num_targets, target_scale, target_aspect_ratio, context_scale, min_context: the masks
            (`masking.multiblock_masks`).
        momentum / momentum_end: EMA momentum of the target encoder, linear over the run.
    The backbone is initialised as the official code does, and the target encoder starts as its copy
    (again at step 0, so a `model.checkpoint` loaded after construction reaches it too).
    Batch: `pixel_values` (B, 3, H, W); optional `context_ids` (B, Kc) and `target_ids` (B, T, Kt)
    patch indices to use instead of fresh masks.
    """

    needs_labels: ClassVar[bool] = False
    config_groups: ClassVar[dict[str, type]] = {"ijepa": IJEPAConfig}
    # Unless model.pos_embed says otherwise: the official encoder's fixed 2-D sin-cos positions.
    backbone_defaults: ClassVar[dict[str, object]] = {"pos_embed": "sincos"}

    def __init__(
        self,
        backbone: nn.Module,
        predictor_dim: int = 384,
        predictor_depth: int = 12,
        predictor_heads: Optional[int] = None,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        min_context: int = 10,
        momentum: float = 0.996,
        momentum_end: float = 1.0,
    ) -> None:
        super().__init__()
        heads = predictor_heads or backbone.blocks[0].attn.num_heads
        if predictor_dim % heads or predictor_dim % 4:
            raise ValueError(
                f"ijepa.predictor_dim ({predictor_dim}) must be a multiple of 4 (sin-cos positions) and of the "
                f"predictor's heads ({heads}: ijepa.predictor_heads, None = the backbone's)."
            )
        for name, (low, high) in (("target_scale", target_scale), ("context_scale", context_scale)):
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"ijepa.{name}={[low, high]} must be an area fraction range 0 < low <= high <= 1.")
        if not 0.0 < target_aspect_ratio[0] <= target_aspect_ratio[1]:
            raise ValueError(f"ijepa.target_aspect_ratio={list(target_aspect_ratio)} must be 0 < low <= high.")
        if not 0.0 <= momentum <= momentum_end <= 1.0:
            raise ValueError(
                f"ijepa.momentum ({momentum}) -> ijepa.momentum_end ({momentum_end}) must rise within [0, 1]."
            )
        self.backbone = backbone
        self.grid_size: tuple[int, int] = tuple(backbone.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens: int = backbone.num_prefix_tokens
        self.mask_args = dict(
            num_targets=num_targets,
            target_scale=tuple(target_scale),
            target_aspect_ratio=tuple(target_aspect_ratio),
            context_scale=tuple(context_scale),
            min_context=min_context,
        )
        # Settings that cannot fit the patch grid fail here, not at the first step (own generator: no global draw).
        multiblock_masks(64, self.grid_size, generator=torch.Generator().manual_seed(0), **self.mask_args)
        self.momentum_start, self.momentum_end = float(momentum), float(momentum_end)
        self.momentum = self.momentum_start  # this step's, set by on_step_start

        _init_vit_weights(backbone)
        self.target_encoder = copy.deepcopy(backbone).requires_grad_(False)
        self.predictor = IJEPAPredictor(backbone.embed_dim, self.grid_size, predictor_dim, predictor_depth, heads)
        use_onednn_linears(self.predictor)
        # Seeds every step's masks: drawn from the run's seed (the same on every process), kept in checkpoints.
        self.register_buffer("mask_seed", torch.randint(0, 2**62, (), dtype=torch.int64))
        self._step, self._micro_batch = 0, 0

    # -- hooks ----------------------------------------------------------------------------------

    def train_transform(self, data_cfg: Any) -> Callable[..., torch.Tensor]:
        return ijepa_transform(data_cfg)

    def on_step_start(self, step: int, total_steps: int) -> None:
        self._step, self._micro_batch = step, 0
        self.momentum = ijepa_momentum(step, total_steps, self.momentum_start, self.momentum_end)
        if step == 0:  # the target starts as the context encoder (whatever weights a run loaded into it)
            copy_params_(self.target_encoder, self.backbone)

    def on_step_end(self, step: int, total_steps: int) -> None:
        """target <- m * target + (1 - m) * context encoder (after the optimizer step, every process)."""
        ema_update_(self.target_encoder, self.backbone, self.momentum)

    def export_backbone(self) -> nn.Module:
        return self.target_encoder

    # -- the model ------------------------------------------------------------------------------

    def sample_masks(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the global batch's masks: context_ids (B, Kc), target_ids (B, T, Kt), CPU."""
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        seed = mix_seed(int(self.mask_seed), self._step, self._micro_batch)
        self._micro_batch += 1
        generator = torch.Generator().manual_seed(seed)
        context_ids, target_ids = multiblock_masks(
            batch_size * world, self.grid_size, generator=generator, **self.mask_args
        )
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        return context_ids[rows], target_ids[rows]

    def targets(self, images: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Layer-normalised target-encoder features of each target block: (B, 3, H, W), (B, T, Kt) -> (T * B, Kt, D)."""
        b, t, kt = target_ids.shape
        with torch.no_grad():
            h = self.target_encoder.forward_features(images)[:, self.num_prefix_tokens :]  # (B, N, D) patch tokens
            h = F.layer_norm(h, (h.shape[-1],))  # over the feature dim, no affine (official)
            h = gather_tokens(h, target_ids.reshape(b, t * kt)).view(b, t, kt, -1)  # (B, T, Kt, D)
            return h.transpose(0, 1).reshape(t * b, kt, -1)  # (T * B, Kt, D), block-major

    def predict(self, images: torch.Tensor, context_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Context encoder + predictor: (B, 3, H, W), (B, Kc), (B, T, Kt) -> (T * B, Kt, D)."""
        z = self.backbone.forward_features(images, context_ids)[:, self.num_prefix_tokens :]  # (B, Kc, D)
        return self.predictor(z, context_ids, target_ids)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss = smooth L1 between predictions and target features; also the targets' spread, mask sizes, momentum."""
        images = batch["pixel_values"]  # (B, 3, H, W)
        context_ids, target_ids = batch.get("context_ids"), batch.get("target_ids")
        if context_ids is None or target_ids is None:
            context_ids, target_ids = self.sample_masks(images.shape[0])
        context_ids, target_ids = context_ids.to(images.device), target_ids.to(images.device)
        target = self.targets(images, target_ids)  # (T * B, Kt, D)
        pred = self.predict(images, context_ids, target_ids)  # (T * B, Kt, D)
        loss = F.smooth_l1_loss(pred.float(), target.float())  # fp32 under autocast
        n = float(self.num_patches)
        # Every metric on the loss's device: the engine stacks them for its log line (no CPU/GPU mix).
        return {
            "loss": loss,
            # Spread of the targets across patches and images (per feature, averaged): near 0 = collapse.
            "target_std": target.flatten(0, 1).float().std(dim=0).mean(),
            "context_fraction": loss.new_tensor(context_ids.shape[1] / n),
            "target_fraction": loss.new_tensor(target_ids.shape[2] / n),
            "momentum": loss.new_tensor(self.momentum),
        }
