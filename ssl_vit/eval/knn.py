"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

Features are L2-normalised; a query's neighbours are the k training features of highest cosine
similarity; each neighbour votes for its label with weight exp(sim / T), T = 0.07. Every k in `ks` is
answered from one neighbour search (the largest k). Queries are processed in chunks and the training
set is scanned in chunks with a running top-k, so memory is O(query_chunk * train_chunk) whatever the
dataset size (ImageNet's 1.28M training images included).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["knn_accuracy", "knn_predict", "run_knn", "topk_neighbours"]


def topk_neighbours(
    train: torch.Tensor, queries: torch.Tensor, k: int, train_chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar training rows of each query by dot product: (sims (Q, k), indices (Q, k)).

    Both inputs (N, D) / (Q, D) are expected normalised already. Sorted by decreasing similarity.
    """
    n = train.shape[0]
    k = min(k, n)
    best_s: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, n, train_chunk):
        sims = queries @ train[start : start + train_chunk].T  # (Q, T)
        s, i = sims.topk(min(k, sims.shape[1]), dim=1)
        i = i + start
        if best_s is not None:
            merged = torch.cat([best_s, s], dim=1)
            s, pos = merged.topk(min(k, merged.shape[1]), dim=1)  # merge with the running best
            i = torch.cat([best_i, i], dim=1).gather(1, pos)
        best_s, best_i = s, i
    assert best_s is not None and best_i is not None
    return best_s, best_i


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    ks: list[int] | tuple[int, ...] = (10, 20, 100, 200),
    temperature: float = 0.07,
    query_chunk: int = 256,
    train_chunk: int = 65536,
) -> dict[int, torch.Tensor]:
    """The top-5 classes (by weighted vote) of each query for every k: {k: (Q, min(5, C)) int64}.

    Args:
        train_features: (N, D); train_labels: (N,) in [0, num_classes); query_features: (Q, D).
        Computed on the device of `train_features`.
    """
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs training features: the train split is empty.")
    if min(ks) < 1:
        raise ValueError(f"knn.ks must be positive integers, got {list(ks)}.")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(device).long()
    k_max = min(max(ks), train.shape[0])
    n_top = min(5, num_classes)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, query_features.shape[0], query_chunk):
        q = F.normalize(query_features[start : start + query_chunk].to(device).float(), dim=1)
        sims, idx = topk_neighbours(train, q, k_max, train_chunk)  # (Q, K), sorted
        weights = (sims / temperature).exp()  # (Q, K)
        neighbour_labels = labels[idx]  # (Q, K)
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(q.shape[0], num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])  # (Q, C)
            preds[k].append(votes.topk(n_top, dim=1).indices.cpu())
    return {k: torch.cat(p) for k, p in preds.items()}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    **kwargs,
) -> dict[int, dict[str, float]]:
    """{k: {"top1", "top5"}} in percent; keyword arguments as `knn_predict`."""
    preds = knn_predict(train_features, train_labels, query_features, num_classes, **kwargs)
    y = query_labels.cpu().long().unsqueeze(1)  # (Q, 1)
    out = {}
    for k, p in preds.items():
        hits = p == y  # (Q, 5)
        out[k] = {
            "top1": 100.0 * hits[:, 0].double().mean().item(),
            "top5": 100.0 * hits.any(dim=1).double().mean().item(),
        }
    return out


def run_knn(cfg: Any) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint` by weighted kNN for every seed; writes and returns metrics.json.

    Every process holds the gathered features and computes the same neighbours (the search is small
    next to the feature pass), so the result does not depend on the number of processes.
    """
    from ssl_vit.engine.process import process_state

    from ssl_vit.config import save_config
    from ssl_vit.data import load_data
    from ssl_vit.eval.common import (
        check_eval_config,
        eval_seeds,
        eval_split_name,
        load_eval_backbone,
        make_accelerator,
        metrics_header,
        summarize_seeds,
        write_metrics,
    )
    from ssl_vit.eval.features import split_features

    start = time.perf_counter()
    check_eval_config(cfg)
    ks = sorted(set(cfg.knn.ks))
    if cfg.knn.report_k not in ks:
        raise ValueError(f"knn.report_k={cfg.knn.report_k} is not in knn.ks={ks}: add it to knn.ks or change report_k.")
    seeds = eval_seeds(cfg)
    with process_state().local_main_process_first():
        bundle = load_data(cfg.data, need_labels=True, seed=cfg.seed)
    accelerator = make_accelerator(cfg.output_dir, cfg.features.mixed_precision)
    model = None
    result: dict[int, dict[str, float]] | None = None
    per_seed, by_k_runs = [], []
    feature_seconds = knn_seconds = 0.0
    n_train = n_eval = 0
    for seed in seeds:
        # kNN of a saved checkpoint is deterministic: one search serves every seed. A random init is
        # redrawn per seed, so its spread is measured.
        if result is None or cfg.checkpoint == "random":
            model = load_eval_backbone(cfg.checkpoint, cfg.model, cfg.data, seed)
            t0 = time.perf_counter()
            train_f, train_y, _ = split_features(cfg, model, bundle, "train", seed, accelerator)
            eval_f, eval_y, _ = split_features(cfg, model, bundle, "eval", seed, accelerator)
            t1 = time.perf_counter()
            n_train, n_eval = len(train_y), len(eval_y)
            result = knn_accuracy(
                train_f.to(accelerator.device), train_y, eval_f, eval_y, bundle.num_classes, ks=ks,
                temperature=cfg.knn.temperature, query_chunk=cfg.knn.query_chunk, train_chunk=cfg.knn.train_chunk,
            )
            feature_seconds += t1 - t0
            knn_seconds += time.perf_counter() - t1
        best = result[cfg.knn.report_k]
        per_seed.append({"seed": seed, "top1": best["top1"], "top5": best["top5"]})
        by_k_runs.append(result)
        accelerator.log({f"knn/top1_k{k}": r["top1"] for k, r in result.items()}, step=seed)
    metrics = metrics_header("knn", cfg, model, eval_split_name(cfg.data, bundle))
    metrics.update(
        hyperparameters={
            "ks": ks, "report_k": cfg.knn.report_k, "temperature": cfg.knn.temperature,
            "pool": cfg.features.pool, "image_size": cfg.data.image_size, "normalize": "l2", "similarity": "cosine",
        },
        seeds=seeds,
        **summarize_seeds(per_seed),
        per_seed=per_seed,
        seconds=time.perf_counter() - start,
        feature_seconds=feature_seconds,
        knn_seconds=knn_seconds,
        n_train=n_train,
        n_eval=n_eval,
        by_k={str(k): sum(r[k]["top1"] for r in by_k_runs) / len(by_k_runs) for k in ks},
        by_k_top5={str(k): sum(r[k]["top5"] for r in by_k_runs) / len(by_k_runs) for k in ks},
    )
    if accelerator.is_main_process:
        write_metrics(cfg.output_dir, metrics)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    accelerator.end_training()
    accelerator.print(
        f"[ssl_vit] kNN (k={cfg.knn.report_k}) {metrics['method']} {metrics['model']} on {metrics['dataset']}: top-1 "
        f"{metrics['top1']:.2f} +- {metrics['top1_std']:.2f}; "
        + ", ".join(f"k={k}: {v:.2f}" for k, v in metrics["by_k"].items())
        + f"; {cfg.output_dir}/metrics.json"
    )
    return metrics
