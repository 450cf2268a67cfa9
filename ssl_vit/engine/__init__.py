"""The training engine: one Accelerate loop for every objective, optimisation, checkpoints, evaluation."""

from ssl_vit.engine.checkpoint import CheckpointError, load_backbone, save_backbone
from ssl_vit.engine.evaluate import classify
from ssl_vit.engine.run import run_pretrain
from ssl_vit.engine.trainer import NonFiniteLossError, Trainer

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "Trainer",
    "classify",
    "load_backbone",
    "run_pretrain",
    "save_backbone",
]
