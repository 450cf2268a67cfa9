"""What the three evaluations share: the backbone to judge, seeds, checkpoint metadata, metrics.json.

metrics.json is read by `tools/compare.py`; its keys are a contract (docs/architecture.md):
protocol, method, checkpoint, model, dataset, split, hyperparameters, seeds, top1, top5, top1_std,
top5_std, per_seed [{seed, top1, top5}], seconds, n_train, n_eval, pretrain, plus protocol extras.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ssl_vit.config import ConfigError, config_to_dict
from ssl_vit.engine.checkpoint import run_backbone_file
from ssl_vit.engine.process import fresh_accelerator

__all__ = [
    "check_eval_config",
    "checkpoint_info",
    "eval_seeds",
    "eval_split_name",
    "load_eval_backbone",
    "make_accelerator",
    "metrics_header",
    "summarize_seeds",
    "write_metrics",
]

_PRETRAIN_KEYS = ("steps", "images_seen", "seconds", "images_per_sec")


def eval_seeds(cfg: Any) -> list[int]:
    """The seeds to repeat an evaluation with: `seeds` when given, else `[seed]`."""
    seeds = list(cfg.seeds) if cfg.seeds else [cfg.seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds} repeat a value: give distinct seeds (e.g. --seeds 0 1 2).")
    return seeds


def checkpoint_info(checkpoint: str) -> dict[str, Any]:
    """`method` (the pretraining objective, "random" or "external") and `pretrain` stats of a checkpoint.

    Read from the `backbone.json` this suite writes next to `backbone.safetensors`; checkpoints from
    elsewhere (timm, official MAE/DeiT files) are "external" with no pretraining stats.
    """
    if checkpoint == "random":
        return {"method": "random", "pretrain": {}, "backbone_json": None}
    own = run_backbone_file(Path(checkpoint).expanduser())  # e.g. exported/foo.safetensors + foo.json
    meta_path = own.with_suffix(".json") if own is not None else None
    meta: dict[str, Any] | None = None
    if meta_path is not None:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = None
    if not isinstance(meta, dict):
        return {"method": "external", "pretrain": {}, "backbone_json": None}
    # Stats may sit at the top level or under a "summary"/"pretrain" mapping; "step" counts as steps.
    sources = [meta] + [meta[k] for k in ("summary", "pretrain") if isinstance(meta.get(k), dict)]
    pretrain: dict[str, Any] = {}
    for source in sources:
        for key in _PRETRAIN_KEYS:
            if key in source and key not in pretrain:
                pretrain[key] = source[key]
        if "steps" not in pretrain and "step" in source:
            pretrain["steps"] = source["step"]
    method = meta.get("objective")
    if isinstance(method, dict):
        method = method.get("name")
    return {"method": str(method) if method else "external", "pretrain": pretrain, "backbone_json": meta}


def check_eval_config(cfg: Any) -> None:
    """Settings an evaluation cannot honour, refused before any work with the fix."""
    if getattr(cfg.model, "checkpoint", None):
        raise ConfigError(
            f"model.checkpoint={cfg.model.checkpoint!r} is a pretraining setting: the eval recipes take "
            f"checkpoint={cfg.model.checkpoint} (top level) and leave model.checkpoint unset."
        )


@dataclasses.dataclass
class _ImageSizeOnly:
    """What `load_backbone` may change in a saved architecture for frozen features: the image size."""

    img_size: int
    drop_path_rate: None = None
    global_pool: None = None


def load_eval_backbone(
    checkpoint: str, model_cfg: Any, data_cfg: Any, seed: int, num_classes: int = 0, frozen: bool = True
) -> nn.Module:
    """The backbone to judge: `checkpoint` through `ssl_vit.engine.load_backbone`, or a random init.

    A random backbone is `model.*` drawn from `seed`, so that repeating with several seeds measures
    the spread of the random-init floor too. The image size defaults to `data.image_size`.
    `frozen=True` (kNN, probe): a checkpoint keeps its saved pooling, drop path and head (only the
    image size follows the config). `frozen=False` (fine-tune): `model.global_pool`, `model.drop_path_rate`
    and a `num_classes` head apply too, and the position embedding is learned from the checkpoint's values.
    """
    from ssl_vit.engine import load_backbone

    img_size = model_cfg.img_size or data_cfg.image_size
    model_cfg = dataclasses.replace(model_cfg, img_size=img_size)
    if checkpoint == "random":
        torch.manual_seed(seed)
        return load_backbone("random", model_cfg, num_classes=num_classes)
    if frozen:  # the saved head stays (features are pre-logits, it is never used): a strict load of any model
        return load_backbone(checkpoint, _ImageSizeOnly(img_size), num_classes=None)
    # Fine-tuning learns the position embedding, starting from the checkpoint's values (MAE's fixed
    # sin-cos ones included), as facebookresearch/mae and DeiT fine-tune.
    return load_backbone(checkpoint, model_cfg, num_classes=num_classes, pos_embed="learn")


def make_accelerator(output_dir: str | Path, mixed_precision: str | None = None) -> Any:
    """A fresh Accelerator that logs to TensorBoard under `output_dir/tb` (as the engine does)."""
    accelerator = fresh_accelerator(mixed_precision=mixed_precision, log_with="tensorboard", project_dir=str(output_dir))
    accelerator.init_trackers("tb")
    return accelerator


def eval_split_name(data_cfg: Any, bundle: Any = None) -> str:
    """The eval split as the table shows it: its name, or how it was carved from the train split."""
    if bundle is not None and getattr(bundle, "eval_carved", False):
        return f"{data_cfg.train_split}[carved val {data_cfg.val_fraction:g}, split_seed {data_cfg.split_seed}]"
    if data_cfg.eval_split:
        return data_cfg.eval_split
    own = getattr(getattr(bundle, "eval", None), "split", None)  # the data's own validation/test split
    return str(own) if own else "eval"


def summarize_seeds(per_seed: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one seed) of top1 / top5 over seeds."""

    def mean_std(values: list[float]) -> tuple[float, float]:
        m = sum(values) / len(values)
        var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        return m, math.sqrt(var)

    top1, top1_std = mean_std([float(r["top1"]) for r in per_seed])
    top5, top5_std = mean_std([float(r["top5"]) for r in per_seed])
    return {"top1": top1, "top5": top5, "top1_std": top1_std, "top5_std": top5_std}


def metrics_header(protocol: str, cfg: Any, model: nn.Module | None, split: str) -> dict[str, Any]:
    """The keys every metrics.json starts with (the rest is filled by the protocol)."""
    info = checkpoint_info(cfg.checkpoint)
    spec = getattr(model, "spec", None) or {}
    return {
        "protocol": protocol,
        "method": info["method"],
        "checkpoint": str(cfg.checkpoint),
        "model": str(spec.get("name") or cfg.model.name),
        "dataset": str(cfg.data.name),
        "split": split,
        "pretrain": info["pretrain"],
    }


def write_metrics(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `output_dir/metrics.json` atomically (a reader never sees half a file)."""
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"metrics.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=False, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to metrics.json")
