"""Pretrain a ViT with any registered objective (MAE, supervised, DeiT distillation, or your own).

    accelerate launch recipes/pretrain.py [--config FILE] [key=value ...]
    python recipes/pretrain.py objective.name=mae train.epochs=1          # 1 CPU process
    python recipes/pretrain.py --help                                     # every key and its default

Per-method presets (recipes/mae_pretrain.py, ...) call `main(argv, default_file=...)`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine import run_pretrain


def main(argv: list[str] | None = None, default_file: str | Path | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    return run_pretrain(load_config(PretrainConfig, argv, default_file=default_file))


if __name__ == "__main__":
    main()
