"""`dynamic_img_size=True`: inputs of other sizes than `img_size`, the same numbers as timm's model."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from ssl_vit.models import create_backbone, sincos_pos_embed_2d
from ssl_vit.objectives import build_objective

SMALL = dict(depth=2, embed_dim=32, num_heads=2, num_classes=0)  # 2 blocks, 32 wide: fast on 2 cores
SIZES = [(32, 32), (16, 16), (24, 24), (48, 48), (16, 32)]  # native 32, smaller (DINO's local crops), larger, oblong


def _pair(name: str = "vit_nano_patch4_32", **overrides):
    """Our dynamic backbone and timm's twin (same weights, strict load), both in eval mode."""
    torch.manual_seed(0)
    model = create_backbone(name, dynamic_img_size=True, **SMALL, **overrides).eval()
    timm_name, kwargs = model.timm_spec()
    assert kwargs["dynamic_img_size"] is True
    twin = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    return model, twin


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vit_nano_patch4_32", {}),
        ("deit_nano_distilled_patch4_32", {}),  # class and distillation tokens kept
        ("vit_nano_patch4_32", {"pos_embed": "sincos"}),  # fixed values resampled like learned ones
        ("vit_nano_patch4_32", {"no_embed_class": True}),  # timm's DeiT-III layout: no prefix positions
        ("vit_nano_patch4_32", {"global_pool": "avg"}),
    ],
)
def test_dynamic_img_size__features_equal_timms_at_every_size(name, overrides):
    model, twin = _pair(name, **overrides)
    with torch.no_grad():
        for size in SIZES:
            x = torch.randn(2, 3, *size)
            ours = model.forward_features(x)
            grid = (size[0] // 4) * (size[1] // 4)
            assert ours.shape == (2, model.num_prefix_tokens + grid, 32)
            torch.testing.assert_close(ours, twin.forward_features(x), rtol=0, atol=1e-5, msg=str(size))
            torch.testing.assert_close(model(x), twin(x), rtol=0, atol=1e-5, msg=str(size))


def test_dynamic_img_size__native_size_equals_the_fixed_size_backbone():
    model, _ = _pair()
    fixed = create_backbone("vit_nano_patch4_32", **SMALL).eval()
    fixed.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), fixed.forward_features(x), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="doesn't match model"):  # timm's check on fixed-size backbones
        fixed.forward_features(torch.randn(1, 3, 16, 16))


def test_dynamic_img_size__sincos_is_resampled_not_recomputed():
    model, _ = _pair(pos_embed="sincos")
    expected = resample_abs_pos_embed(model.pos_embed, new_size=(2, 3), old_size=(8, 8), num_prefix_tokens=1)
    model.blocks = torch.nn.Sequential()  # no mixing: the tokens are patch embedding + position
    model.norm = torch.nn.Identity()
    x = torch.randn(1, 3, 8, 12)
    with torch.no_grad():
        tokens = model.forward_features(x)
        patches = model.patch_embed(x).flatten(1, 2)  # (1, 6, D)
    torch.testing.assert_close(tokens[:, 1:] - patches, expected[:, 1:])
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, 0])[:, 0])
    recomputed = sincos_pos_embed_2d(32, (2, 3), num_prefix_tokens=1)  # the alternative, not taken
    assert not torch.allclose(expected, recomputed, atol=1e-2)


@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "deit_nano_distilled_patch4_32"])
@pytest.mark.parametrize("size", [32, 16])
def test_dynamic_img_size__ids_keep_index_the_inputs_own_grid(name, size):
    model, _ = _pair(name)
    x = torch.randn(2, 3, size, size)
    grid = (size // 4) ** 2
    with torch.no_grad():
        full = model.forward_features(x)
        every = model.forward_features(x, torch.arange(grid).expand(2, -1))
        torch.testing.assert_close(every, full, rtol=0, atol=1e-5)
        model.blocks = torch.nn.Sequential()  # no mixing: a kept token is the full forward's token
        model.norm = torch.nn.Identity()
        ids = torch.tensor([[grid - 1, 0, 5], [3, 2, 1]])
        part, full = model.forward_features(x, ids), model.forward_features(x)
    prefix = model.num_prefix_tokens
    torch.testing.assert_close(part[:, :prefix], full[:, :prefix])
    for b in range(2):
        torch.testing.assert_close(part[b, prefix:], full[b, prefix + ids[b]])


def test_dynamic_img_size__position_embedding_learns_from_other_sizes():
    model, _ = _pair()
    model.train()
    model.forward_features(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad[:, 1:].abs().sum() > 0


def test_dynamic_img_size__spec_rebuilds_it_and_state_dict_keys_unchanged():
    model, _ = _pair()
    assert model.spec["dynamic_img_size"] is True
    again = create_backbone(**model.spec)
    assert again.dynamic_img_size and again.spec == model.spec
    again.load_state_dict(model.state_dict(), strict=True)
    fixed = create_backbone("vit_nano_patch4_32", **SMALL)
    assert list(fixed.state_dict()) == list(model.state_dict())


def test_register_tokens__still_refused_with_the_reason():
    with pytest.raises(ValueError, match="register tokens"):
        create_backbone("vit_nano_patch4_32", reg_tokens=4)


def _official_interpolate_pos_encoding(
    pos_embed: torch.Tensor, patch_size: int, w: int, h: int, npatch: int
) -> torch.Tensor:
    """facebookresearch/dino vision_transformer.py VisionTransformer.interpolate_pos_encoding, transcribed
    (one class token; `w`, `h` the input's two spatial sizes in pixels)."""
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("size", [12, 16, 24, 32])
def test_pos_embed_resample_dino__equals_dinos_interpolate_pos_encoding(size):
    model, twin = _pair()  # patch 4, 8 x 8 grid
    model.pos_embed_resample = "dino"
    torch.manual_seed(1)
    with torch.no_grad():
        model.pos_embed.normal_()  # a rough embedding: where antialiasing would matter most
        twin.pos_embed.copy_(model.pos_embed)
    x = torch.randn(2, 3, size, size)
    grid = (size // 4) ** 2
    expected_pos = _official_interpolate_pos_encoding(model.pos_embed, 4, size, size, grid)  # (1, 1 + grid, 32)
    # Official prepare_tokens: patch embeddings after the class token, plus the interpolated positions.
    with torch.no_grad():
        patches = model.patch_embed(x).flatten(1, 2)  # (2, grid, 32)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1) + expected_pos
        expected = model.norm(model.blocks(tokens))
        torch.testing.assert_close(model.forward_features(x), expected, rtol=0, atol=1e-5)
        if size != 32:  # timm's antialiased resampling gives other positions, so other features
            assert not torch.allclose(twin.forward_features(x), expected, atol=1e-3)


def test_dino_objective__resamples_positions_as_dino_for_student_and_teacher():
    backbone = create_backbone("vit_nano_patch4_32", dynamic_img_size=True, **SMALL)
    dino = build_objective("dino", backbone, out_dim=16, hidden_dim=16, bottleneck_dim=8, local_crops=2)
    assert dino.backbone.pos_embed_resample == "dino" and dino.teacher["backbone"].pos_embed_resample == "dino"
    assert create_backbone("vit_nano_patch4_32", dynamic_img_size=True, **SMALL).pos_embed_resample == "timm"
