"""The `objective.*`, `mae.*`, `supervised.*` and `distill.*` config groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ObjectiveConfig:
    # A registered objective: "mae", "supervised", "deit", or one a user module registers.
    name: str = "mae"
    # A module to import first (e.g. "my_pkg.my_objective"); it calls `register_objective`.
    module: Optional[str] = None
    # Keyword arguments for objectives without a config group of their own (user objectives).
    args: dict = field(default_factory=dict)


@dataclass
class MAEConfig:
    """He et al. 2021 defaults (PROTOCOLS.md); small-image configs shrink the decoder."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True


@dataclass
class SupervisedConfig:
    """DeiT recipe defaults: label smoothing 0.1; mixup 0.8 / cutmix 1.0 are set by the paper configs."""

    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5


@dataclass
class DistillConfig:
    """DeiT distillation (Touvron et al. 2020): hard beat soft in the paper."""

    type: Literal["hard", "soft", "none"] = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    # A checkpoint directory/file written by the supervised recipe (any architecture), or a timm model
    # name with published weights (downloaded once, e.g. "regnety_160.deit_in1k" as in the paper).
    teacher: Optional[str] = None
    # A supervised-recipe YAML: when `teacher` is a directory without a checkpoint, recipes/deit_pretrain.py
    # first trains the teacher with it there (on this run's data.* settings), so no download is needed.
    train_teacher: Optional[str] = None
