"""BEiT's tokenizer, trained on the spot when missing: teacher (supervised recipe) -> VQ-KD -> BEiT.

`run_tokenizer` is recipes/beit_tokenizer.py: a missing teacher is trained first (as DeiT's), then the
VQ-KD run, then `tokenizer.safetensors` + `tokenizer.json` are written from its last checkpoint.
`train_missing_tokenizer` is what recipes/beit_pretrain.py runs first, as `train_missing_teacher` for DeiT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssl_vit.engine.process import process_state, say
from ssl_vit.engine.run import run_pretrain
from ssl_vit.engine.teacher import helper_run_config, train_missing_supervised_teacher
from ssl_vit.objectives.vqkd import TokenizerError, save_tokenizer, tokenizer_file

__all__ = ["run_tokenizer", "train_missing_tokenizer"]


def run_tokenizer(cfg: Any) -> dict[str, Any]:
    """Train a VQ-KD tokenizer (and its missing teacher); write tokenizer.safetensors + .json in output_dir."""
    summary = run_pretrain(train_missing_supervised_teacher(cfg, "vqkd", "VQ-KD teacher"))
    # Every process writes the same files (atomic renames): the run's process group is gone by now, so
    # there is no barrier, and each process must find the tokenizer when it goes on to a BEiT run.
    path = save_tokenizer(cfg.output_dir, writer=process_state().process_index)
    summary["tokenizer"] = str(path)
    say(f"tokenizer written to {path}")
    return summary


def train_missing_tokenizer(cfg: Any) -> Any:
    """Before a BEiT run: train the tokenizer with `beit.train_tokenizer` when `beit.tokenizer` holds none.

    An unset `beit.tokenizer` becomes `<output_dir>/tokenizer`. The tokenizer run takes this run's data
    (its own augmentation), seed and `beit.codebook_size`; the rest comes from its YAML. Returns `cfg`.
    """
    beit = cfg.beit
    if beit.train_tokenizer is None:
        return cfg
    if beit.tokenizer is None:
        beit.tokenizer = str(Path(cfg.output_dir) / "tokenizer")
    target = Path(beit.tokenizer)
    if tokenizer_file(target) is not None:
        say(f"BEiT tokenizer: using {tokenizer_file(target)}")
        return cfg
    tok_cfg = helper_run_config(cfg, "vqkd", beit.train_tokenizer, target)
    tok_cfg.vqkd.codebook_size = beit.codebook_size
    say(f"BEiT tokenizer: none in {target}; training a VQ-KD tokenizer there first ({beit.train_tokenizer})")
    run_tokenizer(tok_cfg)
    if tokenizer_file(target) is None:
        raise TokenizerError(f"the tokenizer run finished but wrote no tokenizer.safetensors in {target}.")
    return cfg
