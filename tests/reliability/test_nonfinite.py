"""A non-finite loss in the MAE recipe: NaN pixels reach the model at a chosen step (as from a bad
augmentation or a corrupt tensor the data checks cannot see).

Without train.skip_nonfinite the run stops naming the step and the last good checkpoint, which a relaunch
continues from; with it the steps are skipped and counted. fp16 overflow (the loss scaler skips the step)
needs a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from reliability_common import (
    TINY_MAE,
    TINY_STEPS,
    assert_same_tensors,
    backbone_weights,
    checkpoint_step,
    load_recipe,
    one_paragraph,
)

import ssl_vit.engine.run as run_mod
from ssl_vit.engine.trainer import NonFiniteLossError


@pytest.fixture(scope="module")
def mae():
    return load_recipe("mae_pretrain")


def nan_pixels_at(monkeypatch, forwards: set[int], scale_loss: float | None = None) -> None:
    """In those training forwards (1-based), one pixel of the batch is NaN (or the loss is scaled)."""
    real_build = run_mod.build_objective

    def build_objective(*args, **kwargs):
        objective = real_build(*args, **kwargs)
        forward, calls = objective.forward, {"n": 0}

        def faulty_forward(batch):
            if objective.training:
                calls["n"] += 1
                if calls["n"] in forwards and scale_loss is None:
                    batch = dict(batch, pixel_values=batch["pixel_values"].clone())
                    batch["pixel_values"][0, 0, 0, 0] = float("nan")
            out = forward(batch)
            if objective.training and calls["n"] in forwards and scale_loss is not None:
                out = dict(out, loss=out["loss"] * scale_loss)
            return out

        objective.forward = faulty_forward
        return objective

    monkeypatch.setattr(run_mod, "build_objective", build_objective)  # what run_pretrain calls


@pytest.mark.slow
def test_nan_at_step_5__stops_naming_the_step_and_the_step_3_checkpoint_which_a_relaunch_continues(
    mae, mae_reference, monkeypatch, tmp_path
):
    nan_pixels_at(monkeypatch, {5})
    with pytest.raises(NonFiniteLossError) as caught:
        mae.main([*TINY_MAE, f"output_dir={tmp_path}"])
    message = str(caught.value)
    assert one_paragraph(message), message
    assert "non-finite loss at step 5" in message and "(step 3)" in message and "train.skip_nonfinite=true" in message
    assert checkpoint_step(tmp_path) == 3
    assert json.loads((tmp_path / "backbone.json").read_text())["step"] == 3
    assert all(torch.isfinite(v).all() for v in backbone_weights(tmp_path).values())

    monkeypatch.undo()  # the cause is gone (e.g. the bad shard removed): continue from step 3
    summary = mae.main([*TINY_MAE, f"output_dir={tmp_path}"])
    assert summary["steps"] == TINY_STEPS
    assert_same_tensors(backbone_weights(tmp_path), mae_reference)


@pytest.mark.slow
def test_nan_at_steps_2_and_5_with_skip_nonfinite__run_finishes_counting_two_skips(
    mae, mae_reference, monkeypatch, tmp_path
):
    nan_pixels_at(monkeypatch, {2, 5})
    summary = mae.main([*TINY_MAE, "train.skip_nonfinite=true", f"output_dir={tmp_path}"])
    assert summary["steps"] == TINY_STEPS and summary["nonfinite_skipped"] == 2
    assert json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())["nonfinite_skipped"] == 2
    weights = backbone_weights(tmp_path)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(weights[k], mae_reference[k]) for k in weights)  # two updates fewer


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16 loss scaling needs a GPU (CPU fp16 training is refused)"
)
def test_fp16_overflow__the_loss_scaler_skips_the_step_and_the_run_goes_on(mae, monkeypatch, tmp_path):
    # A finite but huge loss: its fp16-scaled gradients overflow to inf, which the scaler must absorb.
    nan_pixels_at(monkeypatch, {4}, scale_loss=1e30)
    summary = mae.main([*TINY_MAE, "train.mixed_precision=fp16", f"output_dir={tmp_path}"])
    assert summary["steps"] == TINY_STEPS and summary["nonfinite_skipped"] == 0
    state = json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["fp16_skipped"] >= 1
    assert all(torch.isfinite(v).all() for v in backbone_weights(tmp_path).values())
