"""DeiT pretraining: a distilled ViT learns from the labels and from a frozen convnet teacher.

    accelerate launch recipes/deit_pretrain.py [--config FILE] [key=value ...]

A preset over recipes/pretrain.py: objective.name=deit; defaults in recipes/configs/deit_default.yaml.
When the teacher's checkpoint is missing and distill.train_teacher names a supervised config, the
teacher is first trained with the supervised recipe (into distill.teacher, or <output_dir>/teacher),
so the default runs with no download.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine import run_pretrain
from ssl_vit.engine.teacher import train_missing_teacher

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "deit_default.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = load_config(PretrainConfig, ["objective.name=deit", *argv], default_file=DEFAULT_CONFIG)
    return run_pretrain(train_missing_teacher(cfg))


if __name__ == "__main__":
    main()
