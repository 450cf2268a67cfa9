"""Frozen teachers for distillation: loaded from any checkpoint the suite reads, or trained on the spot.

`load_teacher` goes through `load_backbone` (a supervised-recipe run of any architecture, a converted
timm checkpoint, ...) or timm's published weights; `train_missing_teacher` runs the supervised recipe
first when a DeiT run's teacher does not exist yet (`recipes/deit_pretrain.py`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine.checkpoint import load_backbone, run_backbone_file
from ssl_vit.engine.process import say
from ssl_vit.engine.run import run_pretrain

__all__ = [
    "TeacherError",
    "has_checkpoint",
    "helper_run_config",
    "load_teacher",
    "train_missing_supervised_teacher",
    "train_missing_teacher",
]


class TeacherError(ValueError):
    """A teacher that cannot be loaded or does not fit the student/data."""


def has_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a teacher to load: a checkpoint file, or a run directory with its export."""
    path = Path(path)
    return path.is_file() or run_backbone_file(path) is not None


def _looks_like_path(source: str | Path) -> bool:
    path = Path(source)
    return path.exists() or len(path.parts) > 1 or path.suffix == ".safetensors"


def _load_timm_teacher(name: str) -> nn.Module:
    """A timm model with its published weights (timm downloads them once into the Hugging Face cache)."""
    if not timm.is_model(name):
        raise TeacherError(
            f"distill.teacher '{name}' is neither an existing checkpoint path nor a timm model name: give a "
            f"run directory (or backbone.safetensors) of recipes/supervised_pretrain.py, or a timm name "
            f"with published weights such as 'regnety_160.deit_in1k'."
        )
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:  # offline, no published weights, ... : all mean "no usable teacher"
        raise TeacherError(
            f"could not load the pretrained weights of timm model '{name}' ({type(err).__name__}: {err}). "
            f"Without network access, train a teacher with recipes/supervised_pretrain.py and set "
            f"distill.teacher to its output directory."
        ) from None


def load_teacher(source: str | Path | nn.Module) -> nn.Module:
    """The teacher as a frozen module in eval mode.

    Args:
        source: a module; a run directory or `backbone.safetensors` written by this suite (the
            `backbone.json` beside it rebuilds any architecture), another checkpoint `load_backbone`
            reads; or a timm model name (published weights).
    """
    if isinstance(source, nn.Module):
        teacher = source
    elif _looks_like_path(source):
        if not Path(source).exists():
            raise TeacherError(
                f"teacher checkpoint '{source}' not found: train the teacher first (python "
                f"recipes/supervised_pretrain.py output_dir={source} model.name=resnet10t) or let "
                f"recipes/deit_pretrain.py do it (distill.train_teacher)."
            )
        teacher = load_backbone(source)
    else:
        teacher = _load_timm_teacher(str(source))
    teacher.requires_grad_(False)
    return teacher.eval()


# Data keys a trained-on-the-spot teacher takes from its own config; all others come from the student's.
_TEACHER_AUGMENTATION = (
    "crop_scale_min",
    "interpolation",
    "hflip",
    "auto_augment",
    "reprob",
    "remode",
    "recount",
    "color_jitter",
    "repeated_aug",
)


def helper_run_config(cfg: Any, objective: str, yaml_file: str, output_dir: Path) -> Any:
    """The config of a run trained on the spot for `cfg`'s run (a teacher, a tokenizer): `yaml_file` read
    for `objective`, written to `output_dir`, with `cfg`'s seed and data (same images, classes, splits,
    normalisation, size) but its own augmentation keys: a teacher is trained to be right, the student
    with its method's own (often heavy) augmentation."""
    sub_cfg = load_config(PretrainConfig, [f"objective.name={objective}"], default_file=yaml_file)
    sub_cfg.output_dir = str(output_dir)
    sub_cfg.seed = cfg.seed
    own = {k: getattr(sub_cfg.data, k) for k in _TEACHER_AUGMENTATION if hasattr(cfg.data, k)}
    sub_cfg.data = dataclasses.replace(copy.deepcopy(cfg.data), **own)
    return sub_cfg


def train_missing_supervised_teacher(cfg: Any, group: str, label: str) -> Any:
    """Train the teacher of config group `group` (`distill`, `vqkd`) with the supervised recipe when missing.

    With `<group>.train_teacher` (a supervised-recipe YAML) set and `<group>.teacher` unset, the teacher
    goes to `<output_dir>/teacher`; with `<group>.teacher` a directory that holds no checkpoint yet, it
    goes there. The teacher run takes this run's `data.*` except the augmentation keys, and this run's
    `seed`; the rest comes from its YAML. A timm name or an existing checkpoint is left alone. `label`
    names the teacher in the messages. Returns `cfg`, with `<group>.teacher` set.
    """
    section = getattr(cfg, group)
    if section.train_teacher is None:
        return cfg
    if section.teacher is None:
        section.teacher = str(Path(cfg.output_dir) / "teacher")
    target = Path(section.teacher)
    if not _looks_like_path(target) and timm.is_model(section.teacher):
        return cfg  # a timm name: the objective loads it with its published weights
    if has_checkpoint(target):
        say(f"{label}: using the checkpoint in {target}")
        return cfg
    teacher_cfg = helper_run_config(cfg, "supervised", section.train_teacher, target)
    say(
        f"{label}: no checkpoint in {target}; training a {teacher_cfg.model.name} teacher there first "
        f"(supervised recipe, {section.train_teacher}, on this run's data)"
    )
    summary = run_pretrain(teacher_cfg)
    if not has_checkpoint(target):
        raise TeacherError(f"the teacher run finished but wrote no backbone.safetensors/backbone.json in {target}.")
    accuracy = f", eval top-1 {summary['top1']:.2f}%" if "top1" in summary else ""
    say(f"{label} ready in {target}{accuracy}; now training {cfg.model.name}")
    return cfg


def train_missing_teacher(cfg: Any) -> Any:
    """Before a DeiT run: `train_missing_supervised_teacher` of `distill` (unless `distill.type` is none)."""
    if cfg.distill.type == "none":
        return cfg
    return train_missing_supervised_teacher(cfg, "distill", "DeiT teacher")
