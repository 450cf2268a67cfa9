"""Shared eval pieces: --seeds, seeds, checkpoint metadata for metrics.json, mean/std, the backbone to judge."""

from __future__ import annotations

import json

import pytest
import torch

from ssl_vit.config import ConfigError, load_config
from ssl_vit.data.config import DataConfig
from ssl_vit.engine import save_backbone
from ssl_vit.eval.common import (
    check_eval_config,
    checkpoint_info,
    eval_seeds,
    load_eval_backbone,
    summarize_seeds,
    write_metrics,
)
from ssl_vit.eval.config import KNNEvalConfig, LinearProbeEvalConfig, translate_seeds_flag
from ssl_vit.models import create_backbone
from ssl_vit.models.config import ModelConfig


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--seeds", "0", "1", "2", "knn.ks=[5]"], ["seeds=[0, 1, 2]", "knn.ks=[5]"]),
        (["--seeds=3,4"], ["seeds=[3, 4]"]),
        (["a=1", "--seeds", "7", "--config", "f.yaml"], ["a=1", "seeds=[7]", "--config", "f.yaml"]),
        (["seeds=[1]"], ["seeds=[1]"]),
    ],
)
def test_translate_seeds_flag__becomes_a_seeds_override(argv, expected):
    assert translate_seeds_flag(argv) == expected


@pytest.mark.parametrize("argv", [["--seeds"], ["--seeds", "x"], ["--seeds", "--config", "f.yaml"]])
def test_translate_seeds_flag__without_integers_names_the_fix(argv):
    with pytest.raises(ConfigError, match="--seeds 0 1 2"):
        translate_seeds_flag(argv)


def test_eval_seeds__seeds_list_wins_over_seed_and_repeats_are_refused():
    assert eval_seeds(load_config(KNNEvalConfig, ["seed=4"])) == [4]
    assert eval_seeds(load_config(KNNEvalConfig, translate_seeds_flag(["seed=4", "--seeds", "0", "1"]))) == [0, 1]
    with pytest.raises(ValueError, match="distinct"):
        eval_seeds(load_config(KNNEvalConfig, ["seeds=[1, 1]"]))


def test_check_eval_config__model_checkpoint_points_to_top_level_checkpoint():
    with pytest.raises(ConfigError, match="checkpoint=some/run"):
        check_eval_config(load_config(LinearProbeEvalConfig, ["model.checkpoint=some/run"]))


def test_summarize_seeds__mean_and_sample_std():
    out = summarize_seeds([{"top1": 10.0, "top5": 50.0}, {"top1": 20.0, "top5": 50.0}])
    assert out["top1"] == 15.0 and out["top5"] == 50.0
    assert out["top1_std"] == pytest.approx(7.0710678) and out["top5_std"] == 0.0
    assert summarize_seeds([{"top1": 3.0, "top5": 4.0}])["top1_std"] == 0.0


def _tiny():
    torch.manual_seed(0)
    return create_backbone("vit_nano_patch4_32", depth=1, embed_dim=32, num_heads=2, img_size=16)


def test_checkpoint_info__reads_method_and_pretraining_compute_from_backbone_json(tmp_path):
    save_backbone(_tiny(), tmp_path / "run", objective="mae", step=12, images_seen=768, seconds=3.5,
                  images_per_sec=219.4, config={})
    for given in (tmp_path / "run", tmp_path / "run" / "backbone.safetensors"):
        info = checkpoint_info(str(given))
        assert info["method"] == "mae"
        assert info["pretrain"] == {"steps": 12, "images_seen": 768, "seconds": 3.5, "images_per_sec": 219.4}


def test_checkpoint_info__random_and_foreign_files():
    assert checkpoint_info("random")["method"] == "random"
    assert checkpoint_info("/nowhere/mae_pretrain_vit_base.pth") == {"method": "external", "pretrain": {}, "backbone_json": None}


def test_load_eval_backbone__random_is_drawn_from_the_seed_at_the_data_image_size():
    model_cfg = ModelConfig(name="vit_nano_patch4_32", args={"depth": 1, "embed_dim": 32, "num_heads": 2})
    data_cfg = DataConfig(image_size=16)
    a = load_eval_backbone("random", model_cfg, data_cfg, seed=0)
    b = load_eval_backbone("random", model_cfg, data_cfg, seed=0)
    c = load_eval_backbone("random", model_cfg, data_cfg, seed=1)
    assert a.patch_embed.img_size == (16, 16) and a.num_classes == 0
    assert torch.equal(a.pos_embed, b.pos_embed) and not torch.equal(a.pos_embed, c.pos_embed)


def test_load_eval_backbone__checkpoint_keeps_its_pooling_and_weights_for_frozen_features(tmp_path):
    saved = create_backbone("vit_nano_patch4_32", depth=1, embed_dim=32, num_heads=2, img_size=16,
                            global_pool="avg", num_classes=3)
    save_backbone(saved, tmp_path / "run", objective="supervised")
    model_cfg = ModelConfig(name="vit_tiny_patch4_32")  # ignored for a checkpoint, except the image size
    loaded = load_eval_backbone(str(tmp_path / "run"), model_cfg, DataConfig(image_size=16), seed=0)
    assert loaded.global_pool == "avg" and loaded.num_classes == 3  # the head stays; features are pre-logits
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().forward_head(loaded.forward_features(x), pre_logits=True),
                                   saved.eval().forward_head(saved.forward_features(x), pre_logits=True))


def test_write_metrics__writes_json_atomically(tmp_path):
    path = write_metrics(tmp_path / "out", {"protocol": "knn", "top1": 1.5, "t": torch.tensor([1, 2])})
    assert json.loads(path.read_text()) == {"protocol": "knn", "top1": 1.5, "t": [1, 2]}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["metrics.json"]
