"""Parameter groups, weight-decay exclusions, layer-wise lr decay, schedule, LARS, EMA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ssl_vit.engine.config import OptimConfig
from ssl_vit.engine.optim import EMA, LARS, build_optimizer, cosine_schedule, layer_id, param_groups, scaled_lr
from ssl_vit.models import create_backbone


class Wrapper(nn.Module):
    """An objective-shaped module: a named backbone plus decoder parts (MAE's names)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.decoder_embed = nn.Linear(8, 8)
        self.decoder_blocks = nn.ModuleList([nn.Linear(8, 8)])


def distilled() -> Wrapper:
    # A named backbone with every special token: class, distillation, learned position embedding.
    return Wrapper(create_backbone("deit_nano_distilled_patch4_32", num_classes=10))


def group_of(groups, name):
    (g,) = [g for g in groups if name in g["param_names"]]
    return g


def test_param_groups__no_weight_decay_for_norms_biases_pos_embed_and_tokens():
    groups = param_groups(distilled(), weight_decay=0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    decay = {n for g in groups if g["weight_decay"] == 0.05 for n in g["param_names"]}
    for name in [
        "backbone.pos_embed", "backbone.cls_token", "backbone.dist_token", "mask_token", "decoder_pos_embed",
        "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias", "backbone.norm.bias",
        "backbone.patch_embed.proj.bias", "backbone.head.bias", "decoder_embed.bias",
    ]:
        assert name in no_decay, name
    for name in [
        "backbone.blocks.0.attn.qkv.weight", "backbone.blocks.4.mlp.fc2.weight", "backbone.patch_embed.proj.weight",
        "backbone.head.weight", "backbone.head_dist.weight", "decoder_embed.weight",
    ]:
        assert name in decay, name
    assert len(no_decay) + len(decay) == sum(1 for _ in distilled().parameters())


def test_param_groups__frozen_parameters_left_out():
    model = distilled()
    model.backbone.patch_embed.requires_grad_(False)
    names = {n for g in param_groups(model, 0.05) for n in g["param_names"]}
    assert not any(n.startswith("backbone.patch_embed") for n in names)


def test_param_groups__layer_decay_scale_is_decay_pow_depth_plus_1_minus_layer():
    model = distilled()  # nano: depth 5
    depth, d = 5, 0.75
    groups = param_groups(model, 0.05, layer_decay=d)
    expected = {
        "backbone.patch_embed.proj.weight": d ** (depth + 1),  # layer 0
        "backbone.cls_token": d ** (depth + 1),
        "backbone.dist_token": d ** (depth + 1),
        "backbone.pos_embed": d ** (depth + 1),
        "backbone.blocks.0.attn.qkv.weight": d**depth,  # layer 1
        "backbone.blocks.4.mlp.fc1.bias": d**1,  # layer 5
        "backbone.norm.weight": 1.0,  # layer depth + 1
        "backbone.head.weight": 1.0,
        "decoder_blocks.0.weight": 1.0,
        "mask_token": 1.0,
    }
    for name, scale in expected.items():
        assert group_of(groups, name)["lr_scale"] == pytest.approx(scale), name
    # Decay and no-decay stay separate within a layer.
    assert group_of(groups, "backbone.blocks.0.norm1.weight")["weight_decay"] == 0.0
    assert group_of(groups, "backbone.blocks.0.norm1.weight")["lr_scale"] == pytest.approx(d**depth)


def test_param_groups__bare_backbone_same_layers_as_in_objective():
    backbone = create_backbone("vit_nano_patch4_32", num_classes=10)
    groups = param_groups(backbone, 0.05, layer_decay=0.5)
    assert group_of(groups, "blocks.2.attn.proj.weight")["lr_scale"] == pytest.approx(0.5 ** (5 + 1 - 3))
    assert group_of(groups, "patch_embed.proj.weight")["lr_scale"] == pytest.approx(0.5**6)
    assert group_of(groups, "head.weight")["lr_scale"] == 1.0


@pytest.mark.parametrize(
    "name, layer",
    [
        ("backbone.cls_token", 0),
        ("pos_embed", 0),
        ("backbone.patch_embed.proj.weight", 0),
        ("blocks.0.norm1.weight", 1),
        ("backbone.blocks.11.mlp.fc2.bias", 12),
        ("backbone.norm.weight", 13),
        ("backbone.fc_norm.weight", 13),
        ("head.weight", 13),
        ("decoder_blocks.0.attn.qkv.weight", 13),  # MAE decoder: not the encoder's blocks
        ("decoder.blocks.0.attn.qkv.weight", 13),
        ("mask_token", 13),
    ],
)
def test_layer_id__stem_blocks_and_rest(name, layer):
    assert layer_id(name, depth=12) == layer


def test_scaled_lr__blr_times_effective_batch_over_256_unless_lr_given():
    assert scaled_lr(OptimConfig(blr=1.5e-4), 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(OptimConfig(blr=1.5e-4, lr=1e-3), 4096) == 1e-3


def test_cosine_schedule__linear_warmup_then_half_cosine_to_min_lr():
    kw = dict(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert cosine_schedule(0, **kw) == 0.0
    assert cosine_schedule(5, **kw) == pytest.approx(0.5)
    assert cosine_schedule(10, **kw) == pytest.approx(1.0)
    assert cosine_schedule(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_schedule(110, **kw) == pytest.approx(0.1)
    lrs = [cosine_schedule(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_build_optimizer__groups_start_at_lr_times_scale_and_keep_weight_decay():
    model = distilled()
    opt = build_optimizer(model, OptimConfig(name="adamw", layer_decay=0.5, weight_decay=0.05), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["weight_decay"] in (0.0, 0.05)
    assert isinstance(build_optimizer(model, OptimConfig(name="lars"), 0.1), LARS)
    assert isinstance(build_optimizer(model, OptimConfig(name="sgd"), 0.1), torch.optim.SGD)


def test_lars__matrix_update_scaled_by_trust_ratio_vectors_plain_momentum():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w, b], "weight_decay": 0.5}], lr=0.1, momentum=0.9, trust_coefficient=0.01)
    w.grad = torch.tensor([[1.0, 0.0]])
    b.grad = torch.tensor([2.0])
    opt.step()
    update = torch.tensor([[1.0, 0.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])  # g + wd * w
    ratio = 0.01 * 5.0 / update.norm()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * ratio * update)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # no decay, no trust ratio
    # Momentum carries the previous update.
    b.grad = torch.tensor([0.0])
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([0.8 - 0.1 * 0.9 * 2.0]))


def test_ema__is_decay_weighted_average_of_the_weights():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    assert torch.allclose(ema.state_dict()["weight"], torch.full((1, 2), 1 - 0.9**2))
    assert math.isclose(model.weight[0, 0].item(), 1.0)


def test_adamw__fused_on_cpu_and_equal_to_the_foreach_reference_within_rounding():
    """The fused kernel where torch has one (CPU here): the same update as torch's foreach AdamW."""
    torch.manual_seed(0)
    make = lambda: [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]  # noqa: E731
    ours, ref = make(), make()
    for a, b in zip(ours, ref):
        b.data.copy_(a.data)
    cfg = OptimConfig(name="adamw", betas=(0.9, 0.95), weight_decay=0.05)
    optimizer = build_optimizer([{"params": ours, "weight_decay": 0.05}], cfg, lr=1e-2, device_type="cpu")
    reference = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05, foreach=True)
    assert all(g["fused"] for g in optimizer.param_groups)
    for step in range(5):
        for a, b in zip(ours, ref):
            a.grad = b.grad = torch.randn_like(a, generator=torch.Generator().manual_seed(step))
        optimizer.step()
        reference.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
