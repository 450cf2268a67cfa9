"""The benchmarked steps on tiny configs: ours and each reference compute the same loss from the same weights,
ours is the engine's own training step, both sides use the same AdamW implementation, and the linear-path
twins are the same models on the other path."""

from __future__ import annotations

import pytest
import torch

from ssl_vit.bench import BenchEnv, WorkloadConfig, loss_checks
from ssl_vit.bench.workloads import (
    _simmim_idx_mask,
    backbone_cases,
    deit_cases,
    dino_cases,
    eval_cases,
    grad_checkpointing_cases,
    hf_mae_config,
    ijepa_cases,
    mae_cases,
    mocov3_cases,
    scaling_cases,
    simmim_cases,
    supervised_cases,
)
from ssl_vit.engine.trainer import Trainer
from ssl_vit.ops.linear import OneDNNLinear

ENV = BenchEnv(torch.device("cpu"))
TINY = dict(depth=1, embed_dim=32, num_heads=2)
BUILDERS = {
    "backbone": backbone_cases, "supervised": supervised_cases, "mae": mae_cases, "deit": deit_cases,
    "dino": dino_cases, "mocov3": mocov3_cases, "simmim": simmim_cases, "eval": eval_cases,
}
REFERENCE = {
    "backbone": "timm", "supervised": "timm", "mae": "hf", "deit": "timm", "dino": "lightly", "mocov3": "lightly",
    "simmim": "lightly", "eval": "timm",
}


def _cfg(**kw) -> WorkloadConfig:
    base = dict(model="vit_nano_patch4_32", batch_size=4, eval_batch_size=4, overrides=dict(TINY, img_size=16),
                decoder_dim=16, decoder_depth=1, decoder_heads=2, teacher="resnet10t", dino_out_dim=64, dino_hidden_dim=32, dino_bottleneck_dim=16, local_crops=2,
                moco_hidden_dim=32, moco_out_dim=16)
    return WorkloadConfig(**{**base, **kw})


@pytest.mark.parametrize("group", list(BUILDERS))
def test_cases__ours_and_the_reference_compute_the_same_loss_from_the_same_weights_then_step(group):
    cases = BUILDERS[group](_cfg(), ENV)
    assert [c.name for c in cases] == [f"{group}/ours", f"{group}/{REFERENCE[group]}"]
    assert [c.role for c in cases] == ["ours", "reference"]
    checks = loss_checks(cases, rtol=1e-5, atol=1e-6)
    assert len(checks) == 1 and checks[0]["same"], checks
    assert checks[0]["loss"] > 0
    if group != "eval":  # the same trainable architecture on both sides
        assert cases[0].info["trainable_params"] == cases[1].info["trainable_params"]
    for case in cases:
        case.step()
        assert case.images == 4


def test_ours__is_the_engine_step_and_the_reference_uses_the_same_adamw(monkeypatch):
    calls = []
    real = Trainer._optimizer_step
    monkeypatch.setattr(Trainer, "_optimizer_step", lambda self: (calls.append(self), real(self))[1])
    ours, ref = supervised_cases(_cfg(), ENV)
    ours.step()
    ours.step()
    assert len(calls) == 2 and calls[0].pos.step == 2  # lr schedule, clipping, non-finite check, step
    ours_opt, ref_opt = ours.track[1], ref.track[1]
    assert ours_opt.defaults["fused"] and ref_opt.defaults["fused"]  # fused AdamW on CPU, both sides
    assert len(ours_opt.param_groups) == 2 and len(ref_opt.param_groups) == 1  # ours: no decay on norms/biases


def test_twins_always__both_sides_on_onednn_too_with_the_same_loss(monkeypatch):
    from ssl_vit.ops import linear

    monkeypatch.setenv(linear.ENV, "auto")  # not forced off (as the suite's conftest does) ...
    monkeypatch.setattr(linear, "_measured_choice", lambda shapes: False)  # ... and measured slower: ours plain
    cases = supervised_cases(_cfg(twins="always"), ENV)
    assert [(c.name, c.linear, c.variant) for c in cases] == [
        ("supervised/ours", "plain", ""), ("supervised/ours+onednn", "onednn", "onednn"),
        ("supervised/timm", "plain", ""), ("supervised/timm+onednn", "onednn", "onednn"),
    ]
    timm_onednn = cases[3].track[0]
    assert any(type(m) is OneDNNLinear for m in timm_onednn.modules())
    assert all(c["same"] for c in loss_checks(cases, rtol=1e-5, atol=1e-6))


def test_twins_auto__where_ours_uses_onednn_the_reference_gets_it_and_ours_goes_without():
    from ssl_vit.ops.linear import set_onednn_linear

    set_onednn_linear(True)  # what the measurement picks on CPUs where oneDNN is faster
    try:
        cases = mae_cases(_cfg(), ENV)
    finally:
        set_onednn_linear(None)
    assert [(c.name, c.linear) for c in cases] == [
        ("mae/ours", "onednn"), ("mae/ours-plain", "plain"), ("mae/hf", "plain"), ("mae/hf+onednn", "onednn"),
    ]
    assert all(c["same"] for c in loss_checks(cases, rtol=1e-5, atol=1e-6))


def test_hf_mae_config__mirrors_backbone_and_decoder():
    from ssl_vit.models import create_backbone

    backbone = create_backbone("vit_tiny_patch4_32", num_classes=0, pos_embed="sincos")
    cfg = hf_mae_config(backbone, 0.75, {"decoder_dim": 128, "decoder_depth": 4, "decoder_heads": 4})
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (192, 12, 3, 768)
    assert (cfg.decoder_hidden_size, cfg.decoder_num_hidden_layers, cfg.decoder_num_attention_heads) == (128, 4, 4)
    assert (cfg.image_size, cfg.patch_size, cfg.mask_ratio, cfg.norm_pix_loss) == (32, 4, 0.75, True)


def test_deit_cases__use_the_distilled_student():
    assert deit_cases(_cfg(), ENV, reference=False)[0].info["model"] == "deit_nano_distilled_patch4_32"


def test_grad_checkpointing_cases__off_and_on_give_the_same_loss():
    cases = grad_checkpointing_cases(_cfg(overrides=dict(TINY, img_size=16, depth=2)), ENV, ["supervised", "mae"])
    assert [c.name for c in cases] == ["supervised/ours", "supervised/ours+ckpt", "mae/ours", "mae/ours+ckpt"]
    assert [c.track[0].backbone.grad_checkpointing for c in cases] == [False, True, False, True]
    assert all(c["same"] for c in loss_checks(cases, rtol=1e-6, atol=1e-7))
    for case in cases:
        case.step()


def test_scaling_cases__every_mask_ratio_then_every_other_size():
    cases = scaling_cases(_cfg(), ENV, [0.5, 0.75], [(16, 4), (32, 8)], batch_size=2)
    names = [c.name for c in cases]
    assert names == [
        "scaling/step/16px/p4/mask0.5", "scaling/encoder/16px/p4/mask0.5",
        "scaling/step/16px/p4/mask0.75", "scaling/encoder/16px/p4/mask0.75",
        "scaling/step/32px/p8/mask0.75", "scaling/encoder/32px/p8/mask0.75",
    ]
    assert [c.info["visible"] for c in cases[::2]] == [8, 4, 4]
    for case in cases:
        case.step()


def test_mocov3_reference__freezes_what_ours_freezes_and_its_teacher_follows_by_momentum():
    ours, ref = mocov3_cases(_cfg(), ENV)
    student, _, teacher, predictor = ref.track
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert {"backbone.patch_embed.proj.weight", "backbone.pos_embed"} <= frozen  # random patch projection, sin-cos
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not predictor.layers[-1].weight.requires_grad  # lightly's last BN affine: ours has none
    before = [p.clone() for p in teacher.parameters()]
    ref.step()
    ref.step()  # the second step's momentum update moves the teacher towards the stepped student
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_simmim_reference__is_fed_our_masks_and_predicts_our_pixels_on_them():
    from lightly.models.utils import patchify

    ours, ref = simmim_cases(_cfg(), ENV)
    objective, lightly_model = ours.track[0], ref.track[0]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 16, 16, generator=gen)
    mask = objective.make_masks(images, generator=gen)  # (4, 16): 3 of 4 squares of 2 x 2 patches
    assert ours.info["mask_patch_size"] == 8 and ours.info["masked_patches"] == 12
    idx_mask = _simmim_idx_mask(mask, objective.num_prefix_tokens)
    assert torch.equal(torch.zeros_like(mask).scatter(1, idx_mask - 1, True), mask)  # the same patches, class token in front
    with torch.no_grad():
        theirs, target = lightly_model(images, idx_mask)  # (4, 12, 48): the masked patches, patchify's order
        rec = patchify(objective.reconstruct(images, mask), 4)[mask].view(4, 12, -1)
        assert torch.equal(target, patchify(images, 4)[mask].view(4, 12, -1))
    torch.testing.assert_close(theirs, rec, rtol=1e-5, atol=1e-6)


def test_ijepa_cases__ours_only_on_maes_backbone_and_batch_next_to_mae_in_the_report():
    from ssl_vit.bench.report import comparisons

    cfg = _cfg()
    (ijepa,) = ijepa_cases(cfg, ENV)
    mae = mae_cases(cfg, ENV, reference=False)[0]
    assert (ijepa.name, ijepa.role, ijepa.images) == ("ijepa/ours", "ours", 4)
    assert ijepa.info["predictor_dim"] == 16 and ijepa.info["predictor_depth"] == 2  # half of 32 wide, 2 blocks at 16 px
    assert ijepa.track[0].backbone.embed_dim == mae.track[0].backbone.embed_dim
    assert ijepa.loss() > 0
    ijepa.step()
    (cross,) = comparisons([ijepa, mae], {"ijepa/ours": [0.5], "mae/ours": [0.25]})
    assert (cross["a"], cross["b"], cross["kind"], cross["ratio"]) == ("ijepa/ours", "mae/ours", "cross", 0.5)
