"""tools/export.py and ssl_vit.interop.export: timm folders that load in timm, model cards, failed uploads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from ssl_vit.interop import build_backbone
from ssl_vit.interop.export import PushToHubError, export_timm, push_to_hub
from ssl_vit.models import create_backbone
from tiny_run import ROOT, load_tool, make_run

export_tool = load_tool("export")


def _timm_from_folder(folder, *, file_only: bool = False):
    """timm.create_model(name, pretrained=True, pretrained_cfg_overlay=..., **model_args), as the README says."""
    config = json.loads((folder / "config.json").read_text())
    overlay = dict(file=str(folder / "model.safetensors"))
    if not file_only:
        overlay = dict(config["pretrained_cfg"], **overlay)
    model = timm.create_model(
        config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **config["model_args"]
    )
    return model.eval(), config


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("vit_nano_patch4_32", dict(depth=2, img_size=16)),
        ("deit_nano_distilled_patch4_32", dict(depth=2, img_size=16, num_classes=3)),
        ("vit_nano_patch4_32", dict(depth=1, img_size=16, global_pool="avg", num_classes=0)),
    ],
)
def test_export_timm__loads_in_timm_offline_and_back_with_equal_features(tmp_path, monkeypatch, name, overrides):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = create_backbone(name, **overrides).eval()
    export_timm(ours, tmp_path / "timm")
    model, config = _timm_from_folder(tmp_path / "timm")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ours.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), ours(x), atol=1e-5, rtol=0)
    if not ours.num_classes:  # headless: the overlay with `file` alone is enough
        model, _ = _timm_from_folder(tmp_path / "timm", file_only=True)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), ours.forward_features(x), atol=1e-5, rtol=0)
    by_dir = timm.create_model("local-dir:" + str(tmp_path / "timm"), pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_dir(x), ours(x), atol=1e-5, rtol=0)
    back, info = build_backbone(tmp_path / "timm")  # ours -> timm -> ours
    assert info.format == "timm" and info.spec == ours.spec
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), ours.forward_features(x), atol=1e-5, rtol=0)


def test_export_timm__config_has_what_timm_hub_loading_reads(tmp_path):
    config = export_timm(create_backbone("vit_nano_patch4_32", depth=1), tmp_path, mean=(0.1, 0.2, 0.3), std=(1, 1, 1))
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk == config
    assert {"architecture", "num_classes", "model_args", "pretrained_cfg"} <= set(config)
    pc = config["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["mean"] == [0.1, 0.2, 0.3]
    assert pc["tag"] == "ssl_vit" and "license" not in pc  # not the base architecture's metadata
    assert (tmp_path / "model.safetensors").is_file()


def test_export_tool__hub_folder_with_model_card_and_metrics(tmp_path, capsys):
    probe = {"protocol": "linear_probe", "top1": 0.5, "top5": 0.9, "dataset": "synthetic"}
    run = make_run(tmp_path / "run", metrics=probe)
    extra = tmp_path / "knn.json"
    extra.write_text(json.dumps([{"protocol": "knn", "top1": 0.25, "top5": 0.75, "dataset": "synthetic"}]))
    assert export_tool.main(["--run", str(run), "--out", str(tmp_path / "hub"), "--metrics", str(extra)]) == 0
    assert {p.name for p in (tmp_path / "hub").iterdir()} == {"model.safetensors", "config.json", "README.md"}
    card = (tmp_path / "hub" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    for expected in ("Masked autoencoder", "| Data | synthetic |", "| Optimizer steps | 30 |", "480",
                     "| linear_probe | synthetic | 50.00 | 90.00 |", "| knn | synthetic | 25.00 | 75.00 |"):
        assert expected in card
    assert "timm loads it" in capsys.readouterr().out


def test_export_tool__timm_format_writes_no_card(tmp_path):
    run = make_run(tmp_path / "run")
    assert export_tool.main(["--run", str(run), "--out", str(tmp_path / "t"), "--format", "timm"]) == 0
    assert not (tmp_path / "t" / "README.md").exists()


def test_push_to_hub__unreachable_endpoint_fails_with_clear_message(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PushToHubError, match="failed .*Connect.*upload it later"):
        push_to_hub(tmp_path, "someone/model", endpoint="http://127.0.0.1:9", token="hf_not_a_token")


def test_push_to_hub__offline_mode_fails_before_any_request(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushToHubError, match="HF_HUB_OFFLINE"):
        push_to_hub(tmp_path, "someone/model")


@pytest.mark.slow
def test_export_cli__push_without_network_exits_2_and_keeps_folder(tmp_path):
    run = make_run(tmp_path / "run")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export.py"), "--run", str(run), "--out", str(tmp_path / "hub"),
         "--push-to-hub", "someone/model"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot upload to the Hub" in proc.stderr and "hf upload someone/model" in proc.stderr
    assert (tmp_path / "hub" / "model.safetensors").is_file() and (tmp_path / "hub" / "README.md").is_file()
