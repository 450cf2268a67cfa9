"""SimMIM pretraining (Xie et al. 2022) of the shared ViT backbone.

    accelerate launch recipes/simmim_pretrain.py [--config FILE] [key=value ...]
    python recipes/simmim_pretrain.py train.epochs=2 output_dir=outputs/simmim_try

A preset over recipes/pretrain.py: objective.name=simmim; with no --config it runs
recipes/configs/simmim_default.yaml (built-in synthetic data, a nano ViT, minutes on 2 CPU cores).
Writes output_dir/backbone.safetensors (timm keys), TensorBoard logs and simmim_reconstruction.png.
Other configs: recipes/configs/simmim_vit_tiny_cifar10.yaml, recipes/configs/simmim_vit_base_imagenet.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine import run_pretrain

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "simmim_default.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The preset's objective goes first, so an explicit objective.name=... on the command line still wins.
    cfg = load_config(PretrainConfig, ["objective.name=simmim", *argv], default_file=DEFAULT_CONFIG)
    return run_pretrain(cfg)


if __name__ == "__main__":
    main()
