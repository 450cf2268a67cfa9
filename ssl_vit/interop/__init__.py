"""Checkpoints in and out: import timm / DeiT / MAE / Hugging Face weights, export to timm and the Hub."""

from ssl_vit.interop.convert import (
    FORMATS,
    ImportInfo,
    UnknownCheckpointError,
    build_backbone,
    save_ours,
    to_backbone_state_dict,
)
from ssl_vit.interop.safe_load import UnsafeCheckpointError, load_tensors

__all__ = [
    "FORMATS",
    "ImportInfo",
    "UnknownCheckpointError",
    "UnsafeCheckpointError",
    "build_backbone",
    "load_tensors",
    "save_ours",
    "to_backbone_state_dict",
]
