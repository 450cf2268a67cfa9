"""Test helpers for the tools: a tiny run dir as the trainer writes it, and importing tools/*.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import save_file

from ssl_vit.models import create_backbone

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_run(run_dir: Path, *, objective: str = "mae", metrics: dict | None = None, **overrides) -> Path:
    """backbone.safetensors + backbone.json of a tiny random backbone (the engine's checkpoint layout)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    spec = dict(name="vit_nano_patch4_32", depth=2, img_size=16, num_classes=0, pos_embed="sincos") | overrides
    backbone = create_backbone(**spec)
    save_file(backbone.state_dict(), str(run_dir / "backbone.safetensors"))
    config = {
        "data": {"name": "synthetic", "image_size": spec["img_size"], "mean": [0.5] * 3, "std": [0.25] * 3},
        "train": {"batch_size": 8, "grad_accum_steps": 2},
        "objective": {"name": objective},
    }
    meta = {"model": backbone.spec, "objective": objective, "step": 30, "config": config}
    (run_dir / "backbone.json").write_text(json.dumps(meta))
    if metrics is not None:
        (run_dir / "eval").mkdir(exist_ok=True)
        (run_dir / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return run_dir
