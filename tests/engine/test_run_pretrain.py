"""run_pretrain end to end on the built-in synthetic data (real transforms, loader workers, MAE masks)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from toys import assert_equal_weights, weights

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine import load_backbone, run_pretrain

pytestmark = pytest.mark.slow

TINY = [
    "data.synthetic_train_size=48",
    "data.synthetic_eval_size=12",
    "data.image_size=16",
    "data.num_workers=2",
    "model.args={depth: 1, embed_dim: 32, num_heads: 2}",
    "train.batch_size=8",
    "train.epochs=2",
    "train.save_every=2",
    "train.log_every=2",
]
MAE = ["objective.name=mae", "model.pos_embed=sincos", "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"]


def config(out, *extra):
    return load_config(PretrainConfig, [*TINY, *extra, f"output_dir={out}"])


def test_run_pretrain__mae_killed_mid_run_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    from ssl_vit.objectives.mae import MAE as MAEObjective

    reference = run_pretrain(config(tmp_path / "ref", *MAE))
    assert reference["steps"] == 12 and (tmp_path / "ref" / "mae_reconstruction.png").is_file()

    real_forward, calls = MAEObjective.forward, {"n": 0}

    def crashing_forward(self, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # step 8 of 12, after the checkpoint of step 6 (in epoch 2)
            raise KeyboardInterrupt("simulated kill")
        return real_forward(self, batch)

    monkeypatch.setattr(MAEObjective, "forward", crashing_forward)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(config(tmp_path / "run", *MAE))
    monkeypatch.setattr(MAEObjective, "forward", real_forward)
    resumed = run_pretrain(config(tmp_path / "run", *MAE))
    assert resumed["steps"] == 12
    assert_equal_weights(weights(tmp_path / "run"), weights(tmp_path / "ref"))

    # The outputs other tools read: the resolved config and the backbone with its spec.
    saved = load_config(PretrainConfig, ["--config", str(tmp_path / "run" / "config.yaml")])
    assert saved.objective.name == "mae" and saved.model.args["embed_dim"] == 32
    meta = json.loads((tmp_path / "run" / "backbone.json").read_text())
    assert meta["objective"] == "mae" and meta["step"] == 12 and meta["images_seen"] == 96
    backbone = load_backbone(tmp_path / "run")
    state = load_file(str(tmp_path / "run" / "backbone.safetensors"))
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in state.items())


def test_run_pretrain__supervised_reports_eval_accuracy_and_continues_from_a_checkpoint(tmp_path):
    summary = run_pretrain(config(tmp_path / "sup", "objective.name=supervised", "train.max_steps=3"))
    assert summary["steps"] == 3 and summary["eval_n"] == 12 and 0 <= summary["top1"] <= 100
    # model.checkpoint starts a new run from those weights (here: MAE-style continued training).
    cont = run_pretrain(config(tmp_path / "cont", *MAE, f"model.checkpoint={tmp_path / 'sup'}", "train.max_steps=1"))
    assert cont["steps"] == 1
