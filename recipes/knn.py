"""Weighted kNN evaluation (DINO protocol) of any checkpoint's frozen features.

    accelerate launch recipes/knn.py checkpoint=outputs/mae_default [--config FILE] [key=value ...]
    python recipes/knn.py checkpoint=random --seeds 0 1 2

`checkpoint` is a run's output_dir, a backbone.safetensors, a timm state dict, an imported official
MAE/DeiT checkpoint, or `random` (the random-init floor built from `model.*`). Reports k = 10, 20, 100,
200 in one run (top-1 = k=20); writes output_dir/metrics.json and TensorBoard logs. With no --config it
runs recipes/configs/knn_default.yaml (built-in synthetic data). Other configs:
recipes/configs/knn_cifar10.yaml, recipes/configs/knn_vit_base_imagenet.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl_vit.config import load_config
from ssl_vit.eval.config import KNNEvalConfig, translate_seeds_flag
from ssl_vit.eval.knn import run_knn

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "knn_default.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = translate_seeds_flag(sys.argv[1:] if argv is None else list(argv))
    return run_knn(load_config(KNNEvalConfig, argv, default_file=DEFAULT_CONFIG))


if __name__ == "__main__":
    main()
