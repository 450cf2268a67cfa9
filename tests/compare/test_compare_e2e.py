"""The comparison tool end to end on the real recipes, with tiny budgets on built-in synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# A 1-block, 32-wide ViT on 16x16 images (16 tokens): seconds per run on a CPU.
TINY_MODEL = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def _tiny_plan(tmp_path: Path) -> dict:
    broken = tmp_path / "broken_pretrain.py"  # a recipe that dies at once (as a crash or a bad config would)
    broken.write_text("import sys\nsys.exit('RuntimeError: this pretraining is broken on purpose')\n")
    return {
        "name": "tiny",
        "shared": {
            "model": {"name": "vit_nano_patch4_32", "args": TINY_MODEL},
            "data": {"name": "synthetic", "image_size": 16, "synthetic_train_size": 64, "synthetic_eval_size": 32,
                     "num_workers": 0},
        },
        "pretrain_shared": {"train": {"eval_every": 0, "vis_every": 0, "save_every": 0, "log_every": 1}},
        "seeds": [0, 1],
        "budget": {"kind": "images", "images": 64},
        "pretrain": [
            {"name": "mae", "recipe": "mae_pretrain",
             "overrides": {"train.batch_size": 16, "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}}},
            {"name": "random", "checkpoint": "random"},
            {"name": "broken", "recipe": str(broken)},
        ],
        "evaluations": [
            {"protocol": "knn", "overrides": {"features.cache_dir": "${out}/cache", "knn.ks": [5, 20]}},
            {"protocol": "linear_probe",
             "overrides": {"features.cache_dir": "${out}/cache", "train": {"epochs": 2, "batch_size": 32},
                           "optim.warmup_epochs": 1}},
            # No warm-up: one 2-step epoch is too short for one (the trainer rejects a warm-up as long as the run).
            {"protocol": "finetune", "seeds": [0],
             "overrides": {"train": {"epochs": 1, "batch_size": 32}, "optim.warmup_epochs": 0}},
        ],
    }


def _compare(plan_file: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "compare.py"), "--plan", str(plan_file), "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    """The tiny plan run once: its first invocation, and the table it wrote then (read before any other
    invocation in this folder). The pretraining-seeds test goes on in the same folder, where the plan's
    seed-0 MAE run and its and the random init's kNN evaluations (the same runs) are found complete."""
    root = tmp_path_factory.mktemp("tiny_comparison")
    plan_file = root / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(_tiny_plan(root)))
    out = root / "out"
    first = _compare(plan_file, out)
    written = {name: (out / name).read_text() for name in ("results.json", "results.md") if (out / name).is_file()}
    return root, plan_file, out, first, written


@pytest.mark.slow
def test_tiny_plan__runs_end_to_end_reports_the_broken_entry_and_a_rerun_runs_nothing(tiny_comparison):
    _, plan_file, out, first, written = tiny_comparison
    assert first.returncode == 1, first.stdout + first.stderr  # the broken entry
    for name in ("results.md", "results.csv", "results.json", "accuracy.png", "loss_curves.png", "plan.yaml"):
        assert (out / name).is_file(), f"{name} missing:\n{first.stdout}\n{first.stderr}"
    data = json.loads(written["results.json"])
    methods = {m["name"]: m for m in data["methods"]}
    for name in ("mae", "random"):
        for column, seeds in (("knn", [0, 1]), ("linear_probe", [0, 1]), ("finetune", [0])):
            cell = methods[name]["evals"][column]
            assert cell["status"] == "ok" and 0.0 <= cell["top1"] <= 100.0 and cell["seeds"] == seeds, cell
    assert methods["mae"]["pretrain"]["steps"] == 4  # 64 images / batch 16
    assert methods["mae"]["pretrain"]["images_seen"] == 64 and methods["mae"]["pretrain"]["seconds"] > 0
    assert methods["mae"]["loss_tag"]
    assert methods["broken"]["status"] == "failed" and "broken on purpose" in methods["broken"]["error"]
    assert {c["status"] for c in methods["broken"]["evals"].values()} == {"blocked"}
    table = written["results.md"]
    assert "| broken (pretraining FAILED) | blocked | blocked | blocked |" in table and "## Problems" in table

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    weights = out / "pretrain" / "mae" / "backbone.safetensors"
    mtimes[weights] = weights.stat().st_mtime_ns
    second = _compare(plan_file, out)
    assert second.returncode == 1  # still broken, and said so again
    lines = second.stdout.splitlines()
    started = [line.split()[1] for line in lines if line.startswith(("[run]", "[resume]", "[rerun]"))]
    assert started == ["pretrain/broken"]  # only what failed is tried again
    assert second.stdout.count("[skip]") == 7
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing complete was rerun


@pytest.mark.slow
def test_pretrain_seeds__real_recipe_trains_other_weights_per_seed_and_reuses_them(tiny_comparison):
    from safetensors.torch import load_file

    # In the tiny plan's folder: its seed-0 MAE pretraining and the kNN evaluations of it and of the random
    # init are this plan's too (a single-seed comparison's runs are found again when pretrain_seeds are
    # added); the seed-1 pretraining and its evaluation run here.
    root, _, out, _, _ = tiny_comparison
    plan = _tiny_plan(root)
    plan["pretrain"] = [plan["pretrain"][0], {"name": "random", "checkpoint": "random"}]
    plan["evaluations"] = [plan["evaluations"][0]]
    plan["pretrain_seeds"] = [0, 1]
    plan_file = root / "plan_seeds.yaml"
    plan_file.write_text(yaml.safe_dump(plan))

    first = _compare(plan_file, out)
    assert first.returncode == 0, first.stdout + first.stderr
    a = load_file(out / "pretrain" / "mae" / "backbone.safetensors")
    b = load_file(out / "pretrain" / "mae@seed1" / "backbone.safetensors")
    assert a.keys() == b.keys() and any(not (a[k] == b[k]).all() for k in a)  # another init, order and masks
    cell = json.loads((out / "results.json").read_text())["methods"][0]["evals"]["knn"]
    per_run = [json.loads((out / "eval" / d / "knn" / "metrics.json").read_text())["top1"]
               for d in ("mae", "mae@seed1")]
    assert cell["n"] == 2 and cell["top1"] == pytest.approx(sum(per_run) / 2)
    assert cell["top1_std"] == pytest.approx(abs(per_run[0] - per_run[1]) / 2**0.5)

    second = _compare(plan_file, out)
    assert second.returncode == 0 and second.stdout.count("[skip]") == 5  # 2 pretrainings, 3 evaluations
    assert "[run]" not in second.stdout
