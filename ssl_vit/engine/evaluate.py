"""Classification accuracy over a loader, across processes (each sample counted exactly once)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["classify"]


def _is_prepared(loader: Any) -> bool:
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    return isinstance(loader, (DataLoaderShard, DataLoaderDispatcher))


@torch.no_grad()
def classify(model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in %) of `model(pixel_values)` logits against `labels`.

    Args:
        model: maps (B, 3, H, W) to logits (B, C); put in eval mode for the pass, then restored.
        loader: dict batches with `pixel_values` and `labels`; prepared by `accelerator` if it is not yet.
        accelerator: the run's Accelerator; `gather_for_metrics` drops the samples Accelerate repeats
            to even out the last batch across processes.
    Returns: {"top1", "top5", "n"} (top-5 is top-k with k = min(5, C)).
    """
    if not _is_prepared(loader):
        loader = accelerator.prepare_data_loader(loader)
    was_training = model.training
    model.eval()
    hits1: list[torch.Tensor] = []
    hits5: list[torch.Tensor] = []
    try:
        for batch in loader:
            if "labels" not in batch:
                raise ValueError("classify needs labelled batches (a 'labels' entry): the eval data has no labels.")
            with accelerator.autocast():
                logits = model(batch["pixel_values"])  # (B, C)
            labels = batch["labels"]  # (B,)
            k = min(5, logits.shape[-1])
            topk = logits.float().topk(k, dim=-1).indices  # (B, k)
            correct = topk == labels.unsqueeze(-1)  # (B, k)
            c1, c5 = accelerator.gather_for_metrics((correct[:, 0], correct.any(dim=-1)))
            hits1.append(c1.cpu())
            hits5.append(c5.cpu())
    finally:
        model.train(was_training)
    if not hits1:
        return {"top1": float("nan"), "top5": float("nan"), "n": 0}
    h1 = torch.cat(hits1).float()
    h5 = torch.cat(hits5).float()
    return {"top1": 100.0 * h1.mean().item(), "top5": 100.0 * h5.mean().item(), "n": int(h1.numel())}
