"""The `data.*` config group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    # "synthetic" (built in), a local folder/file (parquet, image folder, save_to_disk), or a Hub id.
    name: str = "synthetic"
    image_size: int = 32
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    train_split: str = "train"
    # None: use the data's own validation/test split, else carve `val_fraction` from train.
    eval_split: Optional[str] = None
    val_fraction: float = 0.1
    streaming: bool = False
    num_workers: int = 2
    skip_corrupt: bool = False
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
