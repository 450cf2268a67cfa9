"""Full fine-tuning of a checkpoint through the shared engine (MAE's protocol), no loop of its own.

The loaded backbone gets a fresh head (MAE's init: trunc-normal std 2e-5) and trains with the
`supervised` objective (label smoothing, mixup / cutmix) on the data pipeline's `supervised` transform
(RandAugment, random erasing), layer-wise lr decay (`optim.layer_decay`), drop path
(`model.drop_path_rate`), optional global average pooling + fc_norm (`model.global_pool=avg`) and EMA
(`train.ema`). Each seed is one engine run in `output_dir/seed_<s>/`; `train.resume=auto` continues an
interrupted one, and a finished one is only re-evaluated.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["build_finetune_objective", "fresh_head", "run_finetune"]


def fresh_head(backbone: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier by a new `num_classes` one, initialised as MAE's fine-tuning does."""
    backbone.reset_classifier(num_classes)
    for name in ("head", "head_dist"):
        head = getattr(backbone, name, None)
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=2e-5)
            nn.init.zeros_(head.bias)
    return backbone


def build_finetune_objective(cfg: Any, num_classes: int, seed: int) -> nn.Module:
    """The `supervised` objective around `cfg.checkpoint`'s backbone with a fresh head, seeded by `seed`."""
    from ssl_vit.eval.common import load_eval_backbone
    from ssl_vit.objectives import build_objective

    backbone = load_eval_backbone(cfg.checkpoint, cfg.model, cfg.data, seed, num_classes=num_classes, frozen=False)
    torch.manual_seed(seed)
    fresh_head(backbone, num_classes)
    kwargs = {f.name: getattr(cfg.supervised, f.name) for f in dataclasses.fields(cfg.supervised)}
    return build_objective("supervised", backbone, **kwargs)


def run_finetune(cfg: Any) -> dict[str, Any]:
    """Fine-tune `cfg.checkpoint` once per seed with the engine; writes and returns metrics.json."""
    from ssl_vit.engine.process import process_state

    from ssl_vit.data import load_data, make_loader
    from ssl_vit.engine import Trainer, classify, load_backbone
    from ssl_vit.eval.common import (
        check_eval_config,
        eval_seeds,
        eval_split_name,
        metrics_header,
        summarize_seeds,
        write_metrics,
    )

    start = time.perf_counter()
    check_eval_config(cfg)
    seeds = eval_seeds(cfg)
    with process_state().local_main_process_first():
        bundle = load_data(cfg.data, need_labels=True, seed=cfg.seed)
    if bundle.eval is None:
        raise ValueError("fine-tuning is judged on an eval split: set data.eval_split or data.val_fraction > 0.")
    per_seed, ema_per_seed = [], []
    model = trainer = None
    for seed in seeds:
        run_cfg = dataclasses.replace(cfg, seed=seed, seeds=[seed], output_dir=str(Path(cfg.output_dir) / f"seed_{seed}"))
        objective = build_finetune_objective(run_cfg, bundle.num_classes, seed)
        model = objective.backbone
        train_loader = make_loader(bundle, "train", objective.transform, cfg.train.batch_size, train=True, seed=seed)
        eval_loader = make_loader(bundle, "eval", "eval", cfg.train.batch_size, train=False)
        trainer = Trainer(run_cfg, objective, train_loader, eval_loader)
        summary = trainer.fit()
        per_seed.append({"seed": seed, "top1": summary["top1"], "top5": summary["top5"], "steps": summary["steps"]})
        ema_file = Path(run_cfg.output_dir) / "backbone_ema.safetensors"
        if cfg.train.ema and ema_file.is_file():  # the EMA weights, judged on the same eval split
            ema_model = load_backbone(ema_file).to(trainer.accelerator.device)
            result = classify(ema_model, eval_loader, trainer.accelerator)
            ema_per_seed.append({"seed": seed, "top1": result["top1"], "top5": result["top5"]})
    assert trainer is not None
    accelerator = trainer.accelerator
    metrics = metrics_header("finetune", cfg, model, eval_split_name(cfg.data, bundle))
    oc, tc, sc, dc = cfg.optim, cfg.train, cfg.supervised, cfg.data
    metrics.update(
        hyperparameters={
            "epochs": tc.epochs, "max_steps": tc.max_steps, "batch_size": trainer.effective_batch,
            "optimizer": oc.name, "blr": oc.blr, "lr": trainer.peak_lr, "weight_decay": oc.weight_decay,
            "layer_decay": oc.layer_decay, "warmup_epochs": oc.warmup_epochs, "min_lr": oc.min_lr,
            "drop_path_rate": cfg.model.drop_path_rate, "global_pool": cfg.model.global_pool,
            "label_smoothing": sc.label_smoothing, "mixup": sc.mixup, "cutmix": sc.cutmix,
            "auto_augment": dc.auto_augment, "reprob": dc.reprob, "ema": tc.ema, "image_size": dc.image_size,
        },
        seeds=seeds,
        **summarize_seeds(per_seed),
        per_seed=per_seed,
        seconds=time.perf_counter() - start,
        n_train=len(bundle.train) if hasattr(bundle.train, "__len__") else None,
        n_eval=len(bundle.eval) if hasattr(bundle.eval, "__len__") else None,
        runs=[str(Path(cfg.output_dir) / f"seed_{s}") for s in seeds],
    )
    if ema_per_seed:
        ema = summarize_seeds(ema_per_seed)
        metrics.update(ema_top1=ema["top1"], ema_top5=ema["top5"], ema_top1_std=ema["top1_std"], ema_per_seed=ema_per_seed)
    if accelerator.is_main_process:
        from ssl_vit.config import save_config

        write_metrics(cfg.output_dir, metrics)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    accelerator.print(
        f"[ssl_vit] fine-tune of {metrics['method']} {metrics['model']} on {metrics['dataset']}: top-1 "
        f"{metrics['top1']:.2f} +- {metrics['top1_std']:.2f} ({len(seeds)} seed(s), {metrics['seconds']:.0f} s). "
        f"{cfg.output_dir}/metrics.json"
    )
    return metrics
