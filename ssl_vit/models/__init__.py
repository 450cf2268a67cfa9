"""The shared ViT backbone and its builders."""

from ssl_vit.models.registry import (
    SIZES,
    UnknownModelError,
    create_backbone,
    create_model,
    list_backbones,
    timm_spec_for,
)
from ssl_vit.models.vit import (
    ViT,
    WeightsMismatchError,
    adapt_state_dict,
    block_queries,
    load_weights,
    sincos_pos_embed_2d,
)

__all__ = [
    "SIZES",
    "UnknownModelError",
    "ViT",
    "WeightsMismatchError",
    "adapt_state_dict",
    "block_queries",
    "create_backbone",
    "create_model",
    "list_backbones",
    "load_weights",
    "sincos_pos_embed_2d",
    "timm_spec_for",
]
