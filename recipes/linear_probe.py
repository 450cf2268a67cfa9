"""Linear probe (MAE protocol) of any checkpoint: frozen backbone, BatchNorm without affine + Linear, LARS.

    accelerate launch recipes/linear_probe.py checkpoint=outputs/mae_default [--config FILE] [key=value ...]
    python recipes/linear_probe.py checkpoint=random --seeds 0 1 2 probe.lrs=[0.05,0.1,0.2]

`checkpoint` as in recipes/knn.py (a run folder, a backbone.safetensors, timm/MAE/DeiT files, or
`random`). `probe.mode=features` (default) trains on cached frozen features; `probe.mode=augment` is
the paper's path (augmented images through the frozen backbone, trained by the shared engine).
`probe.lrs=[...]` sweeps base lrs in one pass; the best is reported. Writes output_dir/metrics.json and
TensorBoard logs. With no --config: recipes/configs/linear_probe_default.yaml (built-in data). Other
configs: linear_probe_cifar10.yaml, linear_probe_mae_vit_base_imagenet.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl_vit.config import load_config
from ssl_vit.eval.config import LinearProbeEvalConfig, translate_seeds_flag
from ssl_vit.eval.linear_probe import run_linear_probe

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "linear_probe_default.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = translate_seeds_flag(sys.argv[1:] if argv is None else list(argv))
    return run_linear_probe(load_config(LinearProbeEvalConfig, argv, default_file=DEFAULT_CONFIG))


if __name__ == "__main__":
    main()
