"""BEiT's block-wise masking (Bao et al. 2021, sec. 2.5; microsoft/unilm beit2 `masking_generator.py`).

Rectangles of at least `min_block` patches, aspect ratio log-uniform in [min_aspect, 1 / min_aspect],
are masked until `num_masked` patches are covered; a block may only add new patches and never more than
the remaining budget. As BEiT v2's generator, the count is then made exact (random visible patches
masked, when ten tries in a row found no block that fits): every sample masks the same number of
patches, so a loss averaged over masked positions is the same whatever the batch is split into.

Draws come from a `random.Random`, in the official order (the official code uses the global `random`
module and `np.random.choice` for the final correction; we take `rng.sample` for the latter), so a
seeded generator repeats and a per-sample seed gives each sample its own mask.
"""

from __future__ import annotations

import math
import random

import torch

__all__ = ["blockwise_mask", "num_block_masked"]


def num_block_masked(num_patches: int, mask_ratio: float) -> int:
    """Patches masked per sample: round(N * r), at least 1 and at most N - 1 (ViT-B/16: 0.3827 -> 75 of 196)."""
    return min(max(round(num_patches * mask_ratio), 1), num_patches - 1)


def _try_block(
    mask: list[list[bool]],
    budget: int,
    min_block: float,
    log_aspect: tuple[float, float],
    rng: random.Random,
) -> int:
    """Up to ten tries at one rectangle adding 1..budget new patches; returns how many it added."""
    height, width = len(mask), len(mask[0])
    added = 0
    for _ in range(10):
        area = rng.uniform(min_block, budget)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = round(math.sqrt(area * aspect))
        w = round(math.sqrt(area / aspect))
        if w < width and h < height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            covered = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
            if 0 < h * w - covered <= budget:  # new patches only, within the budget
                for i in range(top, top + h):
                    for j in range(left, left + w):
                        if not mask[i][j]:
                            mask[i][j] = True
                            added += 1
            if added > 0:
                break
    return added


def blockwise_mask(
    grid: tuple[int, int],
    num_masked: int,
    min_block: float,
    rng: random.Random,
    *,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> torch.Tensor:
    """One block-wise mask over a (gh, gw) patch grid -> (gh * gw,) bool, exactly `num_masked` True.

    Args:
        grid: patch rows and columns.
        num_masked: patches to mask (the paper: 75 of 196).
        min_block: smallest block area drawn, in patches (the paper: 16).
        rng: the random stream every draw comes from.
        max_block: largest block area (default: the whole budget).
        min_aspect, max_aspect: block aspect range (default max 1 / min; the paper: 0.3 .. 1/0.3).
    """
    height, width = grid
    if not 0 < num_masked < height * width:
        raise ValueError(f"num_masked={num_masked} must be between 1 and {height * width - 1} for a {height}x{width} grid.")
    max_block = num_masked if max_block is None else max_block
    max_aspect = max_aspect or 1 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    mask = [[False] * width for _ in range(height)]
    count = 0
    while count < num_masked:
        added = _try_block(mask, min(num_masked - count, max_block), min_block, log_aspect, rng)
        if added == 0:
            break
        count += added
    flat = [v for row in mask for v in row]  # row-major, as np.nonzero
    if count > num_masked:  # cannot happen with the budget check; kept as the official code
        on = [i for i, v in enumerate(flat) if v]
        for k in rng.sample(range(len(on)), count - num_masked):
            flat[on[k]] = False
    elif count < num_masked:
        off = [i for i, v in enumerate(flat) if not v]
        for k in rng.sample(range(len(off)), num_masked - count):
            flat[off[k]] = True
    return torch.tensor(flat, dtype=torch.bool)
