"""BEiT's block-wise masking against a direct transcription of the official generator (microsoft/unilm
beit2/masking_generator.py `MaskingGenerator`), fed the same seeded draws.

The transcription below keeps the official code line for line; two substitutions only: the global `random`
module becomes a seeded `random.Random` instance passed in, and `np.random.choice(n, k, replace=False)`
(the final count correction) becomes `rng.sample(range(n), k)`, so both draw from one stream.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ssl_vit.objectives.beit_masking import blockwise_mask, num_block_masked


class OfficialMaskingGenerator:
    """beit2/masking_generator.py, transcribed (rng substitutions only)."""

    def __init__(self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None, min_aspect=0.3,
                 max_aspect=None, rng=None):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng

    def get_shape(self):
        return self.height, self.width

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for attempt in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros(shape=self.get_shape(), dtype=np.int32)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = self.num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta
        if mask_count > self.num_masking_patches:
            delta = mask_count - self.num_masking_patches
            mask_x, mask_y = mask.nonzero()
            to_vis = np.array(self.rng.sample(range(mask_x.shape[0]), delta), dtype=np.int64)
            mask[mask_x[to_vis], mask_y[to_vis]] = 0
        elif mask_count < self.num_masking_patches:
            delta = self.num_masking_patches - mask_count
            mask_x, mask_y = (mask == 0).nonzero()
            to_mask = np.array(self.rng.sample(range(mask_x.shape[0]), delta), dtype=np.int64)
            mask[mask_x[to_mask], mask_y[to_mask]] = 1
        assert mask.sum() == self.num_masking_patches
        return mask


@pytest.mark.parametrize(
    "grid, num_masked, min_block",
    [((14, 14), 75, 16), ((8, 8), 26, 5), ((4, 4), 6, 2), ((6, 10), 24, 4), ((14, 14), 118, 16)],
)
def test_blockwise_mask__equals_the_official_generator_draw_for_draw(grid, num_masked, min_block):
    for seed in range(40):
        official = OfficialMaskingGenerator(grid, num_masked, min_num_patches=min_block, rng=random.Random(seed))()
        ours = blockwise_mask(grid, num_masked, min_block, random.Random(seed))
        assert torch.equal(ours, torch.from_numpy(official.reshape(-1) == 1)), (grid, seed)


def test_blockwise_mask__exact_count_and_contiguous_blocks_of_at_least_the_minimum():
    rng = random.Random(0)
    rows = []
    for _ in range(200):
        m = blockwise_mask((14, 14), 75, 16, rng)
        assert m.dtype == torch.bool and m.shape == (196,) and int(m.sum()) == 75
        rows.append(m)
    masks = torch.stack(rows).view(-1, 14, 14)
    # Blocks, not salt-and-pepper: a masked patch mostly has a masked 4-neighbour (random masking: ~65%).
    pad = torch.nn.functional.pad(masks.float(), (1, 1, 1, 1))
    neighbours = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    assert (neighbours[masks] > 0).float().mean() > 0.95
    assert len({tuple(m.tolist()) for m in rows}) == 200  # samples differ
    freq = masks.float().mean(0)
    assert freq.min() > 0  # every patch gets masked sometimes (corners least, as the official algorithm)


def test_blockwise_mask__seeded_draws_repeat():
    a = blockwise_mask((8, 8), 26, 5, random.Random(3))
    assert torch.equal(a, blockwise_mask((8, 8), 26, 5, random.Random(3)))
    assert not torch.equal(a, blockwise_mask((8, 8), 26, 5, random.Random(4)))


@pytest.mark.parametrize("n, ratio, count", [(196, 0.3827, 75), (196, 0.4, 78), (64, 0.4, 26), (16, 0.4, 6), (4, 0.01, 1)])
def test_num_block_masked__rounds_and_keeps_one_visible_and_one_masked(n, ratio, count):
    assert num_block_masked(n, ratio) == count


def test_blockwise_mask__an_impossible_count_is_refused():
    with pytest.raises(ValueError, match="must be between 1 and 15"):
        blockwise_mask((4, 4), 16, 2, random.Random(0))
