"""Supervised pretraining (DeiT's recipe without a teacher) of a ViT, or of any timm model (a teacher).

    accelerate launch recipes/supervised_pretrain.py [--config FILE] [key=value ...]
    python recipes/supervised_pretrain.py model.name=resnet10t output_dir=outputs/teacher

A preset over recipes/pretrain.py: objective.name=supervised; defaults in
recipes/configs/supervised_default.yaml (built-in synthetic data, a few minutes on CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine import run_pretrain

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "supervised_default.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The preset's objective goes first, so an explicit objective.name=... on the command line still wins.
    cfg = load_config(PretrainConfig, ["objective.name=supervised", *argv], default_file=DEFAULT_CONFIG)
    return run_pretrain(cfg)


if __name__ == "__main__":
    main()
