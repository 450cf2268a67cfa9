"""The backbone a picture is drawn from: a checkpoint of any supported format, or a random initialisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ssl_vit.viz.images import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["VizModel", "load_viz_model"]


@dataclass
class VizModel:
    backbone: torch.nn.Module
    label: str  # what to print in a figure title
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_viz_model(
    checkpoint: str, model: str = "vit_nano_patch4_32", pos_embed: str = "learn", seed: int = 0
) -> VizModel:
    """`checkpoint`: "random" (a fresh `model`, learned or sin-cos positions) or any path tools/convert.py reads."""
    from ssl_vit.models import create_backbone

    if checkpoint == "random":
        torch.manual_seed(seed)
        backbone = create_backbone(model, pos_embed=pos_embed).eval()
        return VizModel(backbone, f"{model}, random init ({pos_embed} positions)", IMAGENET_MEAN, IMAGENET_STD)
    from ssl_vit.interop import build_backbone

    backbone, info = build_backbone(checkpoint)
    mean, std = info.mean_std() or (IMAGENET_MEAN, IMAGENET_STD)
    objective = info.metadata.get("objective") if info.format == "ssl_vit" else f"imported {info.format}"
    step = info.metadata.get("step")
    where = Path(checkpoint).name or str(checkpoint)
    label = f"{info.spec['name']} from {where} ({objective}" + (f", step {step})" if step else ")")
    return VizModel(backbone, label, tuple(mean), tuple(std))
