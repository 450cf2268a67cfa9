"""Linear probe: learns separable features, sweep heads are independent, the backbone stays frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import DataLoader

from ssl_vit.config import ConfigError, load_config
from ssl_vit.engine.config import OptimConfig
from ssl_vit.eval.config import LinearProbeEvalConfig
from ssl_vit.eval.linear_probe import (
    FrozenProbe,
    LinearProbeObjective,
    ProbeHeads,
    _check_features_mode,
    evaluate_heads,
    train_probe_on_features,
)
from ssl_vit.models import create_backbone


def _clusters(n=400, dim=32, num_classes=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    centers = 2.0 * torch.randn(num_classes, dim, generator=g)
    return centers[labels] + 0.5 * torch.randn(n, dim, generator=g), labels


def _opt(name="sgd", **kw):
    return OptimConfig(name=name, weight_decay=0.0, warmup_epochs=1, **kw)


def test_probe__reaches_100_percent_on_linearly_separable_features():
    x, y = _clusters()
    x_eval, y_eval = _clusters(n=200, seed=0)  # same centers, fresh noise draw below
    x_eval = x_eval + 0.1 * torch.randn_like(x_eval)
    probe = train_probe_on_features(x, y, 8, _opt("sgd"), blrs=[0.1], epochs=10, batch_size=64)
    assert evaluate_heads(probe, x_eval, y_eval)[0]["top1"] == 100.0


def test_probe__lars_learns_separable_features_with_a_large_enough_lr():
    # LARS's step is relative to |w| (trust ratio), so a few hundred small-batch steps need a large lr:
    # the reason the small-scale configs use SGD and the paper config (batch 16384) LARS.
    x, y = _clusters()
    probe = train_probe_on_features(x, y, 8, _opt("lars"), blrs=[0.1, 300.0], epochs=10, batch_size=64)
    low, high = evaluate_heads(probe, x, y)
    assert high["top1"] >= 95.0 and low["top1"] < high["top1"]


def test_probe_sweep__heads_trained_together_equal_heads_trained_alone():
    x, y = _clusters(n=128, dim=8, num_classes=4)
    together = train_probe_on_features(x, y, 4, _opt(), blrs=[0.05, 0.5], epochs=3, batch_size=32, seed=3)
    alone = train_probe_on_features(x, y, 4, _opt(), blrs=[0.05], epochs=3, batch_size=32, seed=3)
    torch.testing.assert_close(together.heads[0].weight, alone.heads[0].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.heads[0].bias, alone.heads[0].bias, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together.heads[0].weight, together.heads[1].weight)


def test_probe_heads__batchnorm_has_no_affine_and_mae_eps():
    heads = ProbeHeads(16, 3, 2)
    assert heads.norm.affine is False and heads.norm.eps == 1e-6
    assert heads(torch.randn(5, 16)).shape == (2, 5, 3)


def test_evaluate_heads__counts_top1_and_top5_like_a_hand_count():
    probe = ProbeHeads(4, 6, 1).eval()
    x, y = torch.randn(50, 4), torch.randint(0, 6, (50,))
    with torch.no_grad():
        logits = probe(x)[0]
    top = logits.topk(5, dim=1).indices
    expected1 = 100.0 * (top[:, 0] == y).sum().item() / 50
    expected5 = 100.0 * (top == y[:, None]).any(1).sum().item() / 50
    result = evaluate_heads(probe, x, y, batch_size=7)[0]
    assert abs(result["top1"] - expected1) < 1e-9 and abs(result["top5"] - expected5) < 1e-9


def _train_steps(objective, steps=3):
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    objective.train()
    for _ in range(steps):
        batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.randint(0, 3, (4,))}
        loss = objective(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_frozen_probe__batchnorm_backbone_stays_in_eval_mode_with_weights_and_stats_unchanged():
    encoder = timm.create_model("resnet10t", num_classes=0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    objective = LinearProbeObjective(encoder, num_classes=3)
    head_before = objective.backbone.probe.heads[0].weight.clone()
    _train_steps(objective)
    assert not encoder.training and objective.backbone.training
    assert all(not p.requires_grad for p in encoder.parameters())
    for k, v in encoder.state_dict().items():  # weights, running_mean/var and num_batches_tracked
        assert torch.equal(v, before[k]), k
    assert not torch.equal(objective.backbone.probe.heads[0].weight, head_before)  # the head did learn


def test_frozen_probe__vit_drop_path_is_off_during_training():
    torch.manual_seed(0)
    vit = create_backbone("vit_nano_patch4_32", depth=2, embed_dim=64, num_heads=2, img_size=16, drop_path_rate=0.5)
    probe = FrozenProbe(vit, num_classes=3).train()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        probe.probe.eval()  # the BatchNorm's batch statistics aside, the encoder must be deterministic
        assert torch.equal(probe(x), probe(x))
        assert torch.equal(probe.encoder.forward_features(x), vit.eval().forward_features(x))


def test_linear_probe_objective__engine_optimises_only_the_head(tmp_path):
    from ssl_vit.engine import Trainer
    from ssl_vit.eval.config import LinearProbeEvalConfig

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.tensor(i % 3)}

    torch.manual_seed(0)
    vit = create_backbone("vit_nano_patch4_32", depth=2, embed_dim=64, num_heads=2, img_size=16)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    cfg = LinearProbeEvalConfig(output_dir=str(tmp_path / "run"))
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.save_every = 2, 8, 0
    objective = LinearProbeObjective(vit, num_classes=3)
    trainer = Trainer(cfg, objective, DataLoader(Images(), batch_size=8, drop_last=True))
    names = [n for g in trainer.optimizer.param_groups for n in g["param_names"]]
    assert names and all(n.startswith("backbone.probe.heads.") for n in names)
    trainer.fit()
    for k, v in vit.state_dict().items():
        assert torch.equal(v, before[k]), k


DEFAULT = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "linear_probe_default.yaml"


@pytest.mark.parametrize("key", ["train.max_steps=5", "train.grad_accum_steps=2", "train.schedule_epochs=3"])
def test_features_mode__refuses_engine_keys_it_would_ignore(key):
    # A plan copying the fine-tune column's train.max_steps onto the probe must not be silently ignored.
    cfg = load_config(LinearProbeEvalConfig, [key], default_file=DEFAULT)
    with pytest.raises(ConfigError, match=key.split("=")[0] + ".*probe.mode=features"):
        _check_features_mode(cfg)
    _check_features_mode(load_config(LinearProbeEvalConfig, [key, "probe.mode=augment"], default_file=DEFAULT))


def test_features_mode__refuses_a_warmup_as_long_as_the_probe():
    cfg = load_config(LinearProbeEvalConfig, ["train.epochs=5", "optim.warmup_epochs=5"], default_file=DEFAULT)
    with pytest.raises(ConfigError, match="never leave its warm-up"):
        _check_features_mode(cfg)
    _check_features_mode(load_config(LinearProbeEvalConfig, ["train.epochs=5", "optim.warmup_epochs=1"], default_file=DEFAULT))
