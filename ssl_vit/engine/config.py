"""The `train.*` and `optim.*` config groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ssl_vit.accepts import Range, at_least, each, non_negative, positive, setting


@dataclass
class TrainConfig:
    epochs: int = setting(10, at_least(1), 'passes over the training data')
    # None: no step limit. The first of epochs / max_steps reached ends the run (and the lr schedule
    # is laid out over that many optimizer steps).
    max_steps: Optional[int] = setting(None, at_least(1), 'optimizer steps of the run')
    # The epochs the schedules count in: an "epoch" of the lr warm-up and of an objective's epoch settings
    # (DINO's frozen last layer, teacher-temperature warm-up) is total_steps / schedule_epochs steps. None:
    # train.epochs. tools/compare.py's images budget sets it to the recipe config's epochs when it lifts
    # train.epochs out of reach, so each run keeps its config's warm-up share (1 of 10 epochs -> 10%).
    schedule_epochs: Optional[float] = setting(None, positive(), 'epochs the schedules count in; null: train.epochs')
    # Stop once training has run this many seconds (wall time over all sessions): an equal-wall-clock
    # budget (tools/compare.py). The lr schedule still spans epochs / max_steps. None: no time limit.
    max_seconds: Optional[float] = setting(None, positive(), 'seconds of training')
    # Per process; the effective batch is batch_size * grad_accum_steps * num_processes.
    batch_size: int = setting(64, at_least(1), 'images per process per forward pass')
    grad_accum_steps: int = setting(1, at_least(1), 'the number of batches per optimizer step')
    # None: whatever `accelerate launch` was configured with (default "no"). In YAML write "no" quoted:
    # a bare `no` is read as the boolean false.
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    # Clip the gradient norm to this value; None: no clipping (the global norm is still logged).
    clip_grad: Optional[float] = setting(None, positive(), 'the largest gradient norm (see train.clip_mode)')
    # What clip_grad bounds: "global", the norm of all gradients together (torch's clip_grad_norm_, timm,
    # MAE, BEiT, SimMIM); "per_tensor", each parameter's gradient norm on its own (DINO's utils.clip_gradients).
    clip_mode: Literal["global", "per_tensor"] = "global"
    # Optimizer steps between checkpoints (checkpoint-last/ and backbone.safetensors); 0: only at the end.
    save_every: int = setting(500, non_negative(), 'optimizer steps between checkpoints; 0: only at the end')
    # "auto": continue from output_dir/checkpoint-last when present; "never" (or null): start afresh;
    # a path: continue from that checkpoint folder.
    resume: Optional[str] = "auto"
    # Optimizer steps between TensorBoard scalars / progress-bar updates.
    log_every: int = setting(10, at_least(1), 'optimizer steps between log lines')
    # Experiment trackers, several at once: TensorBoard (output_dir/tb, read by tools/compare.py), W&B and
    # MLflow (extras: pip install -e ".[wandb]" / ".[mlflow]"); ssl_vit/engine/tracking.py. []: none.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    # False: a non-finite loss stops the run (the last checkpoint is kept); True: skip the step and count it.
    skip_nonfinite: bool = False
    # torch.compile the objective (inductor; needs a C++ compiler on CPU).
    compile: bool = False
    # An exponential moving average of the weights, saved beside the raw ones (backbone_ema.safetensors).
    ema: bool = False
    ema_decay: float = setting(0.9999, Range(0, 1, high_open=True), "the EMA's decay per step")
    # Epochs between `objective.visualize` images in TensorBoard; 0: only at the end (always saved as PNG).
    vis_every: int = setting(0, non_negative(), 'epochs between images; 0: only at the end')
    # Epochs between top-1/top-5 evaluations when there is an eval loader; 0: only at the end.
    eval_every: int = setting(1, non_negative(), 'epochs between evaluations; 0: only at the end')
    # Activation checkpointing in the backbone's blocks: less memory for ViT-L/H, ~30% more compute.
    grad_checkpointing: bool = False
    # DDP: set when some trainable parameters get no gradient in a step (e.g. an unused head).
    find_unused_parameters: bool = False


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    # lr = blr * effective_batch / 256 (the papers' rule), unless `lr` is given.
    blr: float = setting(1.5e-4, positive(), 'base lr, scaled by batch / 256')
    lr: Optional[float] = setting(None, positive(), 'the peak lr, overriding blr')
    weight_decay: float = setting(0.05, non_negative())
    # Cosine schedule of the weight decay from `weight_decay` (first step) to this value (last step), as
    # DINO and I-JEPA (0.04 -> 0.4); None: constant. Parameters without decay (norms, biases) keep none.
    weight_decay_end: Optional[float] = setting(None, non_negative(), 'the weight decay at the last step')
    betas: tuple[float, float] = setting((0.9, 0.95), each(Range(0, 1, high_open=True)), "AdamW's moment decays")
    eps: float = setting(1e-8, positive())
    # SGD and LARS momentum.
    momentum: float = setting(0.9, Range(0, 1, high_open=True), 'SGD / LARS momentum')
    # LARS trust coefficient (You et al. 2017; MAE's linear probe uses 0.001).
    trust_coefficient: float = setting(0.001, positive(), 'LARS trust ratio')
    warmup_epochs: float = setting(0.0, non_negative(), 'lr warm-up, a share of train.epochs')
    # Warmup in optimizer steps; when set it wins over warmup_epochs.
    warmup_steps: Optional[int] = setting(None, non_negative(), 'lr warm-up in optimizer steps')
    min_lr: float = setting(0.0, non_negative(), 'the lr at the end of the cosine')
    # Fine-tuning: lr of block i scaled by layer_decay ** (depth + 1 - (i + 1)). None: off.
    layer_decay: Optional[float] = setting(None, Range(0, 1, low_open=True), 'lr factor per block below the top')
