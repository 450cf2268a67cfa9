"""BEiT v2's VQ-KD tokenizer (Peng et al. 2022): a codebook distilled from a frozen teacher's patch features.

    accelerate launch recipes/beit_tokenizer.py [--config FILE] [key=value ...]
    python recipes/beit_tokenizer.py vqkd.teacher=outputs/dino_default output_dir=outputs/beit_tokenizer_try

A preset over recipes/pretrain.py: objective.name=vqkd; with no --config it runs
recipes/configs/beit_tokenizer_default.yaml. vqkd.teacher is any checkpoint the suite reads (a supervised,
DeiT or DINO run, a converted timm model); when it holds none and vqkd.train_teacher names a supervised
config, the teacher is trained first (into vqkd.teacher, or <output_dir>/teacher).
Writes output_dir/tokenizer.safetensors + tokenizer.json (what beit.tokenizer reads; the JSON records the
codebook usage of the last window), backbone.safetensors (the encoder) and TensorBoard logs
(codebook_usage: fraction of codes used in the current window of vqkd.usage_window steps).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine.tokenizer import run_tokenizer

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "beit_tokenizer_default.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = load_config(PretrainConfig, ["objective.name=vqkd", *argv], default_file=DEFAULT_CONFIG)
    return run_tokenizer(cfg)


if __name__ == "__main__":
    main()
