"""tools/visualize_mae.py: rebuilds a run's MAE from its files and writes the reconstruction grid."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ssl_vit.config import PretrainConfig, config_from_dict, save_config
from ssl_vit.models import create_backbone
from ssl_vit.objectives.mae import MAE
from ssl_vit.viz.mae import reconstruction_grid

TOOL = Path(__file__).resolve().parents[2] / "tools" / "visualize_mae.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("visualize_mae_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(tmp_path: Path, with_spec: bool) -> tuple[Path, MAE]:
    """A run folder as the engine leaves it: config.yaml, checkpoint-last/model.safetensors (+ backbone.json)."""
    cfg = config_from_dict(PretrainConfig, {
        "output_dir": str(tmp_path),
        "model": {"name": "vit_nano_patch4_32", "pos_embed": "sincos",
                  "args": {"depth": 1, "embed_dim": 32, "num_heads": 2}},
        "data": {"name": "synthetic", "image_size": 16, "synthetic_train_size": 40, "synthetic_eval_size": 10,
                 "num_workers": 0},
        "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "mask_ratio": 0.5},
    })
    save_config(cfg, tmp_path / "config.yaml")
    torch.manual_seed(0)
    backbone = create_backbone("vit_nano_patch4_32", img_size=16, pos_embed="sincos", num_classes=0,
                               depth=1, embed_dim=32, num_heads=2)
    mae = MAE(backbone, mask_ratio=0.5, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    with torch.no_grad():  # weights unlike any fresh init, so a wrong load would show
        for p in mae.parameters():
            p.add_(0.1)
    (tmp_path / "checkpoint-last").mkdir()
    weights = {k: v.contiguous() for k, v in mae.state_dict().items()}
    save_file(weights, str(tmp_path / "checkpoint-last" / "model.safetensors"))
    if with_spec:
        import json

        (tmp_path / "backbone.json").write_text(json.dumps({"model": backbone.spec}))
    return tmp_path, mae.eval()


@pytest.mark.parametrize("with_spec", [True, False])
def test_visualize_mae__rebuilds_the_trained_objective_from_the_run_folder(tmp_path, with_spec):
    run, trained = fake_run(tmp_path, with_spec)
    rebuilt, _ = load_tool().load_run(run)
    for k, v in trained.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k


def test_visualize_mae__writes_a_grid_png_from_the_runs_data(tmp_path):
    run, trained = fake_run(tmp_path, with_spec=True)
    out = load_tool().main(["--run", str(run), "--images", "3", "--out", str(tmp_path / "grid.png")])
    grid = np.asarray(Image.open(out))
    side = 16 * 4 + 1  # 16-pixel tiles enlarged to 64, 1-pixel padding
    assert grid.shape == (3 * side + 1, 4 * side + 1, 3)


def test_visualize_mae__takes_images_from_a_folder_and_matches_the_objectives_own_grid(tmp_path):
    (tmp_path / "run").mkdir()
    run, trained = fake_run(tmp_path / "run", with_spec=True)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(pictures / f"{i}.png")
    tool = load_tool()
    out = tool.main(["--run", str(run), "--folder", str(pictures), "--images", "5", "--seed", "3"])
    assert out == run / "mae_reconstruction_tool.png"
    _, cfg = tool.load_run(run)
    images = tool.folder_images(pictures, 5, cfg)
    assert images.shape == (2, 3, 16, 16)
    expected = reconstruction_grid(trained, images, cfg.data.mean, cfg.data.std, seed=3)
    written = torch.from_numpy(np.asarray(Image.open(out)).copy()).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(written, expected, atol=1 / 255, rtol=0)


def test_visualize_mae__explains_a_folder_that_is_not_an_mae_run(tmp_path):
    with pytest.raises(SystemExit, match="config.yaml not found"):
        load_tool().main(["--run", str(tmp_path)])
