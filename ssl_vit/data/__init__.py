"""Data for every recipe: sources -> DataBundle (`load_data`), transforms, DataLoaders (`make_loader`).

    bundle = load_data(cfg.data, need_labels=objective.needs_labels, seed=cfg.seed)
    loader = make_loader(bundle, "train", "mae", batch_size=64, train=True, seed=cfg.seed)
    for batch in loader:  # {"pixel_values": (B, 3, H, W) float32, "labels": (B,) int64}
        ...
"""

from ssl_vit.data.config import DataConfig
from ssl_vit.data.loader import ShuffleSampler, collate, decode_image, make_loader
from ssl_vit.data.sources import DataBundle, DataError, detect_image_column, detect_label_column, load_data
from ssl_vit.data.synthetic import SHAPES, make_synthetic
from ssl_vit.data.transforms import TRANSFORM_KINDS, build_transform, to_rgb

__all__ = [
    "SHAPES",
    "TRANSFORM_KINDS",
    "DataBundle",
    "DataConfig",
    "DataError",
    "ShuffleSampler",
    "build_transform",
    "collate",
    "decode_image",
    "detect_image_column",
    "detect_label_column",
    "load_data",
    "make_loader",
    "make_synthetic",
    "to_rgb",
]
