"""DINO pretraining (Caron et al. 2021) of the shared ViT backbone; the EMA teacher is exported.

    accelerate launch recipes/dino_pretrain.py [--config FILE] [key=value ...]
    python recipes/dino_pretrain.py train.epochs=2 output_dir=outputs/dino_try

A preset over recipes/pretrain.py: objective.name=dino; with no --config it runs
recipes/configs/dino_default.yaml (built-in synthetic data, a nano ViT, minutes on 2 CPU cores).
Writes output_dir/backbone.safetensors (the teacher's backbone, timm keys), TensorBoard logs,
dino_views.png (the crops) and dino_attention.png (the teacher's class-token attention).
Other configs: recipes/configs/dino_vit_tiny_cifar10.yaml, recipes/configs/dino_vit_small_imagenet.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine import run_pretrain

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "dino_default.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The preset's objective goes first, so an explicit objective.name=... on the command line still wins.
    cfg = load_config(PretrainConfig, ["objective.name=dino", *argv], default_file=DEFAULT_CONFIG)
    return run_pretrain(cfg)


if __name__ == "__main__":
    main()
