"""SimMIM's picture: original | masked | prediction | prediction pasted into the masked squares.

One row per image, as MAE's grid (`ssl_vit.viz.mae`), so the two read alike. Used by `SimMIM.visualize`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ssl_vit.viz.images import denormalize, image_grid

if TYPE_CHECKING:
    from ssl_vit.objectives.simmim import SimMIM

__all__ = ["reconstruction_grid"]


@torch.no_grad()
def reconstruction_grid(
    simmim: "SimMIM",
    pixel_values: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    mask: torch.Tensor | None = None,
    max_images: int = 8,
    seed: int = 0,
    min_tile: int = 64,
) -> torch.Tensor:
    """One row per image: original | masked (grey squares) | prediction | prediction + visible pixels.

    Masks come from `mask` (B, N) or a fixed seed, so grids drawn at different epochs compare. Tiles are
    at least `min_tile` pixels (nearest), so 32x32 images stay legible. Returns (3, H', W') in [0, 1].
    """
    images = pixel_values[:max_images]
    if mask is None:
        mask = simmim.make_masks(images, generator=torch.Generator().manual_seed(seed))
    mask = mask[:max_images].to(device=images.device, dtype=torch.bool)
    was_training = simmim.training
    simmim.eval()
    try:
        recon = simmim.reconstruct(images, mask).float()
    finally:
        simmim.train(was_training)
    pix = simmim.pixel_mask(mask, images.shape[-2:])  # (B, 1, H, W)
    original = denormalize(images.float(), mean, std)
    recon = denormalize(recon, mean, std)
    masked = original * (1 - pix) + 0.5 * pix
    pasted = original * (1 - pix) + recon * pix
    rows = [list(row) for row in zip(original, masked, recon, pasted)]
    return image_grid(rows, cell=max(min_tile, images.shape[-1]), pad=1).clamp(0, 1)
