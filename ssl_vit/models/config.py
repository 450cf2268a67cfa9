"""The `model.*` config group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ssl_vit.accepts import Range, at_least, setting


@dataclass
class ModelConfig:
    # A backbone name from `ssl_vit.models.list_backbones()` (timm's names plus small-image sizes).
    name: str = "vit_nano_patch4_32"
    # None: take the image size from `data.image_size`.
    img_size: Optional[int] = setting(None, at_least(1))
    # None: the size's own patch size (the number in its name).
    patch_size: Optional[int] = setting(None, at_least(1))
    # "learn": learned position embeddings (ViT, DeiT); "sincos": fixed 2-D sin-cos (MAE). None: the
    # objective's default (MAE: sincos), else learned. Fine-tuning always learns it (from the checkpoint's values).
    pos_embed: Optional[Literal["learn", "sincos"]] = None
    # "token": class token; "avg": average of patch tokens (+ fc_norm), MAE's fine-tune choice.
    global_pool: Literal["token", "avg"] = "token"
    drop_path_rate: float = setting(0.0, Range(0, 1, high_open=True), 'stochastic depth of the last block')
    # Start from these weights (a backbone.safetensors, a timm/MAE/DeiT checkpoint), or None.
    checkpoint: Optional[str] = None
    # Any other keyword of timm's VisionTransformer (embed_dim, depth, num_heads, mlp_ratio, ...).
    args: dict = field(default_factory=dict)
