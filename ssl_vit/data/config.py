"""The `data.*` config group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# The ImageNet normalisation every paper's recipe uses (and timm's IMAGENET_DEFAULT_MEAN / _STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    # "synthetic" (built in), a local folder/file (parquet, image folder, save_to_disk), or a Hub id.
    name: str = "synthetic"
    image_size: int = 32
    # None: detect (image: image/img/pixel_values/jpg/..., label: label/labels/fine_label/cls/...).
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    train_split: str = "train"
    # None: use the data's own validation/test split, else carve `val_fraction` from train.
    eval_split: Optional[str] = None
    val_fraction: float = 0.1
    # Seed of the carved eval split. Fixed apart from the run seed on purpose: a pretraining run and
    # the probes of its checkpoint must hold out the same images whatever seeds they run with.
    split_seed: int = 0
    # None: from the label column's ClassLabel (else its distinct values). Needed for streamed data
    # whose label column is a plain integer.
    num_classes: Optional[int] = None
    streaming: bool = False
    # Streaming only: rows held in the shuffle buffer (datasets' IterableDataset.shuffle).
    shuffle_buffer: int = 10_000
    # Where `datasets` keeps downloads and Arrow caches; None: its default (~/.cache/huggingface).
    cache_dir: Optional[str] = None
    num_workers: int = 2
    # None: pin host memory when a GPU is present.
    pin_memory: Optional[bool] = None
    skip_corrupt: bool = False
    # DeiT's repeated augmentation: each training image appears this many times in a row per epoch
    # (differently augmented), the epoch keeping its length (make_loader's repeated_aug; DeiT uses 3).
    repeated_aug: int = 1
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    # Transforms (../shared/PROTOCOLS.md). RandomResizedCrop's smallest area fraction; None: the
    # paper value of each transform (MAE 0.2, DeiT/timm 0.08).
    crop_scale_min: Optional[float] = None
    interpolation: str = "bicubic"
    hflip: float = 0.5
    # Supervised/DeiT/fine-tune transform: timm's RandAugment spec ("" or null: off), random erasing.
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    # timm applies colour jitter only when auto_augment is off.
    color_jitter: Optional[float] = 0.4
    # Eval transform: resize to image_size / crop_pct, then center-crop image_size (ImageNet: 0.875;
    # 1.0 keeps small images whole).
    crop_pct: float = 1.0

    # The built-in `synthetic` dataset (ssl_vit/data/synthetic.py): sizes of its splits and its seed.
    synthetic_train_size: int = 5000
    synthetic_eval_size: int = 1000
    synthetic_seed: int = 0
