"""tools/sweep_defaults.py: each variant pretrained once, judged by the eval recipes, one row each."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = {"data.synthetic_train_size": 64, "data.synthetic_eval_size": 32, "data.num_workers": 0,
        "data.image_size": 16, "model.args": "{depth: 1, embed_dim: 32, num_heads: 2}"}


def _tool():
    spec = importlib.util.spec_from_file_location("sweep_defaults", ROOT / "tools" / "sweep_defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sweep__rows_hold_what_the_runs_and_evaluations_wrote_and_a_rerun_trains_nothing(tmp_path: Path):
    plan = tmp_path / "plan.yaml"
    run = {"train.max_steps": 2, "train.batch_size": 16, "train.vis_every": 0, **TINY}
    plan.write_text(yaml.safe_dump({
        "runs": [{"name": "sup", "recipe": "supervised_pretrain", "overrides": run}],
        "random": ["vit_nano_patch4_32"],
        "eval_overrides": {k: v for k, v in TINY.items() if k != "model.args"} | {"features.pool": "avg"},
    }))
    out = tmp_path / "sweep"
    rows = _tool().main(["--plan", str(plan), "--out", str(out), "--threads", "1"])

    sup, rand = rows
    assert sup["steps"] == 2 and sup["top1"] is not None  # the supervised run's own eval
    for row, folder in ((sup, out / "sup"), (rand, out / "random_vit_nano_patch4_32")):
        for protocol in ("knn", "linear_probe"):
            metrics = json.loads((folder / protocol / "metrics.json").read_text())
            assert row[protocol] == metrics["top1"] and metrics["hyperparameters"]["pool"] == "avg"
    table = (out / "sweep.md").read_text()
    assert "| sup | supervised_pretrain |" in table and "| random vit_nano_patch4_32 |" in table

    before = (out / "sup" / "pretrain" / "backbone.safetensors").stat().st_mtime_ns
    _tool().main(["--plan", str(plan), "--out", str(out), "--threads", "1", "--only", "sup"])
    assert (out / "sup" / "pretrain" / "backbone.safetensors").stat().st_mtime_ns == before
