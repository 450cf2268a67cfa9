"""Pure helpers for masked image modelling: patchify / unpatchify and per-sample random masking.

Layouts follow facebookresearch/mae (and Hugging Face's ViTMAE), so that weights and losses carry over:
a patch flattens as (row-in-patch, column-in-patch, channel), patches in row-major order.
"""

from __future__ import annotations

import torch

__all__ = ["gather_tokens", "num_visible", "patchify", "random_masking", "unpatchify"]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images to flattened patches: (B, C, H, W) -> (B, H/p * W/p, p*p*C).

    Each patch is laid out (p, p, C) (MAE's 'nchpwq->nhwpqc'), patches row-major.
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}: resize or crop the images.")
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p)  # (B, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B, gh*gw, p*p*C) -> (B, C, gh*p, gw*p)."""
    b, n, d = patches.shape
    gh, gw = grid_size
    p = patch_size
    if n != gh * gw or d != p * p * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit a {gh}x{gw} grid of {p}x{p}x{channels} patches."
        )
    x = patches.reshape(b, gh, gw, p, p, channels)  # (B, gh, gw, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, gh * p, gw * p)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: round(N * (1 - r)), at least 1 and at most N - 1.

    Rounding (not MAE's int()) keeps e.g. N=10, r=0.7 at 3 despite 1 - 0.7 = 0.30000000000000004;
    the clamp keeps at least one visible patch for the encoder and one masked patch for the loss.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be strictly between 0 and 1, got {mask_ratio}: use e.g. 0.75 (MAE).")
    return min(max(round(num_patches * (1.0 - mask_ratio)), 1), num_patches - 1)


def random_masking(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise: the `keep` lowest-noise patches stay visible.

    Args:
        noise: (B, N) any real values, e.g. uniform; equal noise gives equal masks.
        keep: number of visible patches per sample, 0 < keep <= N.
    Returns:
        ids_keep: (B, keep) int64 indices of the visible patches, in order of increasing noise.
        ids_restore: (B, N) int64, position of each patch in the shuffled order (argsort of the shuffle):
            gathering [visible tokens, mask tokens] with it restores the original patch order.
        mask: (B, N) in noise's dtype, 1 for masked patches and 0 for visible ones (MAE/HF convention).
    """
    if noise.dim() != 2:
        raise ValueError(f"noise must have shape (batch, num_patches), got {tuple(noise.shape)}.")
    b, n = noise.shape
    if not 0 < keep <= n:
        raise ValueError(f"keep must be in 1..{n} (the number of patches), got {keep}.")
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N): ascending noise; the first `keep` are visible
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :keep]  # (B, K)
    mask = torch.ones(b, n, dtype=noise.dtype if noise.is_floating_point() else torch.float32, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, N) back in patch order
    return ids_keep, ids_restore, mask


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens per sample: (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
