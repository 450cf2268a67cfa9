"""Per-use image transforms (PIL RGB -> normalised (3, H, W) float32), from ../shared/PROTOCOLS.md.

- `mae`: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip, nothing else (MAE paper).
- `supervised`: timm's `create_transform` training pipeline as in DeiT: RandomResizedCrop(0.08-1),
  flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 (mixup/cutmix live in the objective).
- `eval`: resize to image_size / crop_pct, center crop image_size.

An objective with views of its own (multi-crop, two augmented views) builds them in its
`train_transform(data_cfg)`; `own_transform` feeds it RGB images like these.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image
from torchvision import transforms as T

from ssl_vit.data.config import DataConfig

__all__ = ["TRANSFORM_KINDS", "build_transform", "own_transform", "to_rgb"]

TRANSFORM_KINDS = ("mae", "supervised", "eval")
# Paper values of RandomResizedCrop's smallest area fraction, used when data.crop_scale_min is None.
_DEFAULT_SCALE_MIN = {"mae": 0.2, "supervised": 0.08}
_INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
    "lanczos": T.InterpolationMode.LANCZOS,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on black, as timm's convert('RGB') would leave it."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit grayscale: rescale to 8 bits
        import numpy as np

        arr = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def _interp(cfg: DataConfig) -> T.InterpolationMode:
    try:
        return _INTERPOLATIONS[cfg.interpolation]
    except KeyError:
        raise ValueError(
            f"data.interpolation='{cfg.interpolation}' is unknown: use one of {', '.join(_INTERPOLATIONS)}."
        ) from None


def _normalize(cfg: DataConfig) -> list:
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise ValueError(
            f"data.mean={list(cfg.mean)} / data.std={list(cfg.std)}: need 3 values each (RGB), std > 0."
        )
    return [T.ToTensor(), T.Normalize(mean=list(cfg.mean), std=list(cfg.std))]


def _scale(kind: str, cfg: DataConfig) -> tuple[float, float]:
    low = _DEFAULT_SCALE_MIN[kind] if cfg.crop_scale_min is None else cfg.crop_scale_min
    if not 0.0 < low <= 1.0:
        raise ValueError(f"data.crop_scale_min={low} must be in (0, 1]: the smallest crop area fraction.")
    return (low, 1.0)


def _eval_transform(cfg: DataConfig) -> T.Compose:
    if not 0.0 < cfg.crop_pct <= 1.0:
        raise ValueError(f"data.crop_pct={cfg.crop_pct} must be in (0, 1] (1.0: no border cropped).")
    resize = int(round(cfg.image_size / cfg.crop_pct))
    return T.Compose([T.Resize(resize, interpolation=_interp(cfg)), T.CenterCrop(cfg.image_size), *_normalize(cfg)])


def _mae_transform(cfg: DataConfig) -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.image_size, scale=_scale("mae", cfg), interpolation=_interp(cfg)),
            T.RandomHorizontalFlip(cfg.hflip),
            *_normalize(cfg),
        ]
    )


def _supervised_transform(cfg: DataConfig) -> Callable:
    from timm.data import create_transform

    _interp(cfg)  # same names as timm's; validate early with our message
    _normalize(cfg)
    auto_augment = cfg.auto_augment if cfg.auto_augment and cfg.auto_augment.lower() != "none" else None
    transform = create_transform(
        input_size=cfg.image_size,
        is_training=True,
        scale=_scale("supervised", cfg),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=auto_augment,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    _make_posterize_safe(transform)
    return transform


def _posterize(image: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, also for 0 bits: Pillow >= 11 rejects 0, which older Pillow (and the
    TF RandAugment that DeiT's "inc1" policy follows) turned into a black image."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _make_posterize_safe(transform: Callable) -> None:
    # RandAugment at magnitude 10 (m9 + noise, clipped) asks for 0 bits; swap the op's function on
    # this instance only, rather than patching timm globally.
    from timm.data.auto_augment import RandAugment, posterize

    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = _posterize


class _RGBThen:
    """Convert to RGB, then apply `inner`: picklable, so it runs in DataLoader workers."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, image: Image.Image) -> Any:
        return self.inner(to_rgb(image))

    def __repr__(self) -> str:
        return f"RGB then {self.inner!r}"


def build_transform(kind: str, data_cfg: DataConfig, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The transform for one use: a PIL image (any mode) -> (3, image_size, image_size) float32.

    Args:
        kind: "mae", "supervised" or "eval".
        train: False gives the eval transform whatever the kind (features, validation).
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform kind '{kind}': use one of {', '.join(TRANSFORM_KINDS)}.")
    if data_cfg.image_size <= 0:
        raise ValueError(f"data.image_size={data_cfg.image_size} must be positive.")
    if not train or kind == "eval":
        inner = _eval_transform(data_cfg)
    elif kind == "mae":
        inner = _mae_transform(data_cfg)
    else:
        inner = _supervised_transform(data_cfg)
    return _RGBThen(inner)


def own_transform(transform: Callable[[Image.Image], Any]) -> Callable[[Image.Image], Any]:
    """An objective's own training transform (its `train_transform`), fed RGB images like the built-in ones."""
    return _RGBThen(transform)
