"""The `data.*` config group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ssl_vit.accepts import Range, at_least, between, each, non_negative, positive, probability, setting

# The ImageNet normalisation every paper's recipe uses (and timm's IMAGENET_DEFAULT_MEAN / _STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    # "synthetic" (built in), a local folder/file (parquet, image folder, save_to_disk), or a Hub id.
    name: str = "synthetic"
    image_size: int = setting(32, at_least(1), 'pixels per side')
    # None: detect (image: image/img/pixel_values/jpg/..., label: label/labels/fine_label/cls/...).
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    train_split: str = "train"
    # None: use the data's own validation/test split, else carve `val_fraction` from train.
    eval_split: Optional[str] = None
    val_fraction: float = setting(0.1, Range(0, 1, high_open=True), 'the share of train carved as eval split')
    # Seed of the carved eval split. Fixed apart from the run seed on purpose: a pretraining run and
    # the probes of its checkpoint must hold out the same images whatever seeds they run with.
    split_seed: int = setting(0, non_negative())
    # None: from the label column's ClassLabel (else its distinct values). Needed for streamed data
    # whose label column is a plain integer.
    num_classes: Optional[int] = setting(None, at_least(1))
    streaming: bool = False
    # Streaming only: rows held in the shuffle buffer (datasets' IterableDataset.shuffle).
    shuffle_buffer: int = setting(10_000, at_least(1), 'rows in the streaming shuffle buffer')
    # Where `datasets` keeps downloads and Arrow caches; None: its default (~/.cache/huggingface).
    cache_dir: Optional[str] = None
    num_workers: int = setting(2, non_negative(), 'DataLoader worker processes')
    # None: pin host memory when a GPU is present.
    pin_memory: Optional[bool] = None
    skip_corrupt: bool = False
    # DeiT's repeated augmentation: each training image appears this many times in a row per epoch
    # (differently augmented), the epoch keeping its length (make_loader's repeated_aug; DeiT uses 3).
    repeated_aug: int = setting(1, at_least(1), 'times each image appears per epoch')
    mean: tuple[float, ...] = setting(IMAGENET_MEAN, each(between(0, 1)), "per-channel mean of the normalisation")
    std: tuple[float, ...] = setting(IMAGENET_STD, each(positive()), 'per-channel std of the normalisation')

    # Transforms (../shared/PROTOCOLS.md). RandomResizedCrop's smallest area fraction; None: the
    # paper value of each transform (MAE 0.2, DeiT/timm 0.08).
    crop_scale_min: Optional[float] = setting(None, Range(0, 1, low_open=True), "the smallest crop's area fraction")
    interpolation: str = "bicubic"
    hflip: float = setting(0.5, probability(), 'probability of a horizontal flip')
    # Supervised/DeiT/fine-tune transform: timm's RandAugment spec ("" or null: off), random erasing.
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = setting(0.25, probability(), 'random-erasing probability')
    remode: str = "pixel"
    recount: int = setting(1, at_least(1), 'random-erasing boxes')
    # timm applies colour jitter only when auto_augment is off.
    color_jitter: Optional[float] = setting(0.4, non_negative())
    # Eval transform: resize to image_size / crop_pct, then center-crop image_size (ImageNet: 0.875;
    # 1.0 keeps small images whole).
    crop_pct: float = setting(1.0, Range(0, 1, low_open=True), 'eval centre-crop fraction')

    # The built-in `synthetic` dataset (ssl_vit/data/synthetic.py): sizes of its splits and its seed.
    synthetic_train_size: int = setting(5000, at_least(1))
    synthetic_eval_size: int = setting(1000, non_negative())
    synthetic_seed: int = setting(0, non_negative())
