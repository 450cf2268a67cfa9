"""Masking and patch helpers: counts, per-sample randomness, reproducibility, round trips."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_vit.objectives.masking import gather_tokens, num_visible, patchify, random_masking, unpatchify


@given(n=st.integers(2, 400), ratio=st.floats(0.01, 0.99))
def test_num_visible__is_round_n_times_one_minus_ratio_clamped_to_leave_one_of_each(n, ratio):
    expected = min(max(round(n * (1 - ratio)), 1), n - 1)
    assert num_visible(n, ratio) == expected


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_num_visible__rejects_ratio_outside_open_unit_interval(ratio):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        num_visible(64, ratio)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 6), n=st.integers(2, 80), ratio=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_random_masking__keeps_exactly_k_patches_per_sample_and_mask_marks_the_rest(b, n, ratio, seed):
    keep = num_visible(n, ratio)
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(seed))
    ids_keep, ids_restore, mask = random_masking(noise, keep)
    assert ids_keep.shape == (b, keep) and ids_restore.shape == (b, n) and mask.shape == (b, n)
    assert torch.all(mask.sum(dim=1) == n - keep)
    # The kept ids are exactly the zeros of the mask, and they are the lowest-noise patches.
    visible = torch.zeros(b, n).scatter_(1, ids_keep, 1.0)
    torch.testing.assert_close(visible, 1 - mask)
    kept_max = noise.gather(1, ids_keep).max(dim=1).values
    masked_min = noise.masked_fill(mask == 0, float("inf")).min(dim=1).values
    assert torch.all(kept_max <= masked_min)


def test_random_masking__differs_between_samples_of_a_batch():
    noise = torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
    _, _, mask = random_masking(noise, 16)
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_random_masking__same_noise_gives_same_mask_and_other_noise_another():
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(1))
    first = random_masking(noise, 16)
    again = random_masking(noise.clone(), 16)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = random_masking(torch.rand(4, 64, generator=torch.Generator().manual_seed(2)), 16)
    assert not torch.equal(first[2], other[2])


def test_random_masking__ids_restore_puts_visible_then_masked_tokens_back_in_patch_order():
    b, n, keep = 3, 20, 5
    tokens = torch.randn(b, n, 4)
    ids_keep, ids_restore, mask = random_masking(torch.rand(b, n), keep)
    visible = gather_tokens(tokens, ids_keep)  # (B, K, 4)
    filler = torch.full((b, n - keep, 4), float("nan"))
    restored = gather_tokens(torch.cat([visible, filler], dim=1), ids_restore)
    keep_mask = mask == 0
    torch.testing.assert_close(restored[keep_mask], tokens[keep_mask])
    assert torch.isnan(restored[~keep_mask]).all()


def test_random_masking__rejects_bad_shapes_and_counts():
    with pytest.raises(ValueError, match="batch, num_patches"):
        random_masking(torch.rand(64), 16)
    with pytest.raises(ValueError, match="keep must be"):
        random_masking(torch.rand(2, 8), 0)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 4), p=st.integers(1, 5), gh=st.integers(1, 5), gw=st.integers(1, 5))
def test_patchify_unpatchify__round_trip_exactly(b, c, p, gh, gw):
    images = torch.randn(b, c, gh * p, gw * p)
    patches = patchify(images, p)
    assert patches.shape == (b, gh * gw, p * p * c)
    assert torch.equal(unpatchify(patches, p, (gh, gw), c), images)


def test_patchify__first_patch_is_top_left_block_laid_out_row_column_channel():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(images, 2)  # grid 2x3
    expected = images[0, :, 0:2, 0:2].permute(1, 2, 0).reshape(-1)  # (p, p, C)
    assert torch.equal(patches[0, 0], expected)
    # Row-major patches: patch 1 is the next block to the right.
    assert torch.equal(patches[0, 1], images[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))


def test_patchify__rejects_images_not_divisible_by_patch():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 10, 10), 4)
