"""The training loop on CPU: outputs, exact resume, accumulation, non-finite guard, limits, logging."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from toys import Crash, assert_equal_weights, resume_config, resume_run, toy_config, toy_loader, toy_objective, weights

from ssl_vit.config import ConfigError
from ssl_vit.engine import NonFiniteLossError, Trainer
from ssl_vit.engine import trainer as trainer_module


def test_fit__writes_checkpoint_backbone_config_tensorboard_images_and_summary(reference, capsys):
    out, summary = reference
    assert summary["steps"] == 12 and summary["images_seen"] == 48 and summary["epochs"] == 2
    assert summary["output_dir"] == str(out) and summary["images_per_sec"] > 0 and summary["loss"] > 0
    names = sorted(p.name for p in (out / "checkpoint-last").iterdir())
    assert names == ["ema.safetensors", "model.safetensors", "optimizer.pt", "rng", "trainer_state.json"]
    assert {k.split(".")[0] for k in weights(out)} == {"backbone", "decoder", "mask_token"}
    state = json.loads((out / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["epoch"] == 2 and state["batch_in_epoch"] == 0
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["objective"] == "toy" and meta["step"] == 12 and meta["config"]["train"]["grad_accum_steps"] == 2
    assert meta["timm"][0].startswith("vit_")
    assert set(load_file(str(out / "backbone.safetensors"))) == {k[len("backbone.") :] for k in weights(out) if k.startswith("backbone.")}
    assert (out / "backbone_ema.safetensors").is_file() and (out / "config.yaml").is_file()
    assert (out / "toy_grid.png").is_file() and summary["images"] == [str(out / "toy_grid.png")]
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_fit__tensorboard_has_every_objective_scalar_lr_grad_norm_speed_epoch_and_images(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = reference
    events = EventAccumulator(str(out / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["loss", "ce", "recon", "lr", "grad_norm", "images_per_sec", "epoch"]:
        assert f"train/{tag}" in tags, tag
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))  # log_every=1
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(lrs[2])  # 2 warmup steps, then decay
    assert "vis/toy_grid" in events.Tags()["images"]


@pytest.mark.parametrize(
    "crash_at",
    [
        3,  # before the first checkpoint: the relaunch starts afresh
        7,  # mid accumulation, after the checkpoint at step 2
        10,  # just after a checkpoint (step 4 = call 8) and one more step
        13,  # the first call of epoch 2 (checkpoint at step 6 = end of epoch 1)
        22,  # late in epoch 2
    ],
)
def test_resume__run_killed_at_any_step_and_relaunched_ends_with_equal_weights(reference, tmp_path, crash_at):
    ref_out, _ = reference
    with pytest.raises(Crash):
        resume_run(tmp_path, crash_at=crash_at)
    summary = resume_run(tmp_path)  # train.resume=auto
    assert summary["steps"] == 12 and summary["images_seen"] == 48
    assert_equal_weights(weights(tmp_path), weights(ref_out))
    assert_equal_weights(load_file(str(tmp_path / "checkpoint-last/ema.safetensors")), load_file(str(ref_out / "checkpoint-last/ema.safetensors")))
    assert_equal_weights(load_file(str(tmp_path / "backbone.safetensors")), load_file(str(ref_out / "backbone.safetensors")))


def test_resume__twice_killed_still_equal_and_finished_run_relaunch_adds_nothing(reference, tmp_path):
    ref_out, _ = reference
    for crash_at in (5, 17):
        with pytest.raises(Crash):
            resume_run(tmp_path, crash_at=crash_at)
    resume_run(tmp_path)
    summary = resume_run(tmp_path)  # already done: nothing to train
    assert summary["steps"] == 12
    assert_equal_weights(weights(tmp_path), weights(ref_out))


def test_resume__never_starts_afresh(reference, tmp_path):
    with pytest.raises(Crash):
        resume_run(tmp_path, crash_at=11)
    summary = resume_run(tmp_path, resume="never", max_steps=3)
    assert summary["steps"] == 3


def test_seed__other_seed_gives_other_weights(reference, tmp_path):
    ref_out, _ = reference
    cfg = resume_config(tmp_path, max_steps=3)
    cfg.seed = 1
    Trainer(cfg, toy_objective(), toy_loader(n=24, batch_size=2)).fit()
    a, b = weights(tmp_path), weights(ref_out)
    assert not torch.equal(a["backbone.blocks.0.attn.qkv.weight"], b["backbone.blocks.0.attn.qkv.weight"])


def test_grad_accum__x4_with_batch_b_matches_one_batch_of_4b(tmp_path):
    def run(out, batch, accum):
        cfg = toy_config(out, batch_size=batch, grad_accum_steps=accum, epochs=1, save_every=0)
        # SGD: the update is linear in the gradient, so fp32 summation-order noise stays ~1e-8 (Adam's
        # normalisation would blow the noise of near-zero gradients up to a sizeable fraction of a step).
        cfg.optim = dataclasses.replace(cfg.optim, name="sgd", blr=1.0)
        loader = toy_loader(n=32, batch_size=batch)
        return Trainer(cfg, toy_objective(stochastic=False), loader).fit()

    big, small = run(tmp_path / "big", 8, 1), run(tmp_path / "small", 2, 4)
    assert big["steps"] == small["steps"] == 4 and big["images_seen"] == small["images_seen"] == 32
    a, b = weights(tmp_path / "big"), weights(tmp_path / "small")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())
    assert not torch.equal(a["backbone.blocks.0.attn.qkv.weight"], toy_objective().state_dict()["backbone.blocks.0.attn.qkv.weight"])


def test_nonfinite_loss__stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cfg = toy_config(tmp_path, save_every=2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5 .*checkpoint-last \(step 4\).*skip_nonfinite"):
        Trainer(cfg, toy_objective(nan_at={5}), toy_loader()).fit()
    state = json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in weights(tmp_path).values())


def test_nonfinite_loss__between_log_lines_is_named_at_the_next_check_and_nothing_after_it_is_saved(tmp_path):
    # The default path keeps the check on the device (no host sync per step) and reads it at log lines,
    # checkpoints, evaluations and the end: here the end, 11 steps after the bad one.
    cfg = toy_config(tmp_path, save_every=4, log_every=100)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5 \(epoch 0, batch 5\).*checkpoint-last \(step 4\)"):
        Trainer(cfg, toy_objective(nan_at={5}), toy_loader()).fit()  # 8 steps an epoch, 2 epochs
    state = json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in weights(tmp_path).values())


def test_nonfinite_loss__skipped_and_counted_when_asked(tmp_path):
    cfg = toy_config(tmp_path, skip_nonfinite=True, max_steps=6)
    summary = Trainer(cfg, toy_objective(nan_at={2, 5}), toy_loader()).fit()
    assert summary["steps"] == 6 and summary["nonfinite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in weights(tmp_path).values())


@pytest.mark.parametrize("epochs, max_steps, steps", [(3, 5, 5), (1, 100, 8), (2, None, 16)])
def test_limits__the_first_of_epochs_and_max_steps_ends_the_run(tmp_path, epochs, max_steps, steps):
    cfg = toy_config(tmp_path, epochs=epochs, max_steps=max_steps, save_every=0, log_every=100)
    trainer = Trainer(cfg, toy_objective(stochastic=False), toy_loader())  # 8 steps per epoch
    assert trainer.total_steps == steps
    assert trainer.fit()["steps"] == steps
    # The schedule is laid out over the run: the last step's lr is the end of the cosine.
    assert trainer.lr_at(steps) == pytest.approx(cfg.optim.min_lr)


def test_eval__top1_top5_reported_for_a_classifier_backbone(tmp_path):
    cfg = toy_config(tmp_path, max_steps=3, save_every=0)
    summary = Trainer(cfg, toy_objective(), toy_loader(), toy_loader(n=10, batch_size=4, shuffle=False, drop_last=False)).fit()
    assert 0.0 <= summary["top1"] <= summary["top5"] == 100.0  # 3 classes: top-5 covers all


def test_mixed_precision__fp16_without_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        Trainer(toy_config(tmp_path, mixed_precision="fp16"), toy_objective(), toy_loader())


def test_mixed_precision__bf16_on_cpu_without_native_bf16_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="ssl_vit.engine"):
        summary = Trainer(toy_config(tmp_path, mixed_precision="bf16", max_steps=3, save_every=0), toy_objective(), toy_loader()).fit()
    assert "slower" in caplog.text and summary["steps"] == 3


@pytest.mark.slow
def test_compile__compiled_objective_trains_saves_plain_keys_and_resumes(reference, tmp_path, monkeypatch):
    # aot_eager traces and compiles the graphs as inductor does, without the C++ build (minutes on
    # 2 cores); inductor itself on CPU: `train.compile=true` of recipes/pretrain.py.
    monkeypatch.setattr(trainer_module, "COMPILE_BACKEND", "aot_eager")
    cfg = toy_config(tmp_path, compile=True, max_steps=3, save_every=2)
    summary = Trainer(cfg, toy_objective(stochastic=False), toy_loader()).fit()
    assert summary["steps"] == 3
    assert not any("_orig_mod" in k for k in weights(tmp_path))
    cfg = toy_config(tmp_path, compile=True, max_steps=4, save_every=2)
    assert Trainer(cfg, toy_objective(stochastic=False), toy_loader()).fit()["steps"] == 4


def test_save__disk_full_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    from ssl_vit.engine import CheckpointError
    from ssl_vit.engine import checkpoint as ckpt

    real, saves = ckpt.save_tensors, {"n": 0}

    def full_disk(tensors, path, metadata=None):
        if path.name == "model.safetensors":
            saves["n"] += 1
            if saves["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", full_disk)
    with pytest.raises(CheckpointError, match=r"step 6: .*No space left.*checkpoint-last \(step 3\) is intact.*resume=auto"):
        Trainer(toy_config(tmp_path), toy_objective(), toy_loader()).fit()
    assert json.loads((tmp_path / "checkpoint-last" / "trainer_state.json").read_text())["step"] == 3
    monkeypatch.setattr(ckpt, "save_tensors", real)
    assert Trainer(toy_config(tmp_path), toy_objective(), toy_loader()).fit()["steps"] == 16


def test_weight_decay_end__cosine_from_start_to_end_on_decayed_groups_only_as_dino(tmp_path):
    import math

    class Recording(type(toy_objective())):
        """Reads the optimizer's groups in `on_before_optimizer_step` (the values this step uses)."""

        seen: list[tuple[int, dict[str, float]]] = []

        def on_before_optimizer_step(self, step: int, total_steps: int) -> None:
            self.seen.append((step, {g["name"]: g["weight_decay"] for g in self.trainer.optimizer.param_groups}))

    torch.manual_seed(0)
    objective = Recording(toy_objective().backbone)
    cfg = toy_config(tmp_path, epochs=1, batch_size=4)  # 32 images: 8 steps
    cfg.optim = dataclasses.replace(cfg.optim, weight_decay=0.04, weight_decay_end=0.4)
    trainer = Trainer(cfg, objective, toy_loader(n=32, batch_size=4))
    objective.trainer = trainer
    trainer.fit()
    total = trainer.total_steps
    # facebookresearch/dino utils.cosine_scheduler(0.04, 0.4, epochs, niter_per_ep): no warm-up.
    dino = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / total)) for i in range(total)]
    assert [step for step, _ in Recording.seen] == list(range(total))
    for (step, groups), expected in zip(Recording.seen, dino):
        assert groups["decay"] == pytest.approx(expected, rel=1e-6), step
        assert groups["no_decay"] == 0.0


def _dino_clip_gradients(model: torch.nn.Module, clip: float) -> list[float]:
    """facebookresearch/dino utils.clip_gradients, transcribed."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def test_clip_mode_per_tensor__clips_each_gradient_as_dino_and_reports_the_global_norm(tmp_path):
    cfg = toy_config(tmp_path, clip_grad=0.05, clip_mode="per_tensor")
    trainer = Trainer(cfg, toy_objective(), toy_loader())
    torch.manual_seed(1)
    for i, p in enumerate(trainer.model.parameters()):  # norms from far below to far above 0.05
        p.grad = torch.randn_like(p) * 10.0 ** (i % 5 - 4)
    reference = copy.deepcopy(trainer.model)  # (a deep copy leaves the gradients behind)
    for p, q in zip(trainer.model.parameters(), reference.parameters()):
        q.grad = p.grad.clone()
    raw_grads = [p.grad.clone() for p in reference.parameters()]
    raw = torch.stack([g.norm() for g in raw_grads])
    norms = _dino_clip_gradients(reference, 0.05)
    assert min(norms) < 0.05 < max(norms)  # some tensors clipped, some left alone

    global_norm = trainer._clip_each_gradient()

    assert global_norm.item() == pytest.approx(raw.norm().item(), rel=1e-5)
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=name)
    # ... which is not what the global mode gives
    global_grads = [g * min(1.0, 0.05 / (raw.norm().item() + 1e-6)) for g in raw_grads]
    assert not all(torch.allclose(g, q.grad) for g, q in zip(global_grads, reference.parameters()))


def test_no_clip_grad__gradient_norm_is_clip_grad_norm_s_and_gradients_stay_untouched(tmp_path):
    """Without train.clip_grad the step takes the norm alone (no x1 rescaling pass): the value torch's
    clip_grad_norm_ returns, every gradient bit-identical."""
    trainer = Trainer(toy_config(tmp_path), toy_objective(), toy_loader())
    torch.manual_seed(1)
    for i, p in enumerate(trainer.model.parameters()):
        p.grad = torch.randn_like(p) * 10.0 ** (i % 5 - 4)
    before = [p.grad.clone() for p in trainer.model.parameters()]
    reference = copy.deepcopy(trainer.model)  # (a deep copy leaves the gradients behind)
    for q, g in zip(reference.parameters(), before):
        q.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))
    assert trainer._gradient_norm().item() == pytest.approx(expected.item(), rel=1e-6)
    for (name, p), g in zip(trainer.model.named_parameters(), before):
        assert torch.equal(p.grad, g), name


def test_clip_mode_per_tensor__needs_clip_grad(tmp_path):
    cfg = toy_config(tmp_path, clip_mode="per_tensor")
    with pytest.raises(ConfigError, match="train.clip_mode=per_tensor .* set train.clip_grad"):
        Trainer(cfg, toy_objective(), toy_loader())


def test_warmup__keeps_its_share_when_max_steps_shortens_the_run_and_may_not_fill_it(tmp_path, caplog):
    cfg = toy_config(tmp_path, epochs=10, max_steps=16, save_every=0)  # 8 steps an epoch: 80 planned
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=None, warmup_epochs=2.5)
    with caplog.at_level(logging.INFO, logger="ssl_vit.engine"):
        trainer = Trainer(cfg, toy_objective(), toy_loader())
    assert trainer.total_steps == 16 and trainer.warmup_steps == 4  # 2.5 of 10 epochs = 25% of the run
    assert "keeps its share, 4 of 16 steps" in caplog.text
    assert trainer.lr_at(4) == pytest.approx(trainer.peak_lr) and trainer.lr_at(2) == pytest.approx(trainer.peak_lr / 2)
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=16)
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=16 gives a warm-up of 16 .* whole run \(16 steps\)"):
        Trainer(cfg, toy_objective(), toy_loader())


def test_schedule_epochs__keeps_the_warmup_share_when_the_epoch_limit_is_lifted(tmp_path):
    """tools/compare.py's images budget: max_steps decides the length, epochs are lifted out of reach, and
    train.schedule_epochs keeps the config's warm-up share (1 of 10 epochs = 10% of the steps) and the
    objective's epoch length; without it an epoch would be 16 / 1e6 steps: no warm-up at all."""
    cfg = toy_config(tmp_path, epochs=1_000_000, max_steps=40, save_every=0)
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=None, warmup_epochs=1.0)
    assert Trainer(cfg, toy_objective(), toy_loader()).warmup_steps == 0  # the bug the key is for
    cfg.train = dataclasses.replace(cfg.train, schedule_epochs=10)
    trainer = Trainer(cfg, toy_objective(), toy_loader())
    assert trainer.total_steps == 40 and trainer.warmup_steps == 4 and trainer.schedule_steps_per_epoch == 4.0
    assert trainer.lr_at(2) == pytest.approx(trainer.peak_lr / 2) and trainer.lr_at(4) == pytest.approx(trainer.peak_lr)


def test_mae_cifar10_config_shortened_to_1100_steps__peaks_at_step_110(tmp_path):
    """The issue's case: 40 of 400 warm-up epochs keep their 10% when train.max_steps=1100 ends the run."""
    from pathlib import Path

    from ssl_vit.config import PretrainConfig, load_config

    yaml_file = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "mae_vit_tiny_cifar10.yaml"
    cfg = load_config(PretrainConfig, ["train.max_steps=1100", f"output_dir={tmp_path}"], default_file=yaml_file)
    cfg.train = dataclasses.replace(cfg.train, batch_size=4, grad_accum_steps=1)  # toy data in place of CIFAR-10
    trainer = Trainer(cfg, toy_objective(), toy_loader(n=64, batch_size=4))  # 16 steps an epoch: 6400 planned
    assert trainer.total_steps == 1100 and trainer.warmup_steps == 110
    lrs = [trainer.lr_at(step) for step in range(1100)]
    assert max(lrs) == lrs[110] == pytest.approx(trainer.peak_lr) and lrs[109] < lrs[110]
