"""The `train.*` and `optim.*` config groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class TrainConfig:
    epochs: int = 10
    # None: no step limit. The first of epochs / max_steps reached ends the run (and the lr schedule
    # is laid out over that many optimizer steps).
    max_steps: Optional[int] = None
    # Stop once training has run this many seconds (wall time over all sessions): an equal-wall-clock
    # budget (tools/compare.py). The lr schedule still spans epochs / max_steps. None: no time limit.
    max_seconds: Optional[float] = None
    # Per process; the effective batch is batch_size * grad_accum_steps * num_processes.
    batch_size: int = 64
    grad_accum_steps: int = 1
    # None: whatever `accelerate launch` was configured with (default "no"). In YAML write "no" quoted:
    # a bare `no` is read as the boolean false.
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    # Clip the global gradient norm to this value; None: no clipping (the norm is still logged).
    clip_grad: Optional[float] = None
    # Optimizer steps between checkpoints (checkpoint-last/ and backbone.safetensors); 0: only at the end.
    save_every: int = 500
    # "auto": continue from output_dir/checkpoint-last when present; "never" (or null): start afresh;
    # a path: continue from that checkpoint folder.
    resume: Optional[str] = "auto"
    # Optimizer steps between TensorBoard scalars / progress-bar updates.
    log_every: int = 10
    # False: a non-finite loss stops the run (the last checkpoint is kept); True: skip the step and count it.
    skip_nonfinite: bool = False
    # torch.compile the objective (inductor; needs a C++ compiler on CPU).
    compile: bool = False
    # An exponential moving average of the weights, saved beside the raw ones (backbone_ema.safetensors).
    ema: bool = False
    ema_decay: float = 0.9999
    # Epochs between `objective.visualize` images in TensorBoard; 0: only at the end (always saved as PNG).
    vis_every: int = 0
    # Epochs between top-1/top-5 evaluations when there is an eval loader; 0: only at the end.
    eval_every: int = 1
    # Activation checkpointing in the backbone's blocks: less memory for ViT-L/H, ~30% more compute.
    grad_checkpointing: bool = False
    # DDP: set when some trainable parameters get no gradient in a step (e.g. an unused head).
    find_unused_parameters: bool = False


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    # lr = blr * effective_batch / 256 (the papers' rule), unless `lr` is given.
    blr: float = 1.5e-4
    lr: Optional[float] = None
    weight_decay: float = 0.05
    # Cosine schedule of the weight decay from `weight_decay` (first step) to this value (last step), as
    # DINO and I-JEPA (0.04 -> 0.4); None: constant. Parameters without decay (norms, biases) keep none.
    weight_decay_end: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # SGD and LARS momentum.
    momentum: float = 0.9
    # LARS trust coefficient (You et al. 2017; MAE's linear probe uses 0.001).
    trust_coefficient: float = 0.001
    warmup_epochs: float = 0.0
    # Warmup in optimizer steps; when set it wins over warmup_epochs.
    warmup_steps: Optional[int] = None
    min_lr: float = 0.0
    # Fine-tuning: lr of block i scaled by layer_decay ** (depth + 1 - (i + 1)). None: off.
    layer_decay: Optional[float] = None
