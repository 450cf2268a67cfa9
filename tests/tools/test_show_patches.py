"""Patch sequences and position-embedding similarity (ssl_vit.viz.patches) and tools/show_patches.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ssl_vit.models import create_backbone
from ssl_vit.viz.patches import patch_sequence, position_similarity, similarity_mosaic
from tiny_run import load_tool, make_run


def test_patch_sequence__is_the_order_patch_embed_reads():
    backbone = create_backbone("vit_nano_patch4_32", depth=1, img_size=16).eval()
    image = torch.rand(3, 16, 16)
    patches = patch_sequence(image, 4)  # (16, 3, 4, 4)
    with torch.no_grad():
        tokens = backbone.patch_embed(image[None])[0]  # (16, D)
        each = backbone.patch_embed.proj(patches).flatten(1)  # one conv step per patch
    torch.testing.assert_close(each, tokens)
    torch.testing.assert_close(patches[5], image[:, 4:8, 4:8])  # token 5 = row 1, column 1


def test_position_similarity__self_similarity_one_and_symmetric():
    sim = position_similarity(create_backbone("deit_nano_distilled_patch4_32", depth=1, img_size=16))
    assert sim.shape == (4, 4, 4, 4)
    flat = sim.reshape(16, 16)
    torch.testing.assert_close(flat.diagonal(), torch.ones(16))
    torch.testing.assert_close(flat, flat.T)


def test_position_similarity__sincos_falls_off_with_distance():
    sim = position_similarity(create_backbone("vit_nano_patch4_32", pos_embed="sincos"))  # 8 x 8 grid
    row = sim[3, 3, 3]  # patch (3, 3) against its row
    assert row[3] > row[4] > row[6] and row[3] > row[2] > row[0]


def test_similarity_mosaic__tiles_with_blank_gaps():
    mosaic = similarity_mosaic(torch.rand(3, 3, 3, 3))
    assert mosaic.shape == (11, 11)
    assert torch.isnan(mosaic[3]).all() and not torch.isnan(mosaic[:3, :3]).any()


@pytest.mark.slow
def test_show_patches_tool__writes_both_pngs(tmp_path):
    tool = load_tool("show_patches")
    run = make_run(tmp_path / "run")
    Image.new("RGB", (50, 40), "green").save(tmp_path / "img.png")
    argv = ["--image", str(tmp_path / "img.png"), "--checkpoint", str(run), "--out", str(tmp_path / "a")]
    assert tool.main(argv) == 0
    assert tool.main(["--checkpoint", "random", "--pos-embed", "sincos", "--out", str(tmp_path / "b")]) == 0
    for folder in ("a", "b"):
        for name in ("patches.png", "position_similarity.png"):
            with Image.open(tmp_path / folder / name) as im:
                assert im.format == "PNG" and im.width > 400
