"""Full fine-tuning (MAE protocol) of any checkpoint through the shared engine.

    accelerate launch recipes/finetune.py checkpoint=outputs/mae_default [--config FILE] [key=value ...]
    python recipes/finetune.py checkpoint=random train.epochs=3 --seeds 0 1

`checkpoint` as in recipes/knn.py. The `supervised` objective (label smoothing, mixup/cutmix) with
layer-wise lr decay (`optim.layer_decay`), drop path, RandAugment + random erasing (data.*),
`model.global_pool=avg` (+ fc_norm) and `train.ema`; each seed runs in output_dir/seed_<s>/ and
resumes (`train.resume=auto`). Writes output_dir/metrics.json. With no --config:
recipes/configs/finetune_default.yaml (built-in data). Other configs: finetune_cifar10.yaml,
finetune_mae_vit_base_imagenet.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl_vit.config import load_config
from ssl_vit.eval.config import FinetuneEvalConfig, translate_seeds_flag
from ssl_vit.eval.finetune import run_finetune

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "finetune_default.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = translate_seeds_flag(sys.argv[1:] if argv is None else list(argv))
    return run_finetune(load_config(FinetuneEvalConfig, argv, default_file=DEFAULT_CONFIG))


if __name__ == "__main__":
    main()
