"""The plug-in path: an objective defined outside the package trains through recipes/pretrain.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A user's module: it only imports the public registry, never the engine.
TOY_MODULE = textwrap.dedent(
    '''
    """A toy self-supervised objective: pull the class token towards a constant."""
    from pathlib import Path

    import torch
    import torch.nn as nn

    from ssl_vit.objectives import register_objective


    @register_objective("toy")
    class Toy(nn.Module):
        needs_labels = False
        transform = "mae"
        config_group = None  # its kwargs come from objective.args

        def __init__(self, backbone, target=0.0, marker=None):
            super().__init__()
            self.backbone = backbone
            self.target = float(target)
            if marker:  # proves objective.args reached the constructor
                Path(marker).write_text(f"target={self.target}")

        def forward(self, batch):
            cls = self.backbone.forward_features(batch["pixel_values"])[:, 0]  # (B, D)
            return {"loss": ((cls - self.target) ** 2).mean(), "toy_cls_mean": cls.detach().mean()}
    '''
)


@pytest.mark.slow
def test_toy_objective_outside_the_package__trains_through_recipes_pretrain(tmp_path: Path) -> None:
    (tmp_path / "toy_mod.py").write_text(TOY_MODULE)
    out, marker = tmp_path / "run", tmp_path / "made.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "pretrain.py"),
        "objective.module=toy_mod",
        "objective.name=toy",
        f"objective.args={{target: 0.5, marker: {marker}}}",
        f"output_dir={out}",
        "model.args={depth: 1, embed_dim: 32, num_heads: 2}",
        "data.image_size=16",
        "data.synthetic_train_size=32",
        "data.synthetic_eval_size=16",
        "data.num_workers=0",
        "train.max_steps=2",
        "train.batch_size=16",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.read_text() == "target=0.5"
    info = json.loads((out / "backbone.json").read_text())
    assert json.dumps(info).count('"toy"') >= 1  # the export records the objective that trained it
    assert (out / "backbone.safetensors").is_file()


def test_unknown_objective_module__is_a_clear_error(tmp_path: Path) -> None:
    from ssl_vit.objectives import import_objective_module

    with pytest.raises(ValueError, match="PYTHONPATH"):
        import_objective_module("no_such_user_module_xyz")
