"""Pictures of what a ViT does: attention maps and rollout, patch grids, position-embedding similarity."""

from ssl_vit.viz.attention import attention_grid, attention_maps, attention_matrices, rollout, rollout_from, upsample
from ssl_vit.viz.images import load_images, synthetic_images

__all__ = [
    "attention_grid",
    "attention_maps",
    "attention_matrices",
    "load_images",
    "rollout",
    "rollout_from",
    "synthetic_images",
    "upsample",
]
