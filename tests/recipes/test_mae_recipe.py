"""recipes/mae_pretrain.py and its configs: defaults, parsing, and an end-to-end run on synthetic data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ssl_vit.config import PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "mae_pretrain.py"
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("mae_*.yaml"))


def load_recipe():
    spec = importlib.util.spec_from_file_location("mae_pretrain_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mae_configs__all_three_exist_parse_and_start_with_the_launch_command():
    names = {p.name for p in CONFIGS}
    assert {"mae_default.yaml", "mae_vit_tiny_cifar10.yaml", "mae_vit_base_imagenet.yaml"} <= names
    for path in CONFIGS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "recipes/mae_pretrain.py" in first and "->" in first, path.name
        cfg = load_config(PretrainConfig, [], default_file=path)
        assert cfg.objective.name == "mae" and cfg.model.pos_embed == "sincos", path.name
        assert 0 < cfg.mae.mask_ratio < 1


def test_mae_default_config__is_synthetic_nano_and_small_enough_for_a_cpu():
    cfg = load_config(PretrainConfig, [], default_file=load_recipe().DEFAULT_CONFIG)
    assert cfg.data.name == "synthetic" and cfg.model.name == "vit_nano_patch4_32"
    assert cfg.output_dir == "outputs/mae_default"
    assert cfg.mae.decoder_dim <= 128 and cfg.mae.decoder_depth <= 2


def test_mae_vit_base_imagenet_config__has_the_papers_settings():
    cfg = load_config(PretrainConfig, [], default_file=ROOT / "recipes/configs/mae_vit_base_imagenet.yaml")
    assert cfg.model.name == "vit_base_patch16_224" and cfg.data.image_size == 224
    assert cfg.train.epochs == 800 and cfg.optim.warmup_epochs == 40
    assert cfg.train.batch_size * cfg.train.grad_accum_steps * 8 == 4096  # with 8 processes
    assert cfg.optim.blr == 1.5e-4 and tuple(cfg.optim.betas) == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
    assert (cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads) == (512, 8, 16)
    assert cfg.mae.norm_pix_loss and cfg.mae.mask_ratio == 0.75


@pytest.mark.slow
def test_mae_recipe__runs_end_to_end_and_writes_backbone_tensorboard_and_reconstruction(tmp_path):
    out = tmp_path / "run"
    summary = load_recipe().main([
        f"output_dir={out}",
        "train.max_steps=3",
        "train.batch_size=16",
        "train.vis_every=1",
        "data.synthetic_train_size=64",
        "data.synthetic_eval_size=16",
        "data.num_workers=0",
        "mae.decoder_depth=1",
    ])
    assert (out / "backbone.safetensors").is_file() and (out / "backbone.json").is_file()
    assert list(out.rglob("events.out.tfevents*")), "no TensorBoard events"
    png = out / "mae_reconstruction.png"
    assert png.is_file() and png.stat().st_size > 0
    assert (out / "checkpoint-last" / "model.safetensors").is_file()
    assert summary["steps"] == 3

    # The backbone export is the shared ViT in timm's layout: it loads into timm strictly.
    import json

    import timm
    from safetensors.torch import load_file

    info = json.loads((out / "backbone.json").read_text())
    name, kwargs = info["timm"]
    timm.create_model(name, pretrained=False, **kwargs).load_state_dict(
        load_file(str(out / "backbone.safetensors")), strict=True
    )

    # tools/visualize_mae.py reads the same run back.
    spec = importlib.util.spec_from_file_location("visualize_mae_tool", ROOT / "tools" / "visualize_mae.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--run", str(out), "--images", "2"]).is_file()
