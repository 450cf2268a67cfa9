"""I-JEPA: multi-block masks, the loss against lightly's predictor and the official code, the EMA target encoder."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from lightly.data.ijepa_collate import IJEPAMaskCollator
from lightly.models import utils as lightly_utils
from lightly.models.modules.ijepa_timm import IJEPAPredictorTIMM

from ssl_vit.models import create_backbone
from ssl_vit.objectives import OBJECTIVES, build_objective
from ssl_vit.objectives import ijepa as ijepa_mod
from ssl_vit.objectives.ijepa import IJEPA, IJEPAConfig, ijepa_momentum, ijepa_transform
from ssl_vit.objectives.masking import block_size, first_indices, multiblock_masks

IMG, PATCH = 32, 4  # an 8x8 grid: N = 64 patches
GRID, N = (8, 8), 64
WIDTH = 32


def tiny_backbone(**overrides):
    kwargs = dict(depth=2, embed_dim=WIDTH, num_heads=2, img_size=IMG, pos_embed="sincos", num_classes=0)
    kwargs.update(overrides)
    return create_backbone("vit_nano_patch4_32", **kwargs)


def tiny_ijepa(backbone=None, **kwargs) -> IJEPA:
    torch.manual_seed(0)
    kw = dict(predictor_dim=16, predictor_depth=2, min_context=4)
    kw.update(kwargs)
    return IJEPA(backbone or tiny_backbone(), **kw)


def images(b=4, seed=0):
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def masks(b=4, seed=0, grid=GRID, **kwargs):
    kwargs.setdefault("min_context", 4)
    return multiblock_masks(b, grid, generator=torch.Generator().manual_seed(seed), **kwargs)


def box(ids: torch.Tensor, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the bounding box of patch indices."""
    rows, cols = ids // width, ids % width
    return int(rows.min()), int(cols.min()), int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


# -- masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_block_size__is_the_official_block_shape_for_the_same_draw(seed):
    # lightly's collator transcribes facebookresearch/ijepa's _sample_block_size; on a 14x14 grid a
    # target block never reaches the grid's side, where the official code shrinks it (ours does not).
    official = IJEPAMaskCollator(input_size=224, patch_size=16)  # 14x14
    expected = official._sample_block_size(torch.Generator().manual_seed(seed), (0.15, 0.2), (0.75, 1.5))
    u = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
    assert block_size(u, (14, 14), (0.15, 0.2), (0.75, 1.5)) == expected


@pytest.mark.parametrize("seed", range(15))
def test_multiblock_masks__targets_are_full_blocks_of_the_configured_scale_and_aspect_ratio(seed):
    grid, n = (32, 32), 1024  # large enough for rounding to stay within a patch
    context_ids, target_ids = masks(b=3, seed=seed, grid=grid, min_context=10)
    b, t, kt = target_ids.shape
    assert (b, t) == (3, 4)
    for ids in target_ids.reshape(-1, kt):
        top, left, h, w = box(ids, 32)
        assert h * w == kt == len(set(ids.tolist()))  # a full rectangle, no patch twice
        assert 0.15 * n - (h + w) / 2 - 1 <= h * w <= 0.2 * n + (h + w) / 2 + 1  # area: int(N * scale), rounded sides
        assert 0.75 - 1.5 / w <= h / w <= 1.5 + 1.5 / w  # height / width, each side rounded to a patch


@pytest.mark.parametrize("seed", range(15))
def test_multiblock_masks__context_lies_in_one_square_block_of_the_configured_scale(seed):
    context_ids, _ = masks(b=6, seed=seed, grid=(32, 32), min_context=10)
    u = torch.rand(2, generator=torch.Generator().manual_seed(seed)).tolist()[1]  # the context's draw
    side, side_w = block_size(u, (32, 32), (0.85, 1.0), (1.0, 1.0))
    assert side == side_w and 0.85 * 1024 - side - 1 <= side * side <= 1024
    for ids in context_ids:
        _, _, h, w = box(ids, 32)
        assert h <= side and w <= side


@pytest.mark.parametrize("seed", range(15))
def test_multiblock_masks__targets_never_overlap_the_context_and_counts_are_equal_across_the_batch(seed):
    context_ids, target_ids = masks(b=16, seed=seed, min_context=4)
    assert context_ids.shape[0] == target_ids.shape[0] == 16  # rectangular: the same counts for every sample
    assert context_ids.shape[1] >= 4
    for ctx, tgt in zip(context_ids, target_ids):
        assert not set(ctx.tolist()) & set(tgt.flatten().tolist())
        assert torch.all(ctx[1:] > ctx[:-1])  # distinct, raster order (the cut keeps the first ones)


def test_first_indices__keeps_the_first_true_positions_of_each_row_in_order():
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert first_indices(mask, 3).tolist() == [[1, 2, 4], [0, 3, 4], [0, 1, 2]]
    assert first_indices(mask.view(3, 1, 6), 2).shape == (3, 1, 2)


def test_multiblock_masks__contexts_are_cut_to_the_batchs_smallest():
    # Drawn one at a time (a batch of 1 keeps its whole context), the same samples keep more patches.
    sizes = []
    for seed in range(20):
        ctx, _ = masks(b=32, seed=seed)
        sizes.append(ctx.shape[1])
    alone = [masks(b=1, seed=s)[0].shape[1] for s in range(20)]
    assert sum(alone) > sum(sizes)


def test_multiblock_masks__are_seeded_and_reach_every_row_and_column():
    a, b = masks(b=8, seed=3), masks(b=8, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(masks(b=8, seed=4)[1], a[1])
    # Unlike the official randint(0, H - h), blocks may touch the last row and column.
    touched = torch.zeros(N, dtype=torch.bool)
    for seed in range(20):
        touched[masks(b=16, seed=seed)[1].flatten()] = True
    assert touched.all()


def test_multiblock_masks__impossible_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match="Lower min_context"):
        multiblock_masks(4, (4, 4), min_context=15)
    with pytest.raises(ValueError, match="min_context"):
        tiny_ijepa(min_context=60)  # checked when the objective is built, not at the first step


# -- the objective -------------------------------------------------------------------------------


def test_ijepa__is_registered_and_builds_from_its_config_group():
    cfg = {**asdict(IJEPAConfig()), "predictor_dim": 16, "predictor_depth": 1, "min_context": 4}
    obj = build_objective("ijepa", tiny_backbone(), **cfg)
    assert OBJECTIVES["ijepa"] is IJEPA and isinstance(obj, IJEPA)
    assert IJEPA.needs_labels is False and IJEPA.config_groups == {"ijepa": IJEPAConfig}
    assert IJEPA.backbone_defaults == {"pos_embed": "sincos"}
    assert obj.export_backbone() is obj.target_encoder
    assert len(obj.predictor.predictor_blocks) == 1
    assert obj.predictor.predictor_blocks[0].attn.num_heads == 2  # heads None: the backbone's


@pytest.mark.parametrize("kwargs,match", [
    ({"predictor_dim": 18}, "predictor_dim"),
    ({"target_scale": (0.3, 0.2)}, "target_scale"),
    ({"momentum": 0.999, "momentum_end": 0.99}, "momentum"),
])
def test_ijepa__rejects_bad_settings_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_ijepa(**kwargs)


@pytest.mark.parametrize("targets", [1, 4])
def test_predictor__outputs_one_encoder_width_vector_per_target_patch(targets):
    obj = tiny_ijepa(num_targets=targets)
    context_ids, target_ids = masks(b=3, num_targets=targets)
    z = torch.randn(3, context_ids.shape[1], WIDTH)
    out = obj.predictor(z, context_ids, target_ids)
    assert out.shape == (targets * 3, target_ids.shape[2], WIDTH)


def lightly_predictor(obj: IJEPA) -> IJEPAPredictorTIMM:
    """lightly's I-JEPA predictor (a transcription of the official one) with our predictor's weights."""
    ours = obj.predictor
    ref = IJEPAPredictorTIMM(
        num_patches=N, depth=len(ours.predictor_blocks), mlp_dim=WIDTH,
        predictor_embed_dim=ours.mask_token.shape[-1], num_heads=ours.predictor_blocks[0].attn.num_heads,
    )
    # The fixed positions are built independently: lightly's sin-cos equals ours.
    torch.testing.assert_close(ref.decoder.pos_embed.detach(), ours.predictor_pos_embed)
    names = {"mask_token": "decoder.mask_token", "predictor_pos_embed": "decoder.pos_embed",
             "predictor_blocks.": "decoder.blocks.", "predictor_norm.": "decoder.norm."}
    state = {}
    for key, value in ours.state_dict().items():
        for old, new in names.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = value
    ref.load_state_dict(state, strict=True)
    return ref


def official_loss(obj: IJEPA, ref: IJEPAPredictorTIMM, x, context_ids, target_ids) -> torch.Tensor:
    """facebookresearch/ijepa src/train.py's forward_target / forward_context / loss_fn, with lightly's
    apply_masks, repeat_interleave_batch and predictor; the encoders are the objective's (patch tokens)."""
    masks_enc = [context_ids]
    masks_pred = [target_ids[:, j] for j in range(target_ids.shape[1])]
    prefix = obj.backbone.num_prefix_tokens
    with torch.no_grad():
        h = obj.target_encoder.forward_features(x)[:, prefix:]
        h = F.layer_norm(h, (h.size(-1),))
        h = lightly_utils.apply_masks(h, masks_pred)
        h = lightly_utils.repeat_interleave_batch(h, len(x), repeat=len(masks_enc))
    z = obj.backbone.forward_features(x, context_ids)[:, prefix:]
    z = ref(z, masks_enc, masks_pred)
    return F.smooth_l1_loss(z, h)


@pytest.mark.parametrize("class_token", [True, False])
def test_ijepa_loss__equals_the_official_code_with_lightlys_predictor_on_the_same_weights_and_masks(class_token):
    # Without a class token: the paper's encoder
    # (model.global_pool=avg model.args={class_token: false, fc_norm: false}).
    no_token = dict(class_token=False, global_pool="avg", fc_norm=False)
    obj = tiny_ijepa(tiny_backbone(**({} if class_token else no_token)), predictor_heads=4)
    assert obj.num_prefix_tokens == int(class_token)
    with torch.no_grad():  # a target encoder that differs from the context encoder
        for p in obj.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = lightly_predictor(obj)
    x = images(b=5)
    context_ids, target_ids = masks(b=5, seed=1)
    ours = obj({"pixel_values": x, "context_ids": context_ids, "target_ids": target_ids})["loss"]
    expected = official_loss(obj, ref, x, context_ids, target_ids)
    torch.testing.assert_close(ours, expected)
    # The same gradient reaches the context encoder.
    params = [p for p in obj.backbone.parameters() if p.requires_grad]
    ours_grad = torch.autograd.grad(ours, params)
    ref_grad = torch.autograd.grad(expected, params)
    for a, b in zip(ours_grad, ref_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ijepa__target_encoder_gets_no_gradient_and_only_the_ema_moves_it():
    obj = tiny_ijepa()
    assert not any(p.requires_grad for p in obj.target_encoder.parameters())
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-2)
    before = {k: v.clone() for k, v in obj.target_encoder.state_dict().items()}
    obj.on_step_start(0, 10)
    obj({"pixel_values": images()})["loss"].backward()
    assert all(p.grad is None for p in obj.target_encoder.parameters())
    assert all(p.grad is not None for p in obj.backbone.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in obj.predictor.parameters())
    opt.step()
    for k, v in obj.target_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k  # the optimizer never touches it
    online = {k: v.clone() for k, v in obj.backbone.state_dict().items()}
    with torch.no_grad():
        obj.on_step_end(0, 10)
    for k, v in obj.target_encoder.state_dict().items():  # the official update: m * target + (1 - m) * online
        torch.testing.assert_close(v, before[k] * 0.996 + (1 - 0.996) * online[k])


def test_ijepa_momentum__is_the_official_linear_schedule():
    ema, ipe, epochs, ipe_scale = (0.996, 1.0), 7, 3, 1.0
    official = (  # src/train.py's momentum_scheduler
        ema[0] + i * (ema[1] - ema[0]) / (ipe * epochs * ipe_scale) for i in range(int(ipe * epochs * ipe_scale) + 1)
    )
    for step, m in zip(range(ipe * epochs), official):  # next(momentum_scheduler) after each step
        assert ijepa_momentum(step, ipe * epochs, *ema) == pytest.approx(m, abs=1e-15)


def test_ijepa__target_restarts_from_the_context_encoder_at_step_zero_only():
    obj = tiny_ijepa()
    with torch.no_grad():  # e.g. model.checkpoint loaded into the backbone after the objective was built
        obj.backbone.blocks[0].attn.qkv.weight.add_(1.0)
    obj.on_step_start(3, 10)
    assert not torch.equal(obj.target_encoder.blocks[0].attn.qkv.weight, obj.backbone.blocks[0].attn.qkv.weight)
    obj.on_step_start(0, 10)
    for t, s in zip(obj.target_encoder.state_dict().values(), obj.backbone.state_dict().values()):
        assert torch.equal(t, s)


def test_ijepa_masks__follow_seed_step_and_micro_batch_so_a_resume_draws_the_same():
    a, b = tiny_ijepa(), tiny_ijepa()  # the same run seed: the same mask seed
    assert torch.equal(a.mask_seed, b.mask_seed)
    a.on_step_start(5, 10)
    first, second = a.sample_masks(4), a.sample_masks(4)  # two micro-batches of step 5
    b.on_step_start(5, 10)
    assert all(torch.equal(x, y) for x, y in zip(first, b.sample_masks(4)))
    assert all(torch.equal(x, y) for x, y in zip(second, b.sample_masks(4)))
    assert not torch.equal(first[1], second[1])
    b.on_step_start(6, 10)
    assert not torch.equal(b.sample_masks(4)[1], first[1])


def test_ijepa_masks__two_processes_take_their_rows_of_one_global_batch(monkeypatch):
    obj = tiny_ijepa()
    obj.on_step_start(2, 10)
    whole = obj.sample_masks(8)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(ijepa_mod.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(ijepa_mod.dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(ijepa_mod.dist, "get_rank", lambda r=rank: r)
        obj.on_step_start(2, 10)
        parts.append(obj.sample_masks(4))
    assert torch.equal(torch.cat([parts[0][0], parts[1][0]]), whole[0])
    assert torch.equal(torch.cat([parts[0][1], parts[1][1]]), whole[1])


def test_ijepa__forward_logs_mask_sizes_and_momentum():
    obj = tiny_ijepa()
    obj.on_step_start(5, 10)
    out = obj({"pixel_values": images()})
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert 0 < float(out["context_fraction"]) < 1 and 0.1 < float(out["target_fraction"]) < 0.25
    assert float(out["momentum"]) == pytest.approx(0.996 + 5 * 0.004 / 10)


def test_ijepa_transform__crops_to_the_image_size_without_flips_when_hflip_is_off():
    from PIL import Image

    from ssl_vit.data.config import DataConfig

    transform = ijepa_transform(DataConfig(image_size=16, hflip=0.0))
    crop = transform.transforms[0]
    assert crop.scale == (0.3, 1.0) and len(transform.transforms) == 3  # crop, to tensor, normalise
    assert transform(Image.new("RGB", (40, 30))).shape == (3, 16, 16)
    assert math.isclose(ijepa_transform(DataConfig(crop_scale_min=0.5)).transforms[0].scale[0], 0.5)


def test_init__every_linear_starts_as_init_model_leaves_it_without_the_depth_rescale():
    """src/helper.py's init_model redraws every nn.Linear of encoder and predictor as trunc_normal(0.02) with
    zero bias after the constructors' fix_init_weight, so the last blocks' attn.proj / mlp.fc2 are not
    divided by sqrt(2 * layer) when training starts."""
    torch.manual_seed(0)
    backbone = create_backbone("vit_nano_patch4_32", depth=4, num_classes=0)
    obj = tiny_ijepa(backbone, predictor_dim=64, predictor_depth=4)  # 4 blocks: the rescale would be 1.4-2.8x
    for blocks in (obj.backbone.blocks, obj.predictor.predictor_blocks):
        for block in blocks:
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                assert linear.weight.std().item() == pytest.approx(0.02, rel=0.1)
                assert torch.count_nonzero(linear.bias) == 0
