"""Frozen features of a backbone over a dataset split: one pass, gathered across processes, cached.

`extract_features` runs the backbone in eval mode under `torch.inference_mode`, pools each image to one
vector, and gathers the vectors of every process with `gather_for_metrics` (accelerate trims the
samples it repeated to even out the last batch, so nothing is duplicated or dropped and the order is
the loader's). `cached_features` stores the result as safetensors under a key made from everything
that changes the numbers: the checkpoint file, the backbone spec, the data config, the split, the
transform and the pooling.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

__all__ = [
    "checkpoint_fingerprint",
    "cached_features",
    "extract_features",
    "feature_cache_key",
    "pool_features",
    "split_features",
]

Pool = Literal["token", "avg"]
_CACHE_FORMAT = 1  # bump when the cached content changes meaning


def pool_features(model: nn.Module, x: torch.Tensor, pool: Pool = "token") -> torch.Tensor:
    """One vector per image: (B, 3, H, W) -> (B, D).

    "token": the class token as timm's `forward_head(pre_logits=True)` returns it for a class-token
    backbone (a distilled backbone averages its class and distillation tokens, as timm does).
    "avg": the mean of the patch tokens. When the backbone's own `global_pool` is the asked pooling
    its `forward_head(pre_logits=True)` is used (so an avg-pool backbone keeps its fc_norm).
    Models without a token sequence (convnets) always use their own pooling.
    """
    feats = model.forward_features(x)
    prefix = getattr(model, "num_prefix_tokens", None)
    if feats.ndim != 3 or prefix is None or getattr(model, "global_pool", pool) == pool:
        return model.forward_head(feats, pre_logits=True)
    if pool == "token":
        return feats[:, 0]  # (B, D)
    if pool == "avg":
        return feats[:, prefix:].mean(dim=1)  # (B, D)
    raise ValueError(f"unknown pooling {pool!r}: use 'token' or 'avg'.")


def _is_prepared(loader: Any) -> bool:
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    return isinstance(loader, (DataLoaderShard, DataLoaderDispatcher))


def extract_features(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    accelerator: Any,
    pool: Pool = "token",
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of `loader`, in its order, on every process.

    Args:
        loader: dict batches with `pixel_values` (B, 3, H, W) and optionally `labels` (B,); prepared
            here by `accelerator` (sharded across processes) unless it already is.
    Returns: features (N, D) float32 and labels (N,) int64 (-1 where the data has none), on CPU.
    """
    if not _is_prepared(loader):
        loader = accelerator.prepare_data_loader(loader)
    was_training = model.training
    model.eval()
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.inference_mode():
            for batch in loader:
                x = batch["pixel_values"].to(accelerator.device)
                with accelerator.autocast():
                    f = pool_features(model, x, pool).float()  # (B, D)
                y = batch.get("labels")
                y = torch.full((f.shape[0],), -1, dtype=torch.long, device=f.device) if y is None else y.to(f.device)
                f, y = accelerator.gather_for_metrics((f.contiguous(), y.long().contiguous()))
                chunks.append((f.cpu(), y.cpu()))
                if progress is not None:
                    progress(len(f))
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("the loader yielded no batches: the split is empty; check data.* (split names, val_fraction).")
    # Concatenated outside inference mode: ordinary tensors that a probe can train on.
    feats = torch.cat([c[0] for c in chunks]).clone()
    labels = torch.cat([c[1] for c in chunks]).clone()
    return feats, labels


def checkpoint_fingerprint(checkpoint: str) -> dict[str, Any]:
    """What identifies a checkpoint's weights cheaply: resolved path, size and mtime of its files.

    A run's output_dir is identified by its `backbone.safetensors` (+ `backbone.json`); any other folder
    by the files directly in it. "random" has no file (its spec and seed go into the key instead).
    """
    if checkpoint == "random":
        return {"checkpoint": "random"}
    path = Path(checkpoint).expanduser().resolve()
    if path.is_dir():
        exported = [path / "backbone.safetensors", path / "backbone.json"]
        files = [p for p in exported if p.is_file()] or sorted(p for p in path.iterdir() if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(
            f"checkpoint '{checkpoint}' not found: give a run's output_dir, a backbone.safetensors, a "
            f"timm/MAE/DeiT checkpoint file, or checkpoint=random."
        )
    stats = []
    for p in files:
        st = p.stat()
        stats.append([p.name, st.st_size, st.st_mtime_ns])
    return {"checkpoint": str(path), "files": stats}


def feature_cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description of everything that changes the features."""
    blob = json.dumps({"format": _CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_features(
    cache_dir: str | Path | None,
    key_parts: dict[str, Any],
    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    accelerator: Any,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """`compute()` once per key: read from `cache_dir` when there, else compute and store it.

    Every process computes (the feature pass is collective), the main process writes the file
    atomically, and all wait for it. Returns (features, labels, hit).
    """
    if cache_dir is None:
        feats, labels = compute()
        return feats, labels, False
    key = feature_cache_key(key_parts)
    path = Path(cache_dir) / f"{key_parts.get('split', 'features')}-{key}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(str(path))
            return tensors["features"], tensors["labels"], True
        except Exception as err:  # a truncated or foreign file: recompute rather than fail the eval
            accelerator.print(f"feature cache {path} unreadable ({err}); recomputing")
    accelerator.wait_for_everyone()  # every process decided to compute before anyone writes
    feats, labels = compute()
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        meta = {"key": json.dumps(key_parts, sort_keys=True, default=str)}
        save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)
    accelerator.wait_for_everyone()
    return feats, labels, False


def _feature_key(cfg: Any, model: nn.Module, split: str, seed: int, precision: str) -> dict[str, Any]:
    from ssl_vit.config import config_to_dict

    data = {k: v for k, v in config_to_dict(cfg.data).items() if k not in ("num_workers",)}
    return {
        "checkpoint": checkpoint_fingerprint(cfg.checkpoint),
        "spec": getattr(model, "spec", None),
        "random_seed": seed if cfg.checkpoint == "random" else None,
        "data": data,
        "split": split,
        "transform": "eval",
        "pool": cfg.features.pool,
        "precision": precision,
    }


def split_features(cfg: Any, model: nn.Module, bundle: Any, split: str, seed: int, accelerator: Any):
    """(features, labels, cache hit) of one split: eval transform, cached under `features.cache_dir`."""
    from ssl_vit.data import make_loader

    def compute():
        loader = make_loader(bundle, split, "eval", cfg.features.batch_size, train=False)
        return extract_features(model.to(accelerator.device), loader, accelerator, cfg.features.pool)

    key = _feature_key(cfg, model, split, seed, str(accelerator.mixed_precision))
    return cached_features(cfg.features.cache_dir, key, compute, accelerator)
