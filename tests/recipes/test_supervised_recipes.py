"""recipes/supervised_pretrain.py and recipes/deit_pretrain.py: configs, and end-to-end runs on synthetic data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine.teacher import has_checkpoint, load_teacher, train_missing_teacher

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "configs"
SUPERVISED_CONFIGS = sorted(CONFIGS.glob("supervised_*.yaml"))
DEIT_CONFIGS = sorted(CONFIGS.glob("deit_*.yaml"))

# Small enough for a loaded 2-core machine: a 1-block ViT, a few synthetic images, no workers.
TINY_DATA = ["data.synthetic_train_size=64", "data.synthetic_eval_size=16", "data.num_workers=0"]
TINY_VIT = ["model.args={depth: 1, embed_dim: 32, num_heads: 2}", "data.image_size=16"]


def load_recipe(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", SUPERVISED_CONFIGS + DEIT_CONFIGS, ids=lambda p: p.name)
def test_configs__parse_and_start_with_the_launch_command(path: Path) -> None:
    recipe = "deit_pretrain.py" if path.name.startswith("deit_") else "supervised_pretrain.py"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"recipes/{recipe}" in first and "->" in first
    cfg = load_config(PretrainConfig, [], default_file=path)
    assert cfg.objective.name == ("deit" if recipe == "deit_pretrain.py" else "supervised")
    if recipe == "deit_pretrain.py" and cfg.distill.train_teacher is not None:  # the teacher config it names exists and is supervised
        teacher = load_config(PretrainConfig, [], default_file=ROOT / cfg.distill.train_teacher)
        assert teacher.objective.name == "supervised"


def test_default_configs__use_built_in_data_and_a_distilled_student() -> None:
    sup = load_config(PretrainConfig, [], default_file=load_recipe("supervised_pretrain").DEFAULT_CONFIG)
    deit = load_config(PretrainConfig, [], default_file=load_recipe("deit_pretrain").DEFAULT_CONFIG)
    assert sup.data.name == deit.data.name == "synthetic"
    assert "distilled" in deit.model.name and deit.distill.type == "hard"
    # No download: the teacher is trained on the spot into <output_dir>/teacher.
    assert deit.distill.teacher is None and deit.distill.train_teacher is not None


def test_deit_imagenet_configs__have_the_papers_settings() -> None:
    for size in ("small", "base"):
        cfg = load_config(PretrainConfig, [], default_file=CONFIGS / f"deit_{size}_imagenet.yaml")
        assert cfg.model.name == f"deit_{size}_distilled_patch16_224" and cfg.data.image_size == 224
        assert cfg.train.epochs == 300 and cfg.optim.warmup_epochs == 5 and cfg.optim.weight_decay == 0.05
        batch = cfg.train.batch_size * cfg.train.grad_accum_steps * 8  # with 8 processes
        assert cfg.optim.blr * batch / 256 == pytest.approx(5e-4 * batch / 512)  # DeiT's lr rule
        assert (cfg.supervised.label_smoothing, cfg.supervised.mixup, cfg.supervised.cutmix) == (0.1, 0.8, 1.0)
        assert cfg.data.auto_augment.startswith("rand-m9-mstd0.5") and cfg.data.reprob == 0.25
        assert cfg.model.drop_path_rate == 0.1 and cfg.distill.type == "hard"
        assert cfg.distill.teacher == "regnety_160.deit_in1k"


@pytest.mark.slow
def test_supervised_default__runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = load_recipe("supervised_pretrain").main(
        [f"output_dir={out}", "train.max_steps=2", "train.batch_size=16", *TINY_DATA, *TINY_VIT]
    )
    assert summary["steps"] == 2 and "top1" in summary
    info = json.loads((out / "backbone.json").read_text())
    assert info["model"]["name"] == "vit_nano_patch8_32" and info["model"]["num_classes"] == 10


@pytest.mark.slow
def test_supervised_recipe__trains_a_timm_resnet_that_deit_loads_as_teacher(tmp_path: Path) -> None:
    out = tmp_path / "resnet"
    load_recipe("supervised_pretrain").main(
        [f"output_dir={out}", "model.name=test_resnet", "train.max_steps=2", "train.batch_size=16", *TINY_DATA]
    )
    teacher = load_teacher(out)
    assert type(teacher).__name__ == "ResNet" and teacher.num_classes == 10 and not teacher.training


@pytest.mark.slow
def test_deit_default__trains_its_teacher_first_then_distils(tmp_path: Path) -> None:
    # The default teacher config, cut to 2 steps (the student's train.* overrides do not reach it).
    teacher_yaml = tmp_path / "teacher.yaml"
    teacher_cfg = yaml.safe_load((CONFIGS / "supervised_teacher_default.yaml").read_text())
    teacher_cfg["train"].update(max_steps=2, batch_size=16)
    teacher_yaml.write_text(yaml.safe_dump(teacher_cfg))
    out = tmp_path / "deit"
    argv = [f"output_dir={out}", f"distill.train_teacher={teacher_yaml}", "train.max_steps=2", "train.batch_size=16"]
    summary = load_recipe("deit_pretrain").main(argv + TINY_DATA + TINY_VIT)
    assert has_checkpoint(out / "teacher") and has_checkpoint(out)
    teacher_info = json.loads((out / "teacher" / "backbone.json").read_text())
    assert teacher_info["model"]["name"] == "test_resnet"
    assert summary["steps"] == 2 and "top1" in summary
    student_info = json.loads((out / "backbone.json").read_text())
    assert student_info["model"]["name"] == "deit_nano_distilled_patch8_32"

    # A second run finds the teacher and leaves it alone.
    before = (out / "teacher" / "backbone.safetensors").stat().st_mtime_ns
    cfg = load_config(PretrainConfig, ["objective.name=deit", *argv], default_file=CONFIGS / "deit_default.yaml")
    assert train_missing_teacher(cfg).distill.teacher == str(out / "teacher")
    assert (out / "teacher" / "backbone.safetensors").stat().st_mtime_ns == before
