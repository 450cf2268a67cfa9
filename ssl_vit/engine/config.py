"""The `train.*` and `optim.*` config groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class TrainConfig:
    epochs: int = 10
    # None: no step limit. The first of epochs / max_steps reached ends the run.
    max_steps: Optional[int] = None
    # Per process; the effective batch is batch_size * grad_accum_steps * num_processes.
    batch_size: int = 64
    grad_accum_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    clip_grad: Optional[float] = None
    save_every: int = 500
    resume: str = "auto"
    log_every: int = 10
    skip_nonfinite: bool = False
    compile: bool = False
    ema: bool = False
    ema_decay: float = 0.9999


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    # lr = blr * effective_batch / 256 (the papers' rule), unless `lr` is given.
    blr: float = 1.5e-4
    lr: Optional[float] = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    # Fine-tuning: lr of block i scaled by layer_decay ** (depth + 1 - i). None: off.
    layer_decay: Optional[float] = None
