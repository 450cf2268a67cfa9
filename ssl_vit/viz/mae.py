"""MAE's pictures: reconstructions in pixel space and the grid logged during training.

Original | masked | reconstruction | reconstruction with the visible patches pasted back, one row per
image (facebookresearch/mae's demo notebook). Used by `MAE.visualize` and `tools/visualize_mae.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torchvision.utils import make_grid

from ssl_vit.objectives.masking import patchify, unpatchify
from ssl_vit.viz.images import denormalize

if TYPE_CHECKING:
    from ssl_vit.objectives.mae import MAE

__all__ = ["reconstruct", "reconstruction_grid"]


@torch.no_grad()
def reconstruct(mae: "MAE", pixel_values: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructed images and the pixel mask, in the input's (normalised) space.

    With norm_pix_loss the prediction is per-patch normalised; it is mapped back with each true
    patch's mean and std (what MAE's own demos do), so only the patch's structure is predicted.
    Returns: reconstruction (B, 3, H, W); mask (B, 1, H, W) with 1 on masked pixels.
    """
    latent, ids_restore, mask = mae.encode(pixel_values, noise)
    pred = mae.decode(latent, ids_restore).float()  # (B, N, p*p*3)
    p = mae.patch_size
    if mae.norm_pix_loss:
        patches = patchify(pixel_values.float(), p)
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        pred = pred * (var + mae.norm_pix_eps) ** 0.5 + mean
    recon = unpatchify(pred, p, mae.grid_size, pixel_values.shape[1])  # (B, 3, H, W)
    pix_mask = mask.float().unsqueeze(-1).expand(-1, -1, p**2)  # (B, N, p*p)
    pix_mask = unpatchify(pix_mask, p, mae.grid_size, 1)  # (B, 1, H, W)
    return recon, pix_mask


@torch.no_grad()
def reconstruction_grid(
    mae: "MAE",
    pixel_values: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    noise: torch.Tensor | None = None,
    max_images: int = 8,
    seed: int = 0,
    min_tile: int = 64,
) -> torch.Tensor:
    """One row per image: original | masked | reconstruction | reconstruction + visible patches.

    Masks come from `noise` or a fixed seed, so grids drawn at different epochs compare. Tiles
    smaller than `min_tile` pixels are enlarged by an integer factor (nearest), so 32x32 images stay
    legible. `mean` / `std`: the data normalisation. Returns (3, H', W') in [0, 1].
    """
    images = pixel_values[:max_images]
    if noise is None:
        noise = mae.make_noise(images.shape[0], generator=torch.Generator().manual_seed(seed))
    was_training = mae.training
    mae.eval()
    try:
        recon, pix_mask = reconstruct(mae, images, noise[:max_images].to(images.device))
    finally:
        mae.train(was_training)
    original = denormalize(images.float(), mean, std)
    recon = denormalize(recon, mean, std)
    masked = original * (1 - pix_mask) + 0.5 * pix_mask  # masked patches grey
    pasted = original * (1 - pix_mask) + recon * pix_mask
    tiles = torch.stack([original, masked, recon, pasted], dim=1).flatten(0, 1).cpu()  # (B*4, 3, H, W)
    scale = -(-min_tile // max(tiles.shape[-2:]))  # ceil
    if scale > 1:
        tiles = tiles.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return make_grid(tiles, nrow=4, padding=1, pad_value=1.0).clamp(0, 1)
