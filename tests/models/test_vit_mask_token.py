"""`forward_features(x, mask=..., mask_token=...)`: masked patch embeddings replaced by a caller's token
before the positions (SimMIM, BEiT). Nothing masked = the plain forward = timm's; masked = a transcription
of microsoft/SimMIM's `VisionTransformerForSimMIM.forward` run on timm's model with the same weights.
"""

from __future__ import annotations

import pytest
import timm
import torch

from ssl_vit.models import create_backbone

SMALL = dict(depth=2, embed_dim=32, num_heads=2, num_classes=0, img_size=16)  # 2 blocks, 32 wide, patch 4: N = 16
N, D = 16, 32


def _pair(name: str = "vit_nano_patch4_32", **overrides):
    """Our backbone and timm's twin (same weights, strict load), both in eval mode."""
    torch.manual_seed(0)
    model = create_backbone(name, **{**SMALL, **overrides}).eval()
    timm_name, kwargs = model.timm_spec()
    twin = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    return model, twin


def _masks(b: int, n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < 0.5  # (B, N) bool


def simmim_encoder_transcribed(vit, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """microsoft/SimMIM models/simmim.py VisionTransformerForSimMIM.forward, on a timm ViT (absolute positions),
    up to the final norm (the official code then drops the class token)."""
    x = vit.patch_embed(x)
    B, L, _ = x.shape
    mask_token = mask_token.expand(B, L, -1)
    w = mask.flatten(1).unsqueeze(-1).type_as(mask_token)
    x = x * (1 - w) + mask_token * w
    cls_tokens = vit.cls_token.expand(B, -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    x = x + vit.pos_embed
    x = vit.pos_drop(x)
    for blk in vit.blocks:
        x = blk(x)
    return vit.norm(x)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vit_nano_patch4_32", {}),
        ("vit_nano_patch4_32", {"pos_embed": "sincos"}),
        ("deit_nano_distilled_patch4_32", {}),  # two prefix tokens
        ("vit_nano_patch4_32", {"no_embed_class": True}),  # positions on patches only
        ("vit_nano_patch4_32", {"global_pool": "avg"}),
        ("vit_nano_patch4_32", {"init_values": 0.1}),  # layer scale (SimMIM's ViT-B)
    ],
)
def test_mask_token__nothing_masked_is_the_plain_forward_and_timms(name, overrides):
    model, twin = _pair(name, **overrides)
    x = torch.randn(3, 3, 16, 16)
    token = torch.randn(1, 1, D)
    with torch.no_grad():
        plain = model.forward_features(x)
        unmasked = model.forward_features(x, mask=torch.zeros(3, N, dtype=torch.bool), mask_token=token)
        torch.testing.assert_close(unmasked, plain, rtol=0, atol=0)  # bit for bit
        torch.testing.assert_close(unmasked, twin.forward_features(x), rtol=0, atol=1e-5)


def test_mask_token__masked_forward_equals_the_official_simmim_encoder_on_timms_model():
    model, twin = _pair()
    x, mask, token = torch.randn(4, 3, 16, 16), _masks(4), torch.randn(1, 1, D)
    with torch.no_grad():
        ours = model.forward_features(x, mask=mask, mask_token=token)
        official = simmim_encoder_transcribed(twin, x, mask, token)
    assert ours.shape == (4, 1 + N, D)
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-5)


def test_mask_token__pixels_under_a_masked_patch_change_nothing():
    model, _ = _pair()
    x, mask, token = torch.randn(2, 3, 16, 16), _masks(2, seed=1), torch.randn(1, 1, D)
    pixel_mask = mask.view(2, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)  # (B, 1, 16, 16)
    other = torch.where(pixel_mask, torch.randn_like(x) * 10, x)
    with torch.no_grad():
        a = model.forward_features(x, mask=mask, mask_token=token)
        b = model.forward_features(other, mask=mask, mask_token=token)
        c = model.forward_features(other)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_mask_token__gets_gradient_only_from_masked_patches():
    model, _ = _pair()
    token = torch.nn.Parameter(torch.randn(1, 1, D))
    x = torch.randn(2, 3, 16, 16)
    model.forward_features(x, mask=torch.zeros(2, N, dtype=torch.bool), mask_token=token).sum().backward()
    assert torch.equal(token.grad, torch.zeros_like(token))
    model.forward_features(x, mask=_masks(2), mask_token=token).square().sum().backward()
    assert token.grad.abs().sum() > 0


def test_mask_token__with_ids_keep_of_visible_patches_only_equals_ids_keep_alone():
    model, _ = _pair()
    x, token = torch.randn(2, 3, 16, 16), torch.randn(1, 1, D)
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[:, 8:] = True
    ids_keep = torch.tensor([[0, 3, 5, 7], [1, 2, 4, 6]])
    with torch.no_grad():
        both = model.forward_features(x, ids_keep, mask=mask, mask_token=token)
        keep = model.forward_features(x, ids_keep)
    assert both.shape == (2, 1 + 4, D)
    torch.testing.assert_close(both, keep, rtol=0, atol=0)


def test_mask_token__dynamic_img_size_masks_the_inputs_own_grid():
    model, twin = _pair(dynamic_img_size=True)
    x = torch.randn(2, 3, 24, 24)  # a 6x6 grid through a 4x4-grid backbone
    token = torch.randn(1, 1, D)
    with torch.no_grad():
        unmasked = model.forward_features(x, mask=torch.zeros(2, 36, dtype=torch.bool), mask_token=token)
        torch.testing.assert_close(unmasked, twin.forward_features(x), rtol=0, atol=1e-5)
        masked = model.forward_features(x, mask=_masks(2, 36), mask_token=token)
    assert masked.shape == (2, 1 + 36, D) and not torch.allclose(masked, unmasked)


def test_mask_token__traces_in_one_graph_under_torch_compile():
    model, _ = _pair()
    x, mask, token = torch.randn(2, 3, 16, 16), _masks(2), torch.randn(1, 1, D)

    def masked(x, mask, token):
        return model.forward_features(x, mask=mask, mask_token=token)

    compiled = torch.compile(masked, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, mask, token), model.forward_features(x, mask=mask, mask_token=token))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask": torch.zeros(2, N, dtype=torch.bool)}, "both `mask` and `mask_token`"),
        ({"mask_token": torch.zeros(1, 1, D)}, "both `mask` and `mask_token`"),
        (
            {"mask": torch.zeros(2, N - 1, dtype=torch.bool), "mask_token": torch.zeros(1, 1, D)},
            r"shape \(batch, patches\) = \(2, 16\)",
        ),
        ({"mask": torch.zeros(2, N), "mask_token": torch.zeros(1, 1, D)}, "bool tensor"),
        (
            {"mask": torch.zeros(2, N, dtype=torch.bool), "mask_token": torch.zeros(1, D)},
            r"mask_token must have shape \(1, 1, 32\)",
        ),
    ],
)
def test_mask_token__wrong_arguments_are_named(kwargs, match):
    model, _ = _pair()
    with pytest.raises(ValueError, match=match):
        model.forward_features(torch.randn(2, 3, 16, 16), **kwargs)
