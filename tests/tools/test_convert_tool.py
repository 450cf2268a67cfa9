"""tools/convert.py: writes our format from foreign checkpoints, refuses unsafe files, errors clearly."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ssl_vit.interop import build_backbone
from ssl_vit.models import create_backbone
from tiny_run import ROOT, load_tool

convert_tool = load_tool("convert")


def test_convert_tool__mae_checkpoint_writes_backbone_json_and_decoder(tmp_path, capsys):
    from ssl_vit.objectives.mae import MAE

    backbone = create_backbone("vit_nano_patch4_32", depth=1, img_size=16, num_classes=0, pos_embed="sincos")
    mae = MAE(backbone, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    official = {k.removeprefix("backbone."): v for k, v in mae.state_dict().items()}
    torch.save({"model": official, "args": argparse.Namespace(model="mae_vit_base_patch16")}, tmp_path / "mae.pth")

    assert convert_tool.main([str(tmp_path / "mae.pth"), "--out", str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "format: mae" in out and "MAE decoder: converted" in out
    meta = json.loads((tmp_path / "ours" / "backbone.json").read_text())
    assert meta["objective"] == "imported-mae" and meta["model"]["pos_embed"] == "sincos"
    assert meta["import"]["arch"]["embed_dim"] == 128 and meta["import"]["has_mae_decoder"]
    decoder = load_file(str(tmp_path / "ours" / "mae_decoder.safetensors"))
    torch.testing.assert_close(decoder["decoder_pred.weight"], mae.decoder_pred.weight)
    loaded, _ = build_backbone(tmp_path / "ours")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), backbone.eval().forward_features(x), atol=1e-5, rtol=0)


def test_convert_tool__unsafe_pickle_exits_2_and_writes_nothing(tmp_path, capsys):
    torch.save({"model": {"w": torch.ones(1)}, "opt": argparse.ArgumentParser}, tmp_path / "bad.pth")
    assert convert_tool.main([str(tmp_path / "bad.pth"), "--out", str(tmp_path / "ours")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()


def test_convert_tool__guessed_heads_are_reported(tmp_path, capsys):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", embed_dim=96, depth=1, num_heads=3, patch_size=4, img_size=16)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    assert convert_tool.main([str(tmp_path / "w.pth"), "--out", str(tmp_path / "a")]) == 0
    assert "note: the weights do not say how many attention heads" in capsys.readouterr().out
    assert convert_tool.main([str(tmp_path / "w.pth"), "--out", str(tmp_path / "b"), "--num-heads", "3"]) == 0
    arch = json.loads((tmp_path / "b" / "backbone.json").read_text())["import"]["arch"]
    assert (arch["num_heads"], arch["num_heads_source"]) == (3, "given")


@pytest.mark.slow
def test_convert_cli__hf_deit_folder_end_to_end(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    cfg = DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                     patch_size=4, num_labels=3)
    DeiTForImageClassificationWithTeacher(cfg).save_pretrained(tmp_path / "hf")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), str(tmp_path / "hf"), "--out", str(tmp_path / "ours")],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "format: hf-deit" in proc.stdout and "loads into the backbone" in proc.stdout
    assert json.loads((tmp_path / "ours" / "backbone.json").read_text())["model"]["name"].startswith("deit_")
