"""train.grad_checkpointing: timm's per-block activation checkpointing gives the same gradients as the plain
forward (supervised, and MAE's visible-token `forward_features(x, ids_keep)` path), and the trainer turns it on."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint
from toys import toy_config, toy_loader, toy_objective, weights

from ssl_vit.engine import Trainer
from ssl_vit.models import create_backbone
from ssl_vit.objectives import build_objective

TINY = dict(img_size=16, depth=3, embed_dim=32, num_heads=2)


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """How many times torch.utils.checkpoint.checkpoint ran (timm's checkpoint_seq calls it once per block)."""
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    return calls


def _grads(objective, batch) -> dict[str, torch.Tensor]:
    objective.zero_grad(set_to_none=True)
    objective(batch)["loss"].backward()
    return {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


def _assert_same_grads(plain, checkpointed, batch) -> None:
    expected, got = _grads(plain, batch), _grads(checkpointed, batch)
    assert expected.keys() == got.keys() and any(k.startswith("backbone.blocks.") for k in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_grad_checkpointing__supervised_gradients_equal_the_plain_forward(checkpoint_calls):
    torch.manual_seed(0)
    plain = build_objective("supervised", create_backbone("vit_nano_patch4_32", num_classes=5, drop_path_rate=0.1, **TINY))
    checkpointed = copy.deepcopy(plain)
    checkpointed.backbone.set_grad_checkpointing(True)
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.randint(0, 5, (4,), generator=g)}
    torch.manual_seed(2)  # drop path draws the same masks on both sides; the recomputation replays them
    expected = _grads(plain, batch)
    assert not checkpoint_calls
    torch.manual_seed(2)
    got = _grads(checkpointed, batch)
    assert len(checkpoint_calls) == TINY["depth"]  # one checkpointed segment per block
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_grad_checkpointing__mae_visible_token_path_is_checkpointed_with_equal_gradients(checkpoint_calls):
    torch.manual_seed(0)
    backbone = create_backbone("vit_nano_patch4_32", num_classes=0, pos_embed="sincos", **TINY)
    plain = build_objective("mae", backbone, mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    checkpointed = copy.deepcopy(plain)
    checkpointed.backbone.set_grad_checkpointing(True)
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "noise": torch.rand(4, 16, generator=g)}
    _assert_same_grads(plain, checkpointed, batch)
    assert len(checkpoint_calls) == TINY["depth"]  # forward_features(x, ids_keep) went through checkpoint_seq


def test_grad_checkpointing__the_trainer_turns_it_on_and_trains_to_the_same_weights(tmp_path, checkpoint_calls):
    runs = {}
    for on in (False, True):
        out = tmp_path / ("on" if on else "off")
        cfg = toy_config(out, grad_checkpointing=on, max_steps=3, save_every=0, epochs=1)
        trainer = Trainer(cfg, toy_objective(stochastic=False), toy_loader(augment=False, shuffle=False))
        assert trainer.unwrapped.backbone.grad_checkpointing is on
        trainer.fit()
        runs[on] = weights(out)
        assert bool(checkpoint_calls) is on
    assert runs[False].keys() == runs[True].keys()
    for name in runs[False]:
        torch.testing.assert_close(runs[True][name], runs[False][name], rtol=1e-5, atol=1e-6, msg=name)
