"""Pure helpers for masked image modelling: patchify / unpatchify and per-sample random masking.

Layouts follow facebookresearch/mae (and Hugging Face's ViTMAE), so that weights and losses carry over:
a patch flattens as (row-in-patch, column-in-patch, channel), patches in row-major order.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "block_indices",
    "block_masks",
    "block_size",
    "cell_masks",
    "first_indices",
    "gather_tokens",
    "multiblock_masks",
    "num_masked_cells",
    "num_visible",
    "patchify",
    "random_masking",
    "unpatchify",
]


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


# ---------------------------------------------------------------------------------------------------
# Multi-block masks (I-JEPA, Assran et al. 2023; facebookresearch/ijepa src/masks/multiblock.py)


def block_size(
    u: float, grid_size: tuple[int, int], scale: tuple[float, float], aspect_ratio: tuple[float, float]
) -> tuple[int, int]:
    """(height, width) in patches of a block drawn with one uniform `u` in [0, 1), as I-JEPA's `_sample_block_size`.

    One draw sets both the area fraction (`scale`) and the height/width ratio (`aspect_ratio`), as the
    official code does: larger blocks are also taller. Area = int(N * scale) patches, h = round(sqrt(area
    * ratio)), w = round(sqrt(area / ratio)). Unlike the official code (which shrinks a block until it is
    strictly smaller than the grid), a side may span the whole grid; every side is at least 1.
    """
    gh, gw = grid_size
    area = int(gh * gw * (scale[0] + u * (scale[1] - scale[0])))
    ratio = aspect_ratio[0] + u * (aspect_ratio[1] - aspect_ratio[0])
    h = round(math.sqrt(area * ratio))
    w = round(math.sqrt(area / ratio))
    return min(max(h, 1), gh), min(max(w, 1), gw)


def block_masks(
    top: torch.Tensor, left: torch.Tensor, size: tuple[int, int], grid_size: tuple[int, int]
) -> torch.Tensor:
    """Boolean masks of h x w blocks at (top, left): top/left (...) int64 -> (..., gh * gw), row-major."""
    (h, w), (gh, gw) = size, grid_size
    rows = torch.arange(gh, device=top.device)
    cols = torch.arange(gw, device=left.device)
    in_rows = (rows >= top.unsqueeze(-1)) & (rows < top.unsqueeze(-1) + h)  # (..., gh)
    in_cols = (cols >= left.unsqueeze(-1)) & (cols < left.unsqueeze(-1) + w)  # (..., gw)
    return (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).flatten(-2)  # (..., gh * gw)


def first_indices(mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The first `keep` True positions of each row, in order: (..., N) bool -> (..., keep) int64.

    Every row must hold at least `keep` True values.
    """
    chosen = mask & (mask.cumsum(dim=-1) <= keep)  # (..., N): exactly `keep` per row
    return torch.nonzero(chosen)[:, -1].view(*mask.shape[:-1], keep)  # nonzero lists them row by row


def block_indices(top: torch.Tensor, left: torch.Tensor, size: tuple[int, int], grid_width: int) -> torch.Tensor:
    """Patch indices of h x w blocks at (top, left), raster order: top/left (...) -> (..., h * w) int64."""
    h, w = size
    offsets = (torch.arange(h).unsqueeze(1) * grid_width + torch.arange(w)).flatten()  # (h * w,)
    return (top * grid_width + left).unsqueeze(-1) + offsets


def multiblock_masks(
    batch_size: int,
    grid_size: tuple[int, int],
    *,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_context: int = 10,
    generator: torch.Generator | None = None,
    max_tries: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """I-JEPA's context and target patch indices for a batch (as the official `MaskCollator`).

    One target-block shape and one context-block shape (aspect ratio 1) per batch; per sample,
    `num_targets` target blocks at uniform positions (they may overlap each other) and one context block
    with every target patch removed, so context and targets never share a patch. A sample whose
    context keeps fewer than `min_context` patches is drawn again, targets and context (the official
    code instead lets the context overlap the targets after 20 failed tries). Positions are uniform over
    every place the block fits (the official `randint(0, H - h)` never touches the last row / column).

    Every sample keeps the same number of context patches, as the official collator: each context is
    cut to the batch's smallest, keeping its first patches in raster order. Target blocks all have
    h * w patches, so they need no cut.

    Returns: context_ids (B, Kc) and target_ids (B, T, Kt) int64 patch indices in raster order, on the CPU.
    """
    if batch_size < 1 or num_targets < 1:
        raise ValueError(f"batch_size and num_targets must be at least 1, got {batch_size} and {num_targets}.")
    gh, gw = grid_size
    u = torch.rand(2, generator=generator).tolist()
    th, tw = block_size(u[0], grid_size, target_scale, target_aspect_ratio)
    ch, cw = block_size(u[1], grid_size, context_scale, (1.0, 1.0))

    def corners(shape: tuple[int, ...], h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        top = torch.randint(0, gh - h + 1, shape, generator=generator)
        left = torch.randint(0, gw - w + 1, shape, generator=generator)
        return top, left

    target_ids = torch.zeros(batch_size, num_targets, th * tw, dtype=torch.long)  # (B, T, Kt)
    context = torch.zeros(batch_size, gh * gw, dtype=torch.bool)  # (B, N)
    todo = torch.arange(batch_size)
    for _ in range(max_tries):
        top, left = corners((len(todo), num_targets), th, tw)
        in_targets = block_masks(top, left, (th, tw), grid_size).any(dim=1)  # (n, N)
        ctx = block_masks(*corners((len(todo),), ch, cw), (ch, cw), grid_size) & ~in_targets  # (n, N)
        target_ids[todo], context[todo] = block_indices(top, left, (th, tw), gw), ctx
        todo = todo[ctx.sum(dim=-1) < min_context]
        if len(todo) == 0:
            break
    else:
        raise ValueError(
            f"no context of at least {min_context} patches found in {max_tries} tries: {num_targets} target blocks "
            f"of {th}x{tw} cover too much of the {ch}x{cw} context block on a {gh}x{gw} patch grid. Lower "
            f"min_context, the number or scale of the target blocks, or use more patches per image."
        )
    keep = int(context.sum(dim=-1).min())
    return first_indices(context, keep), target_ids  # (B, Kc), (B, T, Kt)


# ---------------------------------------------------------------------------------------------------
# Random masks of coarse cells (SimMIM, Xie et al. 2022; microsoft/SimMIM data/data_simmim.py MaskGenerator)


def num_masked_cells(num_cells: int, mask_ratio: float) -> int:
    """Cells masked per sample: ceil(cells * ratio), as SimMIM's MaskGenerator (49 cells at 0.6 -> 30).

    The product is rounded to 9 decimals first, so floating-point dust (10 * 0.3 = 3.0000000000000004)
    does not add a cell; at least 1 cell is masked (the loss needs one).
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be strictly between 0 and 1, got {mask_ratio}: use e.g. 0.6 (SimMIM).")
    return max(math.ceil(round(num_cells * mask_ratio, 9)), 1)


def cell_masks(
    batch_size: int,
    grid_size: tuple[int, int],
    cell: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """SimMIM's masks: per sample, exactly `num_masked_cells` random cells of `cell` x `cell` patches.

    The patch grid is tiled by square cells (a 32-px mask patch over 16-px ViT patches: cell = 2); a
    uniformly random set of cells, of the same size for every sample, is masked and each masked cell
    masks all of its patches.
    Args: grid_size (gh, gw) in patches, both divisible by `cell`; generator for the draw (None: torch's
        global stream, e.g. a loader worker's per-sample seed).
    Returns: (B, gh * gw) bool, True = masked, patches row-major.
    """
    gh, gw = grid_size
    if cell < 1 or gh % cell or gw % cell:
        raise ValueError(
            f"a {gh}x{gw} patch grid cannot be tiled by {cell}x{cell}-patch mask cells: the mask patch size must be "
            f"a multiple of the ViT patch size that divides the image size."
        )
    ch, cw = gh // cell, gw // cell
    count = num_masked_cells(ch * cw, mask_ratio)
    noise = torch.rand(batch_size, ch * cw, generator=generator, device=device)  # (B, cells)
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, cells): each cell's place in a random order
    masked = (rank < count).view(batch_size, ch, 1, cw, 1)  # (B, ch, 1, cw, 1)
    return masked.expand(batch_size, ch, cell, cw, cell).reshape(batch_size, gh * gw)  # (B, N)
