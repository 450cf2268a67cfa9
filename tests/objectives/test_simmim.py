"""The SimMIM objective: its masks (microsoft/SimMIM's MaskGenerator), its loss against lightly's modules and
a transcription of the official `SimMIM.forward`, the masked-pixels-only loss, the unmasked forward against
timm, the official init and the picture.

lightly 1.6 has no SimMIM class: its example (examples/pytorch/simmim.py) builds one from
`MaskedVisionTransformerTIMM` (masked tokens replaced by a mask token after the patch embedding, before the
positions), a linear decoder on the masked tokens and `nn.L1Loss` against the patchified pixels. It
differs from the paper's code in what it masks (single ViT patches at ratio 0.75, no mask-patch size) and
in the loss's normalisation: the mean over the masked values, where the official code divides the masked
sum by (masked pixels + 1e-5) x channels. Fed the same masks and weights, the two agree but for that
epsilon (a relative 1e-5 / masked pixels).
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightly.models import utils as lightly_utils
from lightly.models.modules.masked_vision_transformer_timm import MaskedVisionTransformerTIMM
from PIL import Image

from ssl_vit.accepts import rule_of
from ssl_vit.config import ConfigError, PretrainConfig, load_config
from ssl_vit.data.config import DataConfig
from ssl_vit.engine.seeding import isolated_rng
from ssl_vit.models import create_backbone
from ssl_vit.objectives import OBJECTIVES, build_objective
from ssl_vit.objectives.masking import cell_masks, num_masked_cells
from ssl_vit.objectives.simmim import SimMIM, SimMIMConfig, norm_targets

IMG, PATCH, MASK_PATCH = 16, 4, 8  # a 4x4 patch grid tiled by 2x2 cells of 2x2 patches
N, D = (IMG // PATCH) ** 2, 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_backbone(**overrides):
    kwargs = dict(depth=2, embed_dim=D, num_heads=2, img_size=IMG, num_classes=0)
    return create_backbone("vit_nano_patch4_32", **{**kwargs, **overrides})


def tiny_simmim(**overrides) -> SimMIM:
    torch.manual_seed(0)
    return SimMIM(tiny_backbone(**overrides), mask_patch_size=MASK_PATCH, mask_ratio=0.6)


def batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(b, 3, IMG, IMG, generator=g),
        "mask": cell_masks(b, (4, 4), 2, 0.6, generator=g),
    }


def timm_twin(backbone) -> nn.Module:
    name, kwargs = backbone.timm_spec()
    twin = timm.create_model(name, pretrained=False, **kwargs)
    twin.load_state_dict(backbone.state_dict(), strict=True)
    return twin


# -- registration and config ---------------------------------------------------------------------


def test_simmim__is_registered_and_builds_from_its_config_group():
    model = build_objective("simmim", tiny_backbone(), **{**dataclasses.asdict(SimMIMConfig()), "mask_patch_size": 8})
    assert OBJECTIVES["simmim"] is SimMIM and isinstance(model, SimMIM)
    assert SimMIM.needs_labels is False and SimMIM.config_groups == {"simmim": SimMIMConfig}
    assert (SimMIMConfig().mask_patch_size, SimMIMConfig().mask_ratio) == (32, 0.6)  # the paper's
    assert model.cell == 2 and model.mask_ratio == 0.6


def test_simmim_config__every_field_declares_what_it_accepts_and_refuses_the_rest():
    for field in dataclasses.fields(SimMIMConfig):
        if field.name == "init":  # a choice: the config's Literal type refuses any other name
            with pytest.raises(ConfigError, match="simmim.init' got 'xavier'.*one of 'beit', 'timm'"):
                load_config(PretrainConfig, ["objective.name=simmim", "simmim.init=xavier"])
            continue
        rule, meaning = rule_of(field)
        assert rule is not None and meaning, field.name
        assert rule.accepts(field.default), field.name
        for bad in rule.outside(field.type in (int, "int")):
            with pytest.raises(ConfigError, match=f"simmim.{field.name}"):
                load_config(PretrainConfig, ["objective.name=simmim", f"simmim.{field.name}={bad}"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_patch_size": 6}, "not a multiple of the ViT patch size 4"),
        ({"mask_patch_size": 12}, "does not divide the 16x16 images"),
        ({"mask_ratio": 1.0}, "strictly between 0 and 1"),
    ],
)
def test_simmim__impossible_masks_are_refused_naming_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimMIM(tiny_backbone(), **{"mask_patch_size": 8, **kwargs})


# -- masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cells, ratio, count",
    [(49, 0.6, 30), (4, 0.6, 3), (16, 0.6, 10), (10, 0.3, 3), (36, 0.75, 27), (4, 0.01, 1)],
)
def test_num_masked_cells__rounds_up_as_the_official_mask_generator(cells, ratio, count):
    assert num_masked_cells(cells, ratio) == count
    if ratio != 0.3:  # the official np.ceil(10 * 0.3) is 4: floating-point dust; ours keeps 3
        assert int(np.ceil(cells * ratio)) == count


@pytest.mark.parametrize(
    "grid, cell, ratio", [((4, 4), 2, 0.6), ((14, 14), 2, 0.6), ((8, 8), 4, 0.5), ((6, 4), 2, 0.4)]
)
def test_cell_masks__exact_count_per_sample_and_whole_cells(grid, cell, ratio):
    gh, gw = grid
    masks = cell_masks(64, grid, cell, ratio, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (64, gh * gw) and masks.dtype == torch.bool
    cells = masks.view(64, gh // cell, cell, gw // cell, cell)
    coarse = cells[:, :, 0, :, 0]  # (B, ch, cw): one value per cell ...
    assert torch.equal(cells, coarse[:, :, None, :, None].expand_as(cells))  # ... shared by all its patches
    count = num_masked_cells(coarse[0].numel(), ratio)
    assert (coarse.flatten(1).sum(1) == count).all()
    assert (masks.sum(1) == count * cell * cell).all()
    assert len({tuple(m.tolist()) for m in coarse.flatten(1)}) > 1  # samples differ


def test_cell_masks__seeded_draws_repeat_and_every_cell_is_drawn_alike():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(cell_masks(8, (4, 4), 2, 0.6, generator=g(3)), cell_masks(8, (4, 4), 2, 0.6, generator=g(3)))
    assert not torch.equal(cell_masks(8, (4, 4), 2, 0.6, generator=g(3)), cell_masks(8, (4, 4), 2, 0.6, generator=g(4)))
    freq = cell_masks(4000, (4, 4), 2, 0.6, generator=g(0)).float().mean(0)  # each cell masked 3/4 of the time
    assert torch.allclose(freq, torch.full_like(freq, 0.75), atol=0.03)


def test_cell_masks__a_grid_the_cells_cannot_tile_is_refused():
    with pytest.raises(ValueError, match="cannot be tiled by 3x3-patch mask cells"):
        cell_masks(1, (4, 4), 3, 0.6)


def test_train_transform__crop_and_a_per_sample_mask_seeded_like_the_crop():
    model = tiny_simmim()
    cfg = DataConfig(image_size=IMG, mean=MEAN, std=STD)
    transform = model.train_transform(cfg)
    assert transform.crop.transforms[0].scale == (0.67, 1.0)  # the paper's crop
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8))
    with isolated_rng(7):
        a = transform(image)
    with isolated_rng(7):
        b = transform(image)
    assert a["pixel_values"].shape == (3, IMG, IMG) and a["mask"].shape == (N,) and a["mask"].dtype == torch.bool
    assert int(a["mask"].sum()) == 3 * 4  # 3 of 4 cells of 4 patches
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(ValueError, match="data.image_size=20 is not a multiple of simmim.mask_patch_size=8"):
        model.train_transform(DataConfig(image_size=20))


# -- the loss ----------------------------------------------------------------------------------


def official_simmim_loss(
    twin: nn.Module, mask_token: torch.Tensor, decoder: nn.Module, x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """microsoft/SimMIM models/simmim.py, transcribed: VisionTransformerForSimMIM.forward then SimMIM.forward,
    on timm's ViT with the same weights; `mask` (B, gh, gw) at the ViT patch grid (the MaskGenerator's)."""
    patch_size, in_chans = 4, 3
    # encoder
    z = twin.patch_embed(x)
    B, L, _ = z.shape
    tokens = mask_token.expand(B, L, -1)
    w = mask.flatten(1).unsqueeze(-1).type_as(tokens)
    z = z * (1 - w) + tokens * w
    z = torch.cat((twin.cls_token.expand(B, -1, -1), z), dim=1)
    z = twin.pos_drop(z + twin.pos_embed)
    for blk in twin.blocks:
        z = blk(z)
    z = twin.norm(z)[:, 1:]
    B, L, C = z.shape
    H = W = int(L**0.5)
    z = z.permute(0, 2, 1).reshape(B, C, H, W)
    # SimMIM
    x_rec = decoder(z)
    mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans


def test_simmim_loss__equals_a_transcription_of_the_official_code_with_its_gradients():
    model = tiny_simmim().eval()
    twin = timm_twin(model.backbone).eval()
    token = nn.Parameter(model.mask_token.detach().clone())
    decoder = nn.Sequential(nn.Conv2d(D, PATCH * PATCH * 3, 1), nn.PixelShuffle(PATCH))
    decoder.load_state_dict(model.decoder.state_dict())
    b = batch()
    ours = model(b)["loss"]
    official = official_simmim_loss(twin, token, decoder, b["pixel_values"], b["mask"].view(4, 4, 4))
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=0)
    ours.backward()
    official.backward()
    torch.testing.assert_close(model.mask_token.grad, token.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(model.decoder[0].weight.grad, decoder[0].weight.grad, rtol=1e-4, atol=1e-7)
    theirs = dict(twin.named_parameters())
    for name, p in model.backbone.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_simmim_loss__equals_lightlys_masked_vit_linear_decoder_and_l1_on_the_same_masks_and_weights():
    model = tiny_simmim().eval()
    twin = timm_twin(model.backbone).eval()
    encoder = MaskedVisionTransformerTIMM(
        vit=twin, mask_token=nn.Parameter(model.mask_token.detach().clone()),
        weight_initialization="skip", pos_embed_initialization="skip",
    )
    # Our 1x1 conv + pixel shuffle emits a patch as (channel, row, column); lightly's patchify as
    # (row, column, channel): the same linear map with its outputs reordered.
    conv = model.decoder[0]
    linear = nn.Linear(D, PATCH * PATCH * 3)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.view(3, PATCH, PATCH, D).permute(1, 2, 0, 3).reshape(-1, D))
        linear.bias.copy_(conv.bias.view(3, PATCH, PATCH).permute(1, 2, 0).reshape(-1))
    b = batch()
    images, mask = b["pixel_values"], b["mask"]
    # lightly's SimMIM example, with the paper's mask-patch masks in place of its per-token ones.
    seq_mask = torch.cat([torch.zeros(4, 1, dtype=torch.bool), mask], dim=1)  # (B, 1 + N): class token kept
    idx_mask = seq_mask.nonzero()[:, 1].view(4, -1)  # (B, K) sequence positions, every sample K = 12
    x_encoded = encoder.encode(images=images, mask=seq_mask)
    predictions = linear(lightly_utils.get_at_index(x_encoded, idx_mask))
    targets = lightly_utils.get_at_index(lightly_utils.patchify(images, PATCH), idx_mask - 1)
    lightly_loss = nn.L1Loss()(predictions, targets)

    ours = model(b)["loss"]
    masked_values = 12 * PATCH * PATCH * 3 * 4
    assert ours.item() == pytest.approx(lightly_loss.item() * masked_values / (masked_values + 1e-5 * 3), rel=1e-6)
    torch.testing.assert_close(ours, lightly_loss, rtol=1e-6, atol=0)  # the epsilon is below fp32 rounding here
    ours.backward()
    lightly_loss.backward()
    torch.testing.assert_close(model.mask_token.grad, encoder.mask_token.grad, rtol=1e-4, atol=1e-7)
    theirs = dict(twin.named_parameters())
    for name, p in model.backbone.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_simmim_loss__reads_masked_pixels_only_and_is_their_mean_absolute_error():
    model = tiny_simmim()
    b = batch()
    seen = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen["rec"] = output

    handle = model.decoder.register_forward_hook(keep)
    out = model(b)
    handle.remove()
    out["loss"].backward()
    rec, grad = seen["rec"], seen["rec"].grad  # (B, 3, H, W)
    pixel_mask = b["mask"].view(4, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2)  # (B, H, W)
    pixel_mask = pixel_mask.unsqueeze(1).expand_as(rec)
    assert torch.equal(grad[~pixel_mask], torch.zeros_like(grad[~pixel_mask]))  # visible pixels: no gradient
    assert (grad[pixel_mask] != 0).all()
    error = (rec.detach() - b["pixel_values"]).abs()
    assert out["loss"].item() == pytest.approx(error[pixel_mask].mean().item(), rel=1e-5)
    assert out["loss_visible"].item() == pytest.approx(error[~pixel_mask].mean().item(), rel=1e-5)
    assert out["mask_ratio"].item() == pytest.approx(0.75)


def test_simmim__unmasked_forward_equals_the_backbone_and_timm_through_the_same_head():
    model = tiny_simmim().eval()
    twin = timm_twin(model.backbone).eval()
    x = batch()["pixel_values"]
    none = torch.zeros(4, N, dtype=torch.bool)
    with torch.no_grad():
        ours = model.reconstruct(x, none)
        for features in (model.backbone.forward_features(x), twin.forward_features(x)):
            grid = features[:, 1:].transpose(1, 2).reshape(4, D, 4, 4)
            torch.testing.assert_close(ours, model.decoder(grid), rtol=0, atol=1e-5)
        tokens = model.backbone.forward_features(x, mask=none, mask_token=model.mask_token)
        torch.testing.assert_close(tokens, model.backbone.forward_features(x), rtol=0, atol=0)


def test_simmim__a_batch_without_masks_draws_them_from_torchs_stream():
    model = tiny_simmim()
    x = batch()["pixel_values"]
    torch.manual_seed(5)
    a = model({"pixel_values": x})["loss"]
    torch.manual_seed(5)
    b = model({"pixel_values": x})["loss"]
    assert torch.equal(a, b)
    assert model({"pixel_values": x})["mask_ratio"].item() == pytest.approx(0.75)


# -- init, export, picture ---------------------------------------------------------------------


def test_simmim__initialises_the_encoder_as_the_official_code():
    model = tiny_simmim()
    bb = model.backbone
    assert bb.patch_embed.proj.weight.abs().max() <= 0.02 and bb.cls_token.abs().max() <= 0.02
    assert bb.pos_embed.abs().max() <= 0.02 and model.mask_token.abs().max() <= 0.02
    assert 0.005 < model.mask_token.std() < 0.015  # N(0, 0.02) cut at +-1 sigma: std 0.54 * 0.02
    for layer, block in enumerate(bb.blocks, start=1):
        assert block.attn.qkv.weight.abs().max() <= 0.02 and block.attn.qkv.bias.abs().max() == 0
        limit = 0.02 / math.sqrt(2 * layer)
        assert block.attn.proj.weight.abs().max() <= limit and block.mlp.fc2.weight.abs().max() <= limit
        assert block.attn.proj.weight.abs().max() > 0.9 * limit
        assert torch.equal(block.norm1.weight, torch.ones(D))
    # The fixed sin-cos positions stay as built.
    sincos = tiny_simmim(pos_embed="sincos").backbone
    assert not sincos.pos_embed.requires_grad and sincos.pos_embed.abs().max() > 0.5


def test_simmim__timm_init_keeps_the_backbone_as_created():
    torch.manual_seed(0)
    created = tiny_backbone()
    before = {k: v.clone() for k, v in created.state_dict().items()}
    model = SimMIM(created, mask_patch_size=8, init="timm")
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    # timm's N(0, 0.02) cut at +-2 (not BEiT's +-0.02): some qkv weights lie beyond 0.02.
    assert model.backbone.blocks[0].attn.qkv.weight.abs().max() > 0.03
    assert 0.01 < model.mask_token.std() < 0.03
    with pytest.raises(ValueError, match="simmim.init must be 'beit'"):
        SimMIM(tiny_backbone(), mask_patch_size=8, init="xavier")


def test_simmim__exports_the_backbone_with_timm_keys_and_no_mask_token():
    from ssl_vit.objectives.base import exported_backbone

    model = tiny_simmim()
    module, prefix = exported_backbone(model)
    assert module is model.backbone and prefix == "backbone."
    timm_twin(module)  # strict load
    assert not any("mask_token" in k or k.startswith("decoder") for k in module.state_dict())


def test_visualize__a_grid_of_four_tiles_per_image_leaving_mode_and_rng_alone():
    model = tiny_simmim().train()
    b = batch(b=3)
    state, py_state = torch.get_rng_state(), random.getstate()
    for given in (b, {"pixel_values": b["pixel_values"]}):  # masks from the batch, or a fixed seed
        grid = model.visualize(given, MEAN, STD)["simmim_reconstruction"]
        assert grid.shape == (3, 3 * 65 + 1, 4 * 65 + 1)  # 16-px tiles drawn at 64 px, 1-px padding
        assert grid.min() >= 0 and grid.max() <= 1
    assert model.training
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state
    again = model.visualize({"pixel_values": b["pixel_values"]}, MEAN, STD)["simmim_reconstruction"]
    assert torch.equal(again, grid)


def _official_norm_targets(targets, patch_size):
    """microsoft/SimMIM models/simmim.py `norm_targets`, transcribed (NORM_TARGET.PATCH_SIZE: odd)."""
    assert patch_size % 2 == 1
    targets_ = targets
    targets_count = torch.ones_like(targets)
    targets_square = targets**2.0
    targets_mean = F.avg_pool2d(targets, kernel_size=patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)
    targets_square_mean = F.avg_pool2d(targets_square, kernel_size=patch_size, stride=1, padding=patch_size // 2,
                                       count_include_pad=False)
    targets_count = F.avg_pool2d(targets_count, kernel_size=patch_size, stride=1, padding=patch_size // 2,
                                 count_include_pad=True) * (patch_size**2)
    targets_var = (targets_square_mean - targets_mean**2.0) * (targets_count / (targets_count - 1))
    targets_var = torch.clamp(targets_var, min=0.0)
    targets_ = (targets_ - targets_mean) / (targets_var + 1.0e-6) ** 0.5
    return targets_


def test_norm_target__equals_the_official_norm_targets_and_the_loss_reads_it():
    torch.manual_seed(0)
    x = torch.randn(2, 3, IMG, IMG) * 2 + 1
    torch.testing.assert_close(norm_targets(x, 5), _official_norm_targets(x, 5))
    model = SimMIM(tiny_backbone(), mask_patch_size=MASK_PATCH, norm_target_window=5)
    mask = torch.zeros(2, (IMG // 4) ** 2, dtype=torch.bool)
    mask[:, :4] = True
    batch = {"pixel_values": x, "mask": mask}
    rec = model.reconstruct(x, mask)
    pix = model.pixel_mask(mask, x.shape[-2:])
    expected = ((_official_norm_targets(x, 5) - rec).abs() * pix).sum() / (pix.sum() + 1e-5) / 3
    torch.testing.assert_close(model(batch)["loss"], expected)
    with pytest.raises(ValueError, match="norm_target_window must be 0 \\(off\\) or odd"):
        SimMIM(tiny_backbone(), mask_patch_size=MASK_PATCH, norm_target_window=4)
