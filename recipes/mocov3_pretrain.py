"""MoCo v3 pretraining (Chen, Xie, He 2021) of the shared ViT backbone.

    accelerate launch recipes/mocov3_pretrain.py [--config FILE] [key=value ...]
    python recipes/mocov3_pretrain.py train.epochs=2 output_dir=outputs/mocov3_try

A preset over recipes/pretrain.py: objective.name=mocov3; with no --config it runs
recipes/configs/mocov3_default.yaml (built-in synthetic data, a nano ViT, minutes on 2 CPU cores).
Writes output_dir/backbone.safetensors (the base encoder, timm keys) and TensorBoard logs.
Other configs: recipes/configs/mocov3_vit_tiny_cifar10.yaml, recipes/configs/mocov3_vit_small_imagenet.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine import run_pretrain

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "mocov3_default.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The preset's objective goes first, so an explicit objective.name=... on the command line still wins.
    cfg = load_config(PretrainConfig, ["objective.name=mocov3", *argv], default_file=DEFAULT_CONFIG)
    return run_pretrain(cfg)


if __name__ == "__main__":
    main()
