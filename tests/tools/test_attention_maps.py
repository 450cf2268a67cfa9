"""Attention maps and rollout (ssl_vit.viz.attention) and tools/attention_maps.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ssl_vit.models import create_backbone
from ssl_vit.viz import attention_grid, attention_maps, attention_matrices, rollout, rollout_from, upsample
from tiny_run import load_tool, make_run


def _backbone(name: str = "vit_nano_patch4_32", **kw):
    torch.manual_seed(0)
    return create_backbone(name, depth=2, img_size=16, **kw).eval()


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "deit_nano_distilled_patch4_32"])
def test_attention_matrices__rows_sum_to_one_over_tokens(name):
    backbone = _backbone(name)
    mats = attention_matrices(backbone, _images())
    tokens = backbone.num_prefix_tokens + 16
    assert len(mats) == 2 and all(m.shape == (3, 4, tokens, tokens) for m in mats)
    for m in mats:
        torch.testing.assert_close(m.sum(-1), torch.ones(3, 4, tokens))


def test_attention_matrices__reproduce_the_fused_attention_output():
    """attn @ v through the output projection equals what the block's (fused) attention returned."""
    backbone = _backbone()
    seen = {}
    block = backbone.blocks[-1]
    hook = block.attn.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    attn = attention_matrices(backbone, _images())[-1]  # (B, heads, N, N)
    hook.remove()
    x = seen["x"]
    B, N, D = x.shape
    v = block.attn.qkv(x).reshape(B, N, 3, 4, D // 4)[:, :, 2].transpose(1, 2)  # (B, heads, N, hd)
    with torch.no_grad():
        out = block.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, D))
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=0)


def test_attention_matrices__leave_backbone_as_it_was():
    backbone = _backbone().train()
    attention_matrices(backbone, _images())
    assert backbone.training
    assert all(not b.attn.qkv._forward_hooks for b in backbone.blocks)
    assert all(b.attn.fused_attn for b in backbone.blocks)


@pytest.mark.parametrize("name", ["vit_nano_patch4_32", "deit_nano_distilled_patch4_32"])
def test_attention_maps__class_row_over_the_patch_grid(name):
    backbone = _backbone(name)
    maps = attention_maps(backbone, _images())
    assert maps.shape == (3, 4, 4, 4)  # (B, heads, Hp, Wp)
    last = attention_matrices(backbone, _images())[-1]
    prefix_mass = last[:, :, 0, : backbone.num_prefix_tokens].sum(-1)
    torch.testing.assert_close(maps.sum((-2, -1)) + prefix_mass, torch.ones(3, 4))
    up = upsample(maps, (16, 16))
    assert up.shape == (3, 4, 16, 16)  # the image's shape
    torch.testing.assert_close(up[:, :, :4, :4], maps[:, :, :1, :1].expand(-1, -1, 4, 4))


def test_rollout__uniform_attention_spreads_evenly_and_self_attention_stays_on_cls():
    n_tokens, grid = 17, (4, 4)
    uniform = [torch.full((2, 3, n_tokens, n_tokens), 1 / n_tokens) for _ in range(3)]
    # (U/2 + I/2)^3 = I/8 + 7/8 U for the idempotent U: every patch gets 7/8 * 1/17.
    torch.testing.assert_close(rollout_from(uniform, 1, grid), torch.full((2, 4, 4), 7 / 8 / 17))
    only_self = [torch.eye(n_tokens).expand(2, 3, -1, -1) for _ in range(3)]
    assert rollout_from(only_self, 1, grid).abs().max() == 0


def test_rollout__rows_of_the_full_product_sum_to_one():
    backbone = _backbone()
    rolled = rollout(backbone, _images())
    assert rolled.shape == (3, 4, 4) and (rolled >= 0).all() and (rolled.sum((-2, -1)) <= 1 + 1e-6).all()


def test_attention_grid__one_rgb_picture_in_0_1():
    grid = attention_grid(_backbone(), _images(), cell=20)
    # 3 rows of [image, rollout, 4 heads], 20-pixel tiles, 2-pixel gaps.
    assert grid.shape == (3, 3 * 22 + 2, 6 * 22 + 2)
    assert grid.min() >= 0 and grid.max() <= 1


@pytest.mark.slow
def test_attention_maps_tool__writes_png_for_a_run_and_an_image_folder(tmp_path):
    run = make_run(tmp_path / "run")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")
    tool = load_tool("attention_maps")
    assert tool.main(["--checkpoint", str(run), "--images", str(folder), "--out", str(tmp_path / "a.png")]) == 0
    assert tool.main(["--checkpoint", "random", "--images", "synthetic", "--num-images", "2",
                      "--out", str(tmp_path / "b.png")]) == 0
    for png in ("a.png", "b.png"):
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG" and im.width > 600 and im.height > 300


def test_attention_images__trainer_hook_grid_for_vit_and_nothing_for_convnets():
    import timm
    from types import SimpleNamespace

    from ssl_vit.viz.attention import attention_images

    batch = {"pixel_values": _images(6)}
    cfg = SimpleNamespace(data=SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)))
    images = attention_images(SimpleNamespace(backbone=_backbone()), batch, cfg)
    assert list(images) == ["attention"] and images["attention"].shape[0] == 3
    assert images["attention"].shape[1] == 4 * (96 + 2) + 2  # at most 4 images
    convnet = SimpleNamespace(backbone=timm.create_model("resnet10t", num_classes=0))
    assert attention_images(convnet, batch, cfg) == {}
