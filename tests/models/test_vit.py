"""The shared backbone: timm key/number compatibility, visible-token encoding, weights loading."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

from ssl_vit.models import (
    UnknownModelError,
    WeightsMismatchError,
    adapt_state_dict,
    block_queries,
    create_backbone,
    create_model,
    list_backbones,
    load_weights,
    sincos_pos_embed_2d,
)

# Full-size numerical checks cost seconds for ViT-L/H on 2 cores: those two are compared at full size by
# keys and shapes (meta device), and numerically with fewer blocks (the same code path per block).
FULL_SIZE_NUMERIC = [n for n in list_backbones() if "large" not in n and "huge" not in n]
BIG = [n for n in list_backbones() if "large" in n or "huge" in n]


def _timm_twin(model):
    name, kwargs = model.timm_spec()
    return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize("name", FULL_SIZE_NUMERIC)
def test_backbone__loads_into_timm_strictly_with_equal_features_and_logits(name):
    torch.manual_seed(0)
    model = create_backbone(name).eval()
    twin = _timm_twin(model).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), twin.forward_features(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=1e-5)


def test_timm_native_names__load_into_timm_create_model_by_name():
    # The 224 names need no kwargs at all: timm.create_model(name) is the twin.
    model = create_backbone("deit_tiny_distilled_patch16_224")
    assert model.timm_spec() == ("deit_tiny_distilled_patch16_224", {})
    timm.create_model("deit_tiny_distilled_patch16_224").load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("name", BIG)
def test_big_backbones__keys_and_shapes_equal_timm_at_full_size(name):
    with torch.device("meta"):
        ours = create_backbone(name)
        theirs = timm.create_model(name, pretrained=False)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes


@pytest.mark.parametrize("name", BIG)
def test_big_backbones__numerically_equal_timm_with_two_blocks(name):
    model = create_backbone(name, depth=2, img_size=112).eval()
    twin = timm.create_model(name, pretrained=False, depth=2, img_size=112).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=1e-5)


def test_small_image_sizes__build_timms_own_class_with_same_arguments():
    model = create_backbone("vit_tiny_patch4_32")
    assert model.timm_spec() == ("vit_tiny_patch16_224", {"patch_size": 4, "img_size": 32})
    twin = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4)
    twin.load_state_dict(model.state_dict(), strict=True)


def test_nano__about_one_million_parameters():
    model = create_backbone("vit_nano_patch4_32", num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < n < 1.2e6


@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "deit_nano_distilled_patch4_32"])
def test_ids_keep__output_has_prefix_plus_kept_tokens(name):
    model = create_backbone(name, num_classes=0).eval()
    x = torch.randn(3, 3, 32, 32)
    ids_keep = torch.stack([torch.randperm(model.num_patches)[:16] for _ in range(3)])
    out = model.forward_features(x, ids_keep)
    assert out.shape == (3, model.num_prefix_tokens + 16, model.embed_dim)
    assert model.num_prefix_tokens == (2 if "distilled" in name else 1)


def test_ids_keep__output_ignores_pixels_of_dropped_patches():
    torch.manual_seed(0)
    model = create_backbone("vit_nano_patch4_32", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 9, 63], [1, 2, 3, 40]])
    # Patch 10 (row 1, col 2) is dropped in both samples: scramble its pixels.
    y = x.clone()
    y[:, :, 4:8, 8:12] = torch.randn(2, 3, 4, 4) * 100
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, keep), model.forward_features(y, keep))
        assert not torch.allclose(model.forward_features(x), model.forward_features(y))


@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "deit_nano_distilled_patch4_32"])
def test_ids_keep__every_patch_in_order_equals_full_forward(name):
    model = create_backbone(name, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    ids = torch.arange(model.num_patches).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, ids), model.forward_features(x), rtol=0, atol=1e-6)


def test_ids_keep__order_of_kept_tokens_follows_ids_keep():
    model = create_backbone("vit_nano_patch4_32", num_classes=0, depth=0).eval()  # no mixing blocks
    model.norm = torch.nn.Identity()
    x = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[7, 3]])
    with torch.no_grad():
        full = model.forward_features(x)
        part = model.forward_features(x, ids)
    torch.testing.assert_close(part[:, 1:], full[:, 1 + ids[0]])


def test_attention__uses_fused_sdpa_kernel():
    model = create_backbone("vit_nano_patch4_32")
    assert all(block.attn.fused_attn for block in model.blocks)


def test_distilled__eval_logits_average_both_heads():
    model = create_backbone("deit_nano_distilled_patch4_32", num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        cls_logits, dist_logits = model.forward_distill_heads(feats)
        torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
    assert cls_logits.shape == (2, 7)


def test_global_pool_avg__matches_timm_with_fc_norm():
    model = create_backbone("vit_nano_patch4_32", global_pool="avg", num_classes=5).eval()
    assert isinstance(model.norm, torch.nn.Identity) and not isinstance(model.fc_norm, torch.nn.Identity)
    twin = _timm_twin(model).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x))


def test_sincos_pos_embed__fixed_zero_prefix_and_not_trained():
    model = create_backbone("vit_nano_patch4_32", pos_embed="sincos")
    assert not model.pos_embed.requires_grad
    assert torch.all(model.pos_embed[0, 0] == 0)
    expected = sincos_pos_embed_2d(128, (8, 8), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.data, expected)
    # Position (0, 0): every sin is 0 and every cos is 1, for both axes.
    first = expected[0, 1]
    quarter = 128 // 4
    assert torch.all(first[:quarter] == 0) and torch.all(first[quarter : 2 * quarter] == 1)
    # Distinct positions get distinct codes.
    assert torch.unique(expected[0, 1:], dim=0).shape[0] == 64


def test_pos_embed_resize__keeps_prefix_and_interpolates_grid():
    src = create_backbone("vit_nano_patch4_32", num_classes=0)
    dst = create_backbone("vit_nano_patch4_32", num_classes=0, img_size=64)  # 8x8 -> 16x16 grid
    state = adapt_state_dict(src.state_dict(), dst)
    assert state["pos_embed"].shape == dst.pos_embed.shape == (1, 1 + 256, 128)
    torch.testing.assert_close(state["pos_embed"][:, :1], src.pos_embed[:, :1])
    # A constant grid stays constant under bicubic interpolation.
    with torch.no_grad():
        src.pos_embed[:, 1:] = 0.5
    state = adapt_state_dict(src.state_dict(), dst)
    torch.testing.assert_close(state["pos_embed"][:, 1:], torch.full((1, 256, 128), 0.5), atol=1e-5, rtol=0)
    load_weights(dst, src.state_dict())  # the full load path resizes too


def test_load_weights__other_architecture_lists_missing_and_unexpected_keys():
    model = create_backbone("vit_nano_patch4_32", num_classes=0)
    other = create_backbone("vit_nano_patch4_32", num_classes=0, depth=3).state_dict()
    other["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError, match=r"missing keys: blocks\.3.*unexpected keys: extra\.weight"):
        load_weights(model, other)


def test_load_weights__wrong_shapes_named():
    model = create_backbone("vit_nano_patch4_32", num_classes=0)
    other = create_backbone("vit_nano_patch4_32", num_classes=0, embed_dim=64, num_heads=2).state_dict()
    with pytest.raises(WeightsMismatchError, match="wrong shapes: .*checkpoint"):
        load_weights(model, other)


def test_unknown_name__error_lists_close_names():
    with pytest.raises(UnknownModelError, match="vit_tiny_patch16_224"):
        create_backbone("vit_tiny_patch16_244")


def test_image_size_not_divisible_by_patch__clear_error():
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        create_backbone("vit_nano_patch4_32", img_size=30)


def test_create_model__falls_back_to_timm_for_convnets():
    net = create_model("resnet18", num_classes=3)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(UnknownModelError, match="neither an ssl_vit backbone nor a timm model"):
        create_model("resnet_does_not_exist")


def test_spec__rebuilds_the_same_architecture():
    model = create_backbone("vit_nano_patch4_32", num_classes=10, drop_path_rate=0.1, pos_embed="sincos")
    again = create_backbone(**model.spec)
    again.load_state_dict(model.state_dict(), strict=True)
    assert again.spec == model.spec


def test_drop_path__stochastic_in_train_deterministic_in_eval():
    model = create_backbone("vit_nano_patch4_32", num_classes=0, drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    a = model.forward_features(x)
    torch.manual_seed(1)
    b = model.forward_features(x)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.forward_features(x), model.forward_features(x))


# -- linear layers: plain nn.Linear unless the oneDNN path is on (ssl_vit.ops.linear) ---------------


@pytest.mark.parametrize("setting", ["0", "1"])
def test_backbone__linear_layers_follow_the_onednn_setting_keys_unchanged(monkeypatch, setting):
    from ssl_vit.ops.linear import OneDNNLinear

    monkeypatch.setenv("SSL_VIT_ONEDNN_LINEAR", setting)
    expected = OneDNNLinear if setting == "1" else torch.nn.Linear
    model = create_backbone("deit_nano_distilled_patch4_32", num_classes=5, depth=2, embed_dim=32, num_heads=2)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is expected for m in linears)
    assert "blocks.0.attn.qkv.weight" in model.state_dict() and "head_dist.weight" in model.state_dict()
    model.reset_classifier(7)
    assert type(model.head) is expected and type(model.head_dist) is expected
    assert type(copy.deepcopy(model).head) is expected


def test_backbone__training_step_on_onednn_equals_plain_pytorch(monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    grads = []
    for setting in ("0", "1"):
        monkeypatch.setenv("SSL_VIT_ONEDNN_LINEAR", setting)
        torch.manual_seed(0)
        model = create_backbone("vit_nano_patch4_32", num_classes=10, depth=2, embed_dim=32, num_heads=2)
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("queries", [slice(4, None), slice(0, 2)], ids=["tail", "prefix"])
@pytest.mark.parametrize("kwargs", [{}, {"init_values": 0.1, "qk_norm": True}], ids=["plain", "layerscale_qknorm"])
def test_block_queries__equals_timms_block_output_and_gradients_for_those_tokens(kwargs, queries):
    torch.manual_seed(0)
    block = Block(32, 4, qkv_bias=True, **kwargs)
    twin = copy.deepcopy(block)
    x = torch.randn(3, 11, 32, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    out, expected = block_queries(block, x, queries), twin(x_twin)[:, queries]  # timm's whole block, sliced
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(block.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name,prefix", [("vit_nano_patch4_32", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_token_classifier__last_block_runs_the_prefix_tokens_only_with_timms_logits_and_gradients(name, prefix):
    torch.manual_seed(0)
    kwargs = {"depth": 2, "img_size": 32, "patch_size": 8} if "deit" in name else {"depth": 2}
    model = create_backbone(name, **kwargs).train()
    twin = _timm_twin(model).train()
    twin.load_state_dict(model.state_dict(), strict=True)
    seen = []
    model.blocks[-1].mlp.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    x = torch.randn(3, 3, 32, 32)
    out, expected = model(x), twin(x)
    assert seen == [(3, prefix, model.embed_dim)]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the pooled features (MoCo v3's) and the class token (DINO's)
        pooled = twin.forward_head(twin.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.forward_pooled(x), pooled, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_prefix(x), twin.forward_features(x)[:, :prefix], rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    twin_grads = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        if p.grad is not None or twin_grads[n].grad is not None:  # fp32 rounding: 1e-5 of the gradient's scale
            scale = twin_grads[n].grad.abs().max().item()
            torch.testing.assert_close(p.grad, twin_grads[n].grad, rtol=1e-4, atol=1e-5 * scale, msg=n)


def test_block_queries__a_hooked_block_is_called_as_a_module_so_its_hooks_fire():
    """FSDP2 gathers a wrapped block's weights in its forward hooks; a user's feature hook sees every token."""
    torch.manual_seed(0)
    block, seen = Block(32, 4), []
    block.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    x = torch.randn(2, 9, 32)
    out = block_queries(block, x, slice(0, 1))
    assert seen == [(2, 9, 32)]
    torch.testing.assert_close(out, block(x)[:, :1])
