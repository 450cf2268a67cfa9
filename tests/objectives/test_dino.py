"""The DINO objective against independent references: lightly's DINOLoss and DINOProjectionHead, and
facebookresearch/dino's schedule formulas (utils.cosine_scheduler, DINOLoss's np.linspace warm-up)."""

from __future__ import annotations

import math
import pickle
from dataclasses import asdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightly.loss import DINOLoss
from lightly.models.modules.heads import DINOProjectionHead
from PIL import Image
from torch.utils.data import default_collate

from ssl_vit.config import ConfigError, PretrainConfig, load_config
from ssl_vit.data.config import DataConfig
from ssl_vit.engine.optim import cosine_schedule, param_groups
from ssl_vit.models import create_backbone
from ssl_vit.objectives import build_objective, get_objective
from ssl_vit.objectives.dino import (
    DINO,
    DINOConfig,
    DINOHead,
    MultiCropTransform,
    default_local_crop_size,
    dino_loss,
    teacher_temperature,
)
from ssl_vit.objectives.shared import cosine_momentum

IMG, LOCAL, PATCH = 16, 8, 4
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEAD = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def tiny_backbone(**overrides):
    kwargs = dict(depth=2, embed_dim=32, num_heads=2, img_size=IMG, num_classes=0, dynamic_img_size=True)
    return create_backbone("vit_nano_patch4_32", **{**kwargs, **overrides})


def tiny_dino(**kwargs) -> DINO:
    torch.manual_seed(0)
    return DINO(tiny_backbone(), **{**HEAD, "local_crops": 3, **kwargs})


def crops(b=4, local=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "global_crops": [torch.randn(b, 3, IMG, IMG, generator=g) for _ in range(2)],
        "local_crops": [torch.randn(b, 3, LOCAL, LOCAL, generator=g) for _ in range(local)],
    }


def lightly_loss(center: torch.Tensor, teacher_temp: float, student_temp=0.1, center_momentum=0.9) -> DINOLoss:
    ref = DINOLoss(output_dim=center.shape[-1], teacher_temp=teacher_temp, student_temp=student_temp,
                   center_momentum=center_momentum, warmup_teacher_temp_epochs=0)
    ref.center.copy_(center.reshape(1, 1, -1))
    return ref


# -- the loss ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    views=st.integers(2, 6),
    batch=st.integers(1, 5),
    teacher_temp=st.floats(0.02, 0.1),
    student_temp=st.floats(0.05, 0.3),
    seed=st.integers(0, 2**16),
)
def test_dino_loss__equals_lightly_dino_loss(views, batch, teacher_temp, student_temp, seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(views, batch, 32, generator=g) * 3  # (V, B, K)
    teacher = torch.randn(2, batch, 32, generator=g) * 3
    center = torch.randn(1, 32, generator=g)
    ref = lightly_loss(center, teacher_temp, student_temp)
    expected = ref(list(teacher), list(student), teacher_temp=teacher_temp)
    ours = dino_loss(student, teacher, center, student_temp, teacher_temp)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_dino_forward__loss_and_updated_centre_equal_lightlys_on_the_same_outputs():
    dino = tiny_dino(center_momentum=0.8)
    dino.on_train_start(total_steps=10, steps_per_epoch=2.0)
    ref = None
    for step in range(3):  # the centre moves away from zero, then both use it
        batch = crops(seed=step)
        dino.on_step_start(step, 10)
        with torch.no_grad():
            student = dino.student([batch["global_crops"], batch["local_crops"]]).unflatten(0, (5, 4))
            teacher = dino.teacher_forward(batch["global_crops"]).unflatten(0, (2, 4))
        if ref is None:
            ref = lightly_loss(dino.center, dino.current_teacher_temp, center_momentum=0.8)
        expected = ref(list(teacher), list(student), teacher_temp=dino.current_teacher_temp)
        out = dino(batch)
        torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            dino.on_step_end(step, 10)  # the centre update happens once per optimizer step
        torch.testing.assert_close(dino.center, ref.center.reshape(1, -1), rtol=1e-5, atol=1e-7)
    assert dino.center.abs().sum() > 0


def test_dino_centre__micro_batches_of_one_step_move_it_once_by_their_joint_mean():
    split, whole = tiny_dino(), tiny_dino()
    batch = crops(b=6)
    halves = [{k: [v[:3] for v in views] for k, views in batch.items()}, {k: [v[3:] for v in views] for k, views in batch.items()}]
    for half in halves:  # gradient accumulation: two forwards, one optimizer step
        split(half)
    whole(batch)
    with torch.no_grad():
        split.update_center()
        whole.update_center()
    torch.testing.assert_close(split.center, whole.center, rtol=1e-5, atol=1e-7)
    assert split.center.abs().sum() > 0


def test_dino_centre__is_a_buffer_in_the_state_dict_and_eval_forwards_leave_it():
    dino = tiny_dino().eval()
    assert "center" in dict(dino.named_buffers()) and "center" in dino.state_dict()
    dino(crops())
    with torch.no_grad():
        dino.update_center()
    assert torch.equal(dino.center, torch.zeros(1, HEAD["out_dim"]))


# -- the head ------------------------------------------------------------------------------------


def copy_lightly_head(ours: DINOHead, ref: DINOProjectionHead) -> None:
    """lightly's weights into ours: layers.i -> mlp.i, last_layer.weight_g/_v -> the parametrization's original0/1."""
    names = {f"mlp.{i}.{p}": f"layers.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    names["last_layer.parametrizations.weight.original0"] = "last_layer.weight_g"
    names["last_layer.parametrizations.weight.original1"] = "last_layer.weight_v"
    theirs = ref.state_dict()
    assert set(names) == set(ours.state_dict()) and set(names.values()) == set(theirs)
    ours.load_state_dict({k: theirs[v] for k, v in names.items()})


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")  # lightly's head
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head__forward_and_gradients_equal_lightlys_projection_head_with_the_same_weights(norm_last_layer):
    torch.manual_seed(0)
    ref = DINOProjectionHead(32, 48, 16, 64, batch_norm=False, norm_last_layer=norm_last_layer)
    ours = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16, norm_last_layer=norm_last_layer)
    copy_lightly_head(ours, ref)
    x = torch.randn(8, 32)
    out, expected = ours(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(ours.mlp[0].weight.grad, ref.layers[0].weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        ours.last_layer.parametrizations.weight.original1.grad, ref.last_layer.weight_v.grad, rtol=1e-5, atol=1e-7
    )
    norm = ours.last_layer.parametrizations.weight.original0
    assert norm.requires_grad is (not norm_last_layer) is ref.last_layer.weight_g.requires_grad


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")  # lightly's head
def test_dino_head_with_batch_norm__equals_lightlys_batch_norm_head_in_training():
    # dino.use_bn_in_head (main_dino.py's --use_bn_in_head): Linear -> BatchNorm -> GELU twice, then the
    # bottleneck. lightly's Linears before a BatchNorm have no bias; ours (the official head) keep one, zero
    # at init and cancelled by the batch mean in training anyway.
    torch.manual_seed(0)
    ref = DINOProjectionHead(32, 48, 16, 64, batch_norm=True).train()
    ours = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16, use_bn=True).train()
    theirs = ref.state_dict()
    mine = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
            "weight_v").replace("mlp.", "layers."): k for k in ours.state_dict()}
    ours.load_state_dict({mine[k]: theirs[k] for k in theirs} | {"mlp.0.bias": torch.zeros(48), "mlp.3.bias": torch.zeros(48)})
    assert set(mine) - set(theirs) == {"layers.0.bias", "layers.3.bias"}
    x = torch.randn(8, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.mlp[1].running_mean, ref.layers[1].running_mean)


def test_dino_teacher_head__uses_batch_statistics_like_the_official_teacher_in_train_mode():
    dino = tiny_dino(use_bn_in_head=True).train()
    assert not dino.teacher["backbone"].training and dino.teacher["head"].training
    assert not dino.eval().teacher["head"].training


def test_dino_head__initialised_as_the_official_head():
    torch.manual_seed(0)
    head = DINOHead(64, 1000, hidden_dim=512, bottleneck_dim=128)
    for i in (0, 2, 4):
        assert abs(head.mlp[i].weight.std().item() - 0.02) < 0.002 and head.mlp[i].weight.abs().max() < 2
        assert torch.equal(head.mlp[i].bias, torch.zeros_like(head.mlp[i].bias))
    weight_g = head.last_layer.parametrizations.weight.original0
    assert weight_g.shape == (1000, 1) and torch.equal(weight_g, torch.ones_like(weight_g))
    rows = head.last_layer.weight.norm(dim=1)  # the effective weight: unit rows
    torch.testing.assert_close(rows, torch.ones(1000))
    out = head(torch.randn(5, 64))
    assert out.shape == (5, 1000) and out.abs().max() <= 1 + 1e-5  # a unit bottleneck times unit rows


# -- schedules -----------------------------------------------------------------------------------


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino utils.cosine_scheduler, transcribed."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def official_teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """main_dino.py DINOLoss.teacher_temp_schedule (one value per epoch), transcribed."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


@pytest.mark.parametrize("epochs, per_epoch, base", [(100, 7, 0.996), (10, 1, 0.9995), (3, 50, 0.99)])
def test_cosine_momentum__equals_the_official_cosine_schedule_at_every_step(epochs, per_epoch, base):
    official = official_cosine_scheduler(base, 1, epochs, per_epoch)
    total = epochs * per_epoch
    ours = np.array([cosine_momentum(step, total, base) for step in range(total)])
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-12)
    assert ours[0] == pytest.approx(base) and np.all(np.diff(ours) > 0) and ours[-1] < 1.0


def test_weight_decay_schedule__engines_cosine_equals_the_official_0_04_to_0_4():
    official = official_cosine_scheduler(0.04, 0.4, 100, 5)
    for step in [0, 1, 99, 250, 499]:
        assert cosine_schedule(step, base_lr=0.04, total_steps=500, min_lr=0.4) == pytest.approx(official[step], abs=1e-12)


@pytest.mark.parametrize("warmup, start, end", [(30, 0.04, 0.07), (0, 0.04, 0.04), (1, 0.03, 0.07), (2, 0.04, 0.06)])
def test_teacher_temperature__equals_the_official_linspace_at_every_epochs_first_step(warmup, start, end):
    epochs, per_epoch = 100, 4
    official = official_teacher_temp_schedule(start, end, warmup, epochs)
    dino = tiny_dino(warmup_teacher_temp=start, teacher_temp=end, warmup_teacher_temp_epochs=warmup)
    dino.on_train_start(total_steps=epochs * per_epoch, steps_per_epoch=float(per_epoch))
    for epoch in [0, 1, 2, 15, 28, 29, 30, 31, 99]:
        dino.on_step_start(epoch * per_epoch, epochs * per_epoch)
        assert dino.current_teacher_temp == pytest.approx(official[epoch], abs=1e-12), epoch
    # Between epochs' first steps: linear, inside the official values of the neighbouring epochs.
    values = [teacher_temperature(s / per_epoch, start, end, warmup) for s in range(epochs * per_epoch)]
    lo, hi = min(start, end), max(start, end)
    assert all(lo <= v <= hi for v in values)
    assert all(b >= a for a, b in zip(values, values[1:])) or start > end


def test_schedules__a_shortened_run_keeps_each_warm_ups_share():
    # 100 "epochs" over 50 steps (train.max_steps): 30 warm-up epochs -> 30% of the steps.
    dino = tiny_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30, freeze_last_layer_epochs=10)
    dino.on_train_start(total_steps=50, steps_per_epoch=0.5)
    dino.on_step_start(0, 50)
    assert dino.current_teacher_temp == pytest.approx(0.04)
    dino.on_step_start(15, 50)  # epoch 30: warm-up over
    assert dino.current_teacher_temp == pytest.approx(0.07)
    dino.on_step_start(7, 50)  # epoch 14 of a linspace over epochs 0..29
    assert dino.current_teacher_temp == pytest.approx(0.04 + 0.03 * 14 / 29)
    assert [dino.last_layer_frozen(s) for s in (0, 4, 5, 6)] == [True, True, False, False]


def test_on_step_end__teacher_is_the_ema_with_the_scheduled_momentum():
    dino = tiny_dino(momentum_teacher=0.9)
    with torch.no_grad():
        for p in [*dino.backbone.parameters(), *dino.head.parameters()]:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in dino.teacher.parameters()]
    student = [*dino.backbone.parameters(), *dino.head.parameters()]
    with torch.no_grad():
        dino.on_step_end(3, 10)
    m = 1 - 0.1 * (math.cos(math.pi * 3 / 10) + 1) / 2
    for t, old, s in zip(dino.teacher.parameters(), before, student):
        torch.testing.assert_close(t, old * m + s * (1 - m), rtol=0, atol=1e-6)


# -- teacher and gradients -----------------------------------------------------------------------


def test_teacher__no_gradient_not_optimised_eval_mode_and_synced_to_the_student_at_step_0():
    dino = tiny_dino()
    assert all(not p.requires_grad for p in dino.teacher.parameters())
    trained = {id(p) for g in param_groups(dino, 0.04) for p in g["params"]}
    assert not trained & {id(p) for p in dino.teacher.parameters()}
    assert dino.train().teacher.training is False and dino.backbone.training is True  # no drop path in the teacher
    dino(crops())["loss"].backward()
    assert all(p.grad is None for p in dino.teacher.parameters())
    assert dino.backbone.blocks[0].attn.qkv.weight.grad is not None
    # A model.checkpoint loads into the student after __init__: step 0 starts the teacher from it.
    with torch.no_grad():
        dino.backbone.pos_embed.add_(1.0)
        dino.head.mlp[0].weight.add_(1.0)
    dino.on_train_start(10, 1.0)
    dino.on_step_start(0, 10)
    assert torch.equal(dino.teacher["backbone"].pos_embed, dino.backbone.pos_embed)
    assert torch.equal(dino.teacher["head"].mlp[0].weight, dino.head.mlp[0].weight)
    assert dino.export_backbone() is dino.teacher["backbone"]


def test_last_layer__no_gradient_and_no_update_while_frozen_then_trained():
    dino = tiny_dino(freeze_last_layer_epochs=1)
    dino.on_train_start(total_steps=10, steps_per_epoch=2.0)  # frozen during steps 0 and 1
    optimizer = torch.optim.AdamW(param_groups(dino, 0.04), lr=1e-2)
    last = dino.head.last_layer.parametrizations.weight.original1
    start = last.detach().clone()
    for step in range(3):
        dino.on_step_start(step, 10)
        dino(crops(seed=step))["loss"].backward()
        dino.on_before_optimizer_step(step, 10)
        frozen = step < 2
        assert (last.grad is None) is frozen
        assert dino.head.mlp[4].weight.grad is not None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            dino.on_step_end(step, 10)
        assert torch.equal(last, start) is frozen  # not even weight decay while frozen (grad None)
    assert dino.head.last_layer.parametrizations.weight.original0.grad is None  # norm_last_layer: g stays 1


# -- views ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("image, patch, expected", [(224, 16, 96), (224, 8, 96), (32, 4, 12), (16, 4, 8), (96, 16, 48), (8, 4, 4)])
def test_default_local_crop_size__three_sevenths_in_whole_patches(image, patch, expected):
    assert default_local_crop_size(image, patch) == expected


def test_multi_crop_transform__counts_sizes_and_collated_batches():
    dino = tiny_dino(local_crops=3)
    transform = dino.train_transform(DataConfig(image_size=IMG))
    assert isinstance(transform, MultiCropTransform)
    transform = pickle.loads(pickle.dumps(transform))  # runs in DataLoader workers
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    views = transform(image)
    assert [v.shape for v in views["global_crops"]] == [(3, IMG, IMG)] * 2
    assert [v.shape for v in views["local_crops"]] == [(3, LOCAL, LOCAL)] * 3
    batch = default_collate([transform(image) for _ in range(5)])
    assert [v.shape for v in batch["global_crops"]] == [(5, 3, IMG, IMG)] * 2
    assert [v.shape for v in batch["local_crops"]] == [(5, 3, LOCAL, LOCAL)] * 3
    out = dino(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    # Without local crops: the global ones only (2 pairs), and no key at all.
    only_global = tiny_dino(local_crops=0).train_transform(DataConfig(image_size=IMG))(image)
    assert set(only_global) == {"global_crops"}


def test_multi_crop_transform__the_papers_views():
    t = MultiCropTransform(224, 96, 8, (0.4, 1.0), (0.05, 0.4), MEAN, STD)
    text = [repr(t.global1), repr(t.global2), repr(t.local)]
    assert all("ColorJitter(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.8, 1.2), hue=(-0.1, 0.1))" in s for s in text)
    assert all("RandomGrayscale(p=0.2)" in s and "p=0.8" in s for s in text)
    assert [c.transforms[0].scale for c in (t.global1, t.global2, t.local)] == [(0.4, 1.0), (0.4, 1.0), (0.05, 0.4)]
    assert [c.transforms[0].size for c in (t.global1, t.global2, t.local)] == [(224, 224), (224, 224), (96, 96)]
    blurs = [next(s for s in c.transforms if type(s).__name__ == "RandomGaussianBlur") for c in (t.global1, t.global2, t.local)]
    assert [b.p for b in blurs] == [1.0, 0.1, 0.5] and blurs[0].radius == pytest.approx((0.1, 2.0))
    assert "RandomSolarize(threshold=128,p=0.2)" in text[1].replace(" ", "") and "Solarize" not in text[0] + text[2]


def test_train_transform__errors_name_the_fix():
    fixed = DINO(tiny_backbone(dynamic_img_size=False), **HEAD, local_crops=2)
    with pytest.raises(ValueError, match=r"dynamic_img_size: true"):
        fixed.train_transform(DataConfig(image_size=IMG))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_dino(local_crop_size=6).train_transform(DataConfig(image_size=IMG))
    with pytest.raises(ValueError, match="dino.local_crops_scale"):
        tiny_dino(local_crops_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="dino.color_jitter"):
        tiny_dino(color_jitter=(0.4, 0.4, 0.2, 0.7))


def test_train_transform__colour_jitter_and_grayscale_from_the_config():
    t = tiny_dino(color_jitter=(0.1, 0.2, 0.5, 0.5), grayscale=0.4).train_transform(DataConfig(image_size=IMG))
    for view in (t.global1, t.global2, t.local):
        text = repr(view)
        assert "brightness=(0.9, 1.1), contrast=(0.8, 1.2), saturation=(0.5, 1.5), hue=(-0.5, 0.5)" in text
        assert "RandomGrayscale(p=0.4)" in text


# -- registry and config -------------------------------------------------------------------------


def test_dino__registered_with_its_config_group_and_backbone_defaults():
    assert get_objective("dino") is DINO
    assert isinstance(build_objective("dino", tiny_backbone(), **{**asdict(DINOConfig()), **HEAD}), DINO)
    assert DINO.config_groups == {"dino": DINOConfig} and DINO.backbone_defaults == {"dynamic_img_size": True}
    cfg = load_config(PretrainConfig, ["objective.name=dino", "dino.local_crops=2", "dino.global_crops_scale=[0.3, 1.0]"])
    assert cfg.dino.local_crops == 2 and tuple(cfg.dino.global_crops_scale) == (0.3, 1.0) and cfg.dino.out_dim == 65536
    with pytest.raises(ConfigError, match="did you mean 'dino.local_crops'"):
        load_config(PretrainConfig, ["objective.name=dino", "dino.local_crop=2"])
