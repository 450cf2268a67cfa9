"""BEiT pretraining (Bao et al. 2021; tokenizer: BEiT v2's VQ-KD) of the shared ViT backbone.

    accelerate launch recipes/beit_pretrain.py [--config FILE] [key=value ...]
    python recipes/beit_pretrain.py train.epochs=2 output_dir=outputs/beit_try

A preset over recipes/pretrain.py: objective.name=beit; with no --config it runs
recipes/configs/beit_default.yaml (built-in synthetic data, a nano ViT, minutes on 2 CPU cores).
When beit.tokenizer holds no tokenizer and beit.train_tokenizer names a tokenizer config, the tokenizer
is first trained with recipes/beit_tokenizer.py's code (into beit.tokenizer, or <output_dir>/tokenizer;
its own missing teacher first, as DeiT's), so the default runs with no download.
Writes output_dir/backbone.safetensors (timm keys) and TensorBoard logs.
Other configs: recipes/configs/beit_vit_tiny_cifar10.yaml, recipes/configs/beit_vit_base_imagenet.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine import run_pretrain
from ssl_vit.engine.tokenizer import train_missing_tokenizer

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "beit_default.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = load_config(PretrainConfig, ["objective.name=beit", *argv], default_file=DEFAULT_CONFIG)
    return run_pretrain(train_missing_tokenizer(cfg))


if __name__ == "__main__":
    main()
