"""Linear probe of a frozen backbone (MAE protocol): BatchNorm1d(affine=False) + Linear, LARS, cosine.

Two paths, `probe.mode`:
- "features" (fast, default): the frozen features are computed once (cached, no augmentation) and the
  heads train on them in memory; a learning-rate sweep trains one head per lr in the same pass, which
  is exact because the heads share only the parameter-free BatchNorm.
- "augment" (the paper's): augmented images go through the frozen backbone every step, trained by the
  shared engine (`Trainer`) with `LinearProbeObjective`. The backbone stays in eval mode with
  `requires_grad=False`: its weights and any BatchNorm statistics never change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_vit.config import ConfigError
from ssl_vit.eval.features import Pool, pool_features

__all__ = [
    "FrozenProbe",
    "LinearProbeObjective",
    "ProbeHeads",
    "evaluate_heads",
    "run_linear_probe",
    "train_probe_on_features",
]


class ProbeHeads(nn.Module):
    """`BatchNorm1d(D, affine=False, eps=1e-6)` then one Linear(D, C) per head: (B, D) -> (H, B, C)."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.heads = nn.ModuleList()
        for _ in range(num_heads):  # one at a time: head i's init is the same whatever the sweep's size
            head = nn.Linear(dim, num_classes)
            nn.init.trunc_normal_(head.weight, std=0.01)  # MAE's probe init
            nn.init.zeros_(head.bias)
            self.heads.append(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)  # (B, D)
        return torch.stack([head(x) for head in self.heads])  # (H, B, C)


def _feature_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "num_features", 0) or getattr(backbone, "embed_dim"))


@torch.no_grad()
def evaluate_heads(
    probe: ProbeHeads, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096
) -> list[dict[str, float]]:
    """Top-1 / top-5 (percent; top-k with k = min(5, C)) of each head on (N, D) features."""
    was_training = probe.training
    probe.eval()
    device = next(probe.parameters()).device
    hits1 = torch.zeros(len(probe.heads))
    hits5 = torch.zeros(len(probe.heads))
    for start in range(0, features.shape[0], batch_size):
        x = features[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device).view(1, -1, 1)  # (1, B, 1)
        logits = probe(x)  # (H, B, C)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (H, B, k)
        hits1 += (top[..., :1] == y).any(-1).sum(-1).cpu()
        hits5 += (top == y).any(-1).sum(-1).cpu()
    probe.train(was_training)
    n = max(features.shape[0], 1)
    return [{"top1": 100.0 * float(a) / n, "top5": 100.0 * float(b) / n} for a, b in zip(hits1, hits5)]


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device | str) -> Iterator[None]:
    """One intra-op thread for the probe's tiny CPU matmuls: a (256 x D) @ (D x C) step spends more on
    thread synchronisation than on arithmetic (measured ~4x faster on a busy 2-core machine)."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_probe_on_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    optim: Any,
    *,
    blrs: list[float],
    epochs: int,
    batch_size: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> ProbeHeads:
    """Train one probe head per base lr on fixed (N, D) features, no augmentation; returns the heads.

    Args:
        optim: an `OptimConfig` (name, weight_decay, momentum, betas, warmup_epochs/steps, min_lr).
        blrs: base lrs; head i peaks at lr = blrs[i] * batch / 256 (batch = min(batch_size, N)).
    The schedule is the engine's per-step warmup + cosine; batches drop the last partial one (as
    MAE's loader), so BatchNorm never normalises a handful of samples.
    """
    from ssl_vit.engine.optim import build_optimizer, cosine_schedule

    n, dim = train_features.shape
    if n < 2:
        raise ValueError(f"the probe needs at least 2 training samples, got {n}.")
    batch = min(batch_size, n)
    steps_per_epoch = n // batch
    total = epochs * steps_per_epoch
    warmup = optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = ProbeHeads(dim, num_classes, len(blrs)).to(device)
    groups = []
    for head, blr in zip(probe.heads, blrs):
        peak = blr * batch / 256
        groups.append({"params": [head.weight], "weight_decay": optim.weight_decay, "peak": peak})
        groups.append({"params": [head.bias], "weight_decay": 0.0, "peak": peak})
    opt = build_optimizer(groups, optim, 1.0, torch.device(device).type)
    features, labels = train_features.float(), train_labels.long()
    probe.train()
    step = 0
    with _one_cpu_thread(device):
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for it in range(steps_per_epoch):
                for group in opt.param_groups:
                    group["lr"] = cosine_schedule(
                        step, base_lr=group["peak"], total_steps=total, warmup_steps=warmup, min_lr=optim.min_lr
                    )
                idx = order[it * batch : (it + 1) * batch]
                x, y = features[idx].to(device), labels[idx].to(device)
                logits = probe(x)  # (H, B, C)
                # Summed over heads: each head's gradient is its own loss's (they share no parameter).
                losses = torch.stack([F.cross_entropy(lg, y) for lg in logits])  # (H,)
                opt.zero_grad(set_to_none=True)
                losses.sum().backward()
                opt.step()
                step += 1
                if log is not None and (step % 10 == 0 or step == total):
                    log(step, {f"probe/loss_blr{b:g}": float(v) for b, v in zip(blrs, losses.detach().cpu())})
    return probe


class FrozenProbe(nn.Module):
    """A classifier made of a frozen backbone (always in eval mode) and one probe head.

    `forward(x)` -> logits (B, C). `train()` never puts the backbone in training mode, so dropout and
    drop path stay off and BatchNorm statistics (convnet backbones) never update.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pool: Pool = "token") -> None:
        super().__init__()
        self.encoder = backbone.requires_grad_(False).eval()
        self.probe = ProbeHeads(_feature_dim(backbone), num_classes, 1)
        self.pool = pool
        self.num_classes = num_classes

    def train(self, mode: bool = True) -> "FrozenProbe":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = pool_features(self.encoder, x, self.pool)  # (B, D)
        return self.probe(feats.float())[0]  # (B, C)


class LinearProbeObjective(nn.Module):
    """The paper path as an objective for the shared engine: cross-entropy of a `FrozenProbe`.

    `backbone` (what the engine optimises, evaluates with `classify` and exports) is the FrozenProbe,
    whose only trainable parameters are the probe head's.
    """

    needs_labels = True
    transform = "mae"  # RandomResizedCrop + flip: MAE's linear-probe augmentation
    config_group = None

    def __init__(self, backbone: nn.Module, num_classes: int, pool: Pool = "token") -> None:
        super().__init__()
        self.backbone = FrozenProbe(backbone, num_classes, pool)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.backbone(batch["pixel_values"])  # (B, C)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels)
        top1 = (logits.detach().argmax(-1) == labels).float().mean() * 100
        return {"loss": loss, "top1": top1}


# ---------------------------------------------------------------------------------------------------
# The recipe


def _check_features_mode(cfg: Any) -> None:
    """The features probe trains train.epochs over cached features: the engine's step keys do not reach it."""
    if cfg.probe.mode != "features":
        return
    ignored = [f"train.{k}" for k in ("max_steps", "max_seconds", "schedule_epochs") if getattr(cfg.train, k) is not None]
    ignored += ["train.grad_accum_steps"] if cfg.train.grad_accum_steps != 1 else []
    if ignored:
        raise ConfigError(
            f"{', '.join(ignored)}: probe.mode=features trains the head for train.epochs over cached features "
            f"and does not read it. Remove it, set the length with train.epochs, or use probe.mode=augment."
        )
    if cfg.optim.warmup_steps is None and cfg.optim.warmup_epochs >= cfg.train.epochs:
        raise ConfigError(
            f"optim.warmup_epochs={cfg.optim.warmup_epochs:g} is the whole probe (train.epochs={cfg.train.epochs}): "
            f"the lr would never leave its warm-up. Lower optim.warmup_epochs or raise train.epochs."
        )


def _sweep_blrs(cfg: Any) -> list[float]:
    if cfg.probe.lrs:
        if len(set(cfg.probe.lrs)) != len(cfg.probe.lrs) or min(cfg.probe.lrs) <= 0:
            raise ValueError(f"probe.lrs={cfg.probe.lrs} must be distinct positive base lrs, e.g. [0.05, 0.1, 0.2].")
        return list(cfg.probe.lrs)
    return [cfg.optim.blr]


def _run_features(cfg: Any, seeds: list[int], bundle: Any, accelerator: Any) -> tuple[list[list[dict]], dict]:
    """The fast path: per lr, per seed {"seed", "top1", "top5"}; plus sizes and timings."""
    from ssl_vit.eval.common import load_eval_backbone
    from ssl_vit.eval.features import split_features

    blrs = _sweep_blrs(cfg)
    per_lr: list[list[dict[str, float]]] = [[] for _ in blrs]
    info: dict[str, Any] = {"feature_seconds": 0.0, "probe_seconds": 0.0}
    model = None
    for seed in seeds:
        # A saved checkpoint's features are the same for every seed (seeds change the head's init and
        # the batch order); a random init is redrawn per seed.
        if model is None or cfg.checkpoint == "random":
            model = load_eval_backbone(cfg.checkpoint, cfg.model, cfg.data, seed)
            t0 = time.perf_counter()
            train_f, train_y, _ = split_features(cfg, model, bundle, "train", seed, accelerator)
            eval_f, eval_y, _ = split_features(cfg, model, bundle, "eval", seed, accelerator)
            info["feature_seconds"] += time.perf_counter() - t0
            info.update(n_train=len(train_y), n_eval=len(eval_y), model=model)
            if cfg.optim.lr is not None and not cfg.probe.lrs:  # an absolute lr: the base lr that gives it
                blrs = [cfg.optim.lr * 256 / min(cfg.train.batch_size, len(train_y))]
        t1 = time.perf_counter()

        def log(step: int, values: dict[str, float], seed: int = seed) -> None:
            accelerator.log({f"seed{seed}/{k}": v for k, v in values.items()}, step=step)

        # Every process trains the same heads on the same gathered features: identical results, no sync.
        probe = train_probe_on_features(
            train_f, train_y, bundle.num_classes, cfg.optim, blrs=blrs, epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size, seed=seed, device=accelerator.device, log=log,
        )
        for i, result in enumerate(evaluate_heads(probe, eval_f, eval_y)):
            per_lr[i].append({"seed": seed, **result})
            accelerator.log({f"probe/top1_blr{blrs[i]:g}": result["top1"]}, step=seed)
        info["probe_seconds"] += time.perf_counter() - t1
    info["batch"] = min(cfg.train.batch_size, info["n_train"])
    info["blrs"] = blrs
    return per_lr, info


def _size(dataset: Any) -> int | None:
    """Rows of a dataset; None for streamed data (no length)."""
    return len(dataset) if hasattr(dataset, "__len__") else None


def _run_augment(cfg: Any, seeds: list[int], bundle: Any) -> tuple[list[list[dict]], dict]:
    """The paper path: one engine run per (lr, seed) under output_dir/[blr_<b>/]seed_<s>."""
    from ssl_vit.data import make_loader
    from ssl_vit.engine import Trainer
    from ssl_vit.eval.common import load_eval_backbone

    blrs = _sweep_blrs(cfg)
    per_lr: list[list[dict[str, float]]] = [[] for _ in blrs]
    info: dict[str, Any] = {"n_train": _size(bundle.train), "n_eval": _size(bundle.eval)}
    for i, blr in enumerate(blrs):
        for seed in seeds:
            out = Path(cfg.output_dir) / (f"blr_{blr:g}" if len(blrs) > 1 else "") / f"seed_{seed}"
            optim = dataclasses.replace(cfg.optim, blr=blr, lr=cfg.optim.lr if len(blrs) == 1 else None)
            run_cfg = dataclasses.replace(cfg, seed=seed, seeds=[seed], output_dir=str(out), optim=optim)
            model = load_eval_backbone(cfg.checkpoint, cfg.model, cfg.data, seed)
            torch.manual_seed(seed)  # the head's init
            objective = LinearProbeObjective(model, bundle.num_classes, cfg.features.pool)
            train_loader = make_loader(bundle, "train", LinearProbeObjective.transform, cfg.train.batch_size,
                                       train=True, seed=seed)
            eval_loader = make_loader(bundle, "eval", "eval", cfg.features.batch_size, train=False)
            trainer = Trainer(run_cfg, objective, train_loader, eval_loader)
            summary = trainer.fit()
            per_lr[i].append({"seed": seed, "top1": summary["top1"], "top5": summary["top5"]})
            info.update(model=model, batch=trainer.effective_batch)
    return per_lr, info


def run_linear_probe(cfg: Any) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint` by linear probe for every seed (and lr); writes and returns metrics.json."""
    from ssl_vit.engine.process import process_state

    from ssl_vit.config import save_config
    from ssl_vit.data import load_data
    from ssl_vit.eval.common import (
        check_eval_config,
        eval_seeds,
        eval_split_name,
        make_accelerator,
        metrics_header,
        summarize_seeds,
        write_metrics,
    )

    start = time.perf_counter()
    check_eval_config(cfg)
    _check_features_mode(cfg)
    seeds = eval_seeds(cfg)
    blrs = _sweep_blrs(cfg)
    with process_state().local_main_process_first():
        bundle = load_data(cfg.data, need_labels=True, seed=cfg.seed)
    if cfg.probe.mode == "augment":
        per_lr, info = _run_augment(cfg, seeds, bundle)
        accelerator = make_accelerator(cfg.output_dir, cfg.train.mixed_precision)
    else:
        accelerator = make_accelerator(cfg.output_dir, cfg.features.mixed_precision)
        per_lr, info = _run_features(cfg, seeds, bundle, accelerator)
    batch = info["batch"]
    blrs = info.get("blrs", blrs)
    sweep = []
    for blr, runs in zip(blrs, per_lr):
        lr = cfg.optim.lr if (cfg.optim.lr is not None and len(blrs) == 1 and cfg.probe.mode == "augment") else blr * batch / 256
        sweep.append({"blr": blr, "lr": lr, **summarize_seeds(runs), "per_seed": runs})
    best = max(range(len(sweep)), key=lambda i: sweep[i]["top1"])
    metrics = metrics_header("linear_probe", cfg, info.get("model"), eval_split_name(cfg.data, bundle))
    metrics.update(
        hyperparameters={
            "mode": cfg.probe.mode, "pool": cfg.features.pool, "epochs": cfg.train.epochs,
            "max_steps": cfg.train.max_steps if cfg.probe.mode == "augment" else None, "batch_size": batch,
            "optimizer": cfg.optim.name, "blr": blrs[best], "lr": sweep[best]["lr"],
            "weight_decay": cfg.optim.weight_decay, "warmup_epochs": cfg.optim.warmup_epochs,
            "min_lr": cfg.optim.min_lr, "image_size": cfg.data.image_size, "head": "BatchNorm1d(affine=False)+Linear",
        },
        seeds=seeds,
        **{k: sweep[best][k] for k in ("top1", "top5", "top1_std", "top5_std", "per_seed")},
        seconds=time.perf_counter() - start,
        n_train=info["n_train"],
        n_eval=info["n_eval"],
    )
    for key in ("feature_seconds", "probe_seconds"):
        if key in info:
            metrics[key] = info[key]
    if len(blrs) > 1:
        metrics["sweep"] = sweep
        metrics["best_blr"] = blrs[best]
    accelerator.log({"probe/top1": metrics["top1"], "probe/top5": metrics["top5"]}, step=0)
    if accelerator.is_main_process:
        write_metrics(cfg.output_dir, metrics)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    accelerator.end_training()
    accelerator.print(
        f"[ssl_vit] linear probe ({cfg.probe.mode}) of {metrics['method']} {metrics['model']} on "
        f"{metrics['dataset']}: top-1 {metrics['top1']:.2f} +- {metrics['top1_std']:.2f} (blr {blrs[best]:g}, "
        f"{len(seeds)} seed(s), {metrics['seconds']:.0f} s). {cfg.output_dir}/metrics.json"
    )
    return metrics
