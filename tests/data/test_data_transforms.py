"""build_transform: output shapes and value ranges per kind, RGB conversion, paper defaults."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ssl_vit.data import DataConfig, build_transform, to_rgb
from ssl_vit.data.transforms import _posterize

MEAN, STD = np.array(DataConfig.mean), np.array(DataConfig.std)
# Normalised [0, 1] pixels land in [(0 - mean) / std, (1 - mean) / std].
LOW, HIGH = float(((0 - MEAN) / STD).min()), float(((1 - MEAN) / STD).max())


def _noise_image(size=(40, 28), mode="RGB", seed=0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("kind", ["mae", "supervised", "eval"])
@pytest.mark.parametrize("train", [True, False])
def test_build_transform__gives_normalised_3_channel_image_of_image_size(kind, train):
    cfg = DataConfig(image_size=24, reprob=0.0)
    out = build_transform(kind, cfg, train=train)(_noise_image())
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert LOW - 1e-5 <= out.min() and out.max() <= HIGH + 1e-5


@settings(max_examples=25, deadline=None)
@given(
    mode=st.sampled_from(["L", "LA", "RGBA", "P", "CMYK", "1", "I;16", "RGB"]),
    width=st.integers(1, 50),
    height=st.integers(1, 50),
    kind=st.sampled_from(["mae", "supervised", "eval"]),
)
def test_build_transform__any_mode_and_size_becomes_rgb_image_size(mode, width, height, kind):
    image = _noise_image((width, height)).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    out = build_transform(kind, DataConfig(image_size=16), train=True)(image)
    assert out.shape == (3, 16, 16) and torch.isfinite(out).all()


def test_to_rgb__grayscale_copies_the_gray_level_to_all_channels():
    gray = Image.new("L", (4, 4), 77)
    assert np.asarray(to_rgb(gray)).tolist() == [[[77, 77, 77]] * 4] * 4
    sixteen = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(sixteen)).max() == 255


def test_eval_transform__is_deterministic_and_keeps_a_same_size_image_exact():
    cfg = DataConfig(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = _noise_image((16, 16))
    tf = build_transform("eval", cfg, train=False)
    assert torch.equal(tf(image), tf(image))
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert torch.allclose(tf(image), expected)


def test_eval_transform__crop_pct_resizes_then_center_crops():
    cfg = DataConfig(image_size=14, crop_pct=0.875, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, 0] = 255  # a bright left border, cropped away by the 14/16 center crop
    out = build_transform("eval", cfg, train=False)(Image.fromarray(arr))
    assert out.shape == (3, 14, 14) and out[:, :, 0].max() < 0.05


def test_mae_transform__is_random_crop_and_flip_only_with_scale_from_0_2():
    tf = build_transform("mae", DataConfig(image_size=16), train=True).inner
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert tf.transforms[0].scale == (0.2, 1.0)
    assert tf.transforms[0].interpolation.value == "bicubic"


def test_supervised_transform__follows_deit_and_reads_the_config():
    default = build_transform("supervised", DataConfig(image_size=16), train=True).inner
    text = repr(default)
    assert "scale=(0.08, 1.0)" in text and "PosterizeIncreasing" in text and "m=9, mstd=0.5" in text
    assert "RandomErasing(p=0.25, mode=pixel" in text
    plain = repr(build_transform("supervised", DataConfig(auto_augment=None, reprob=0.0, crop_scale_min=0.5), True))
    assert "RandAugment" not in plain and "RandomErasing" not in plain and "scale=(0.5, 1.0)" in plain


def test_transforms__are_random_when_training():
    image = _noise_image((32, 32))
    for kind in ("mae", "supervised"):
        tf = build_transform(kind, DataConfig(image_size=16), train=True)
        outs = [tf(image) for _ in range(4)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_posterize__zero_bits_gives_black_instead_of_pillows_error():
    image = _noise_image((8, 8))
    assert np.asarray(_posterize(image, 0)).max() == 0
    assert np.asarray(_posterize(image, 8)).tolist() == np.asarray(image).tolist()
    # The strongest RandAugment magnitude asks for 0 bits: it must run.
    cfg = dataclasses.replace(DataConfig(image_size=16), auto_augment="rand-m10-mstd0-inc1")
    tf = build_transform("supervised", cfg, train=True).inner
    ra = next(t for t in tf.transforms if type(t).__name__ == "RandAugment")
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    assert np.asarray(op(image)).max() == 0


def test_build_transform__rejects_unknown_kind_and_bad_settings():
    with pytest.raises(ValueError, match="unknown transform kind 'simclr'"):
        build_transform("simclr", DataConfig(), train=True)
    with pytest.raises(ValueError, match="data.crop_scale_min"):
        build_transform("mae", DataConfig(crop_scale_min=0.0), train=True)
    with pytest.raises(ValueError, match="data.interpolation"):
        build_transform("eval", DataConfig(interpolation="cubic-ish"), train=False)
