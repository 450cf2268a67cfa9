"""Collection and tables on hand-written files: metrics.json, backbone.json, TensorBoard events."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ssl_vit.compare import (
    collect,
    plan_from_dict,
    read_loss_curve,
    read_metrics,
    resolve_runs,
    write_plots,
    write_results,
)
from ssl_vit.compare.collect import pretrain_stats
from ssl_vit.compare.report import format_cell, format_seconds, markdown_table
from ssl_vit.compare.runner import RunStatus


def _metrics(path: Path, top1: list[float], protocol: str = "knn", **extra) -> None:
    path.mkdir(parents=True, exist_ok=True)
    per_seed = [{"seed": i, "top1": t, "top5": 99.0} for i, t in enumerate(top1)]
    mean = sum(top1) / len(top1)
    data = {"protocol": protocol, "method": "mae", "checkpoint": "x", "model": "vit_nano_patch4_32",
            "dataset": "synthetic", "split": "test", "hyperparameters": {}, "seeds": list(range(len(top1))),
            "top1": mean, "top5": 99.0, "per_seed": per_seed, "seconds": 3.0, "n_train": 10, "n_eval": 5,
            "pretrain": {}, **extra}
    (path / "metrics.json").write_text(json.dumps(data))


def test_read_metrics__mean_and_std_over_seeds(tmp_path: Path):
    _metrics(tmp_path, [50.0, 52.0], top1_std=1.4142, by_k={"20": 51.0})
    cell = read_metrics(tmp_path / "metrics.json", "knn", "knn")
    assert cell.status == "ok" and cell.top1 == 51.0 and cell.top1_std == pytest.approx(1.4142)
    assert cell.seeds == [0, 1] and cell.extra["by_k"] == {"20": 51.0}
    assert format_cell(cell) == "51.0 ± 1.4"


def test_read_metrics__derives_std_from_per_seed_when_absent(tmp_path: Path):
    _metrics(tmp_path, [10.0, 20.0, 30.0])
    assert read_metrics(tmp_path / "metrics.json").top1_std == pytest.approx(10.0)


def test_read_metrics__one_seed_shows_no_spread(tmp_path: Path):
    _metrics(tmp_path, [42.0])
    assert format_cell(read_metrics(tmp_path / "metrics.json")) == "42.0"


@pytest.mark.parametrize(
    "content, status", [("{not json", "invalid"), ('{"top1": "n/a"}', "invalid"), (None, "missing")]
)
def test_read_metrics__bad_or_missing_file_is_a_cell_not_an_exception(tmp_path: Path, content, status):
    if content is not None:
        (tmp_path / "metrics.json").write_text(content)
    cell = read_metrics(tmp_path / "metrics.json")
    assert cell.status == status and cell.error and format_cell(cell) in ("INVALID", "missing")


def test_pretrain_stats__reads_backbone_json_and_fills_images_per_sec(tmp_path: Path):
    (tmp_path / "backbone.json").write_text(json.dumps({"objective": "mae", "step": 10, "images_seen": 1280,
                                                        "seconds": 64.0}))
    stats, objective = pretrain_stats(tmp_path)
    assert objective == "mae" and stats["steps"] == 10 and stats["images_per_sec"] == pytest.approx(20.0)


def test_pretrain_stats__falls_back_to_the_runner_wall_clock(tmp_path: Path):
    (tmp_path / "backbone.json").write_text(json.dumps({"objective": "mae", "step": 10, "images_seen": 100}))
    (tmp_path / "compare_run.json").write_text(json.dumps({"status": "done", "seconds": 50.0}))
    stats, _ = pretrain_stats(tmp_path)
    assert stats["seconds"] == 50.0 and "start-up" in stats["seconds_source"] and stats["images_per_sec"] == 2.0


def test_read_loss_curve__finds_the_loss_tag_and_keeps_the_last_value_of_resumed_steps(tmp_path: Path):
    from torch.utils.tensorboard import SummaryWriter

    tb = tmp_path / "tb" / "tb"
    for values in ([(1, 3.0), (2, 2.0), (3, 9.0)], [(3, 1.5), (4, 1.0)]):  # a crash at step 3, then a resume
        writer = SummaryWriter(str(tb))
        for step, v in values:
            writer.add_scalar("train/loss", v, step)
            writer.add_scalar("train/lr", 0.1, step)
        writer.close()
    tag, curve = read_loss_curve(tmp_path)
    assert tag == "train/loss" and curve == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]


def test_read_loss_curve__no_events_gives_nothing(tmp_path: Path):
    assert read_loss_curve(tmp_path) == (None, [])


def _fake_plan(tmp_path: Path):
    script = tmp_path / "stand_in.py"
    script.write_text("")
    plan = plan_from_dict({
        "name": "hand", "seeds": [0, 1], "budget": {"kind": "images", "images": 1000},
        "shared": {"data.name": "synthetic"},
        "pretrain": [{"name": "mae", "recipe": str(script)}, {"name": "sup", "recipe": str(script)},
                     {"name": "random", "checkpoint": "random"}],
        "evaluations": [{"protocol": "knn", "recipe": str(script)},
                        {"protocol": "linear_probe", "recipe": str(script)}],
    })
    out = tmp_path / "out"
    return plan, resolve_runs(plan, out), out


def test_collect__builds_the_method_by_protocol_table_from_hand_written_files(tmp_path: Path):
    plan, runs, out = _fake_plan(tmp_path)
    for name, steps in (("mae", 15), ("sup", 15)):
        d = out / "pretrain" / name
        d.mkdir(parents=True)
        (d / "backbone.safetensors").write_bytes(b"")
        (d / "backbone.json").write_text(json.dumps({"objective": name, "step": steps, "images_seen": 960,
                                                     "seconds": 125.0, "images_per_sec": 7.68}))
    _metrics(out / "eval" / "mae" / "knn", [30.0, 32.0], top1_std=1.41)
    _metrics(out / "eval" / "mae" / "linear_probe", [60.0, 62.0], "linear_probe", top1_std=1.41)
    _metrics(out / "eval" / "sup" / "knn", [70.0, 70.0], top1_std=0.0)
    _metrics(out / "eval" / "random" / "knn", [20.0, 22.0], top1_std=1.41)
    _metrics(out / "eval" / "random" / "linear_probe", [25.0, 25.0], "linear_probe", top1_std=0.0)
    statuses = {"eval/sup/linear_probe": RunStatus("eval/sup/linear_probe", "failed", "exit status 1; last line: boom",
                                                   log="logs/x.log")}
    results = collect(plan, runs, statuses, machine="test machine")
    table = markdown_table(results)
    assert "| method | knn top-1 | linear_probe top-1 | budget | steps | images seen | wall-clock | images/s |" in table
    assert "| mae | 31.0 ± 1.4 | **61.0 ± 1.4** | 960 img = 15 steps x 64 | 15 | 960 | 2m 05s | 8 |" in table
    assert "| sup | **70.0 ± 0.0** | FAILED |" in table
    assert "| random | 21.0 ± 1.4 | 25.0 ± 0.0 | none (random init) | - | - | - | - |" in table
    assert results.problems == ["eval/sup/linear_probe: failed: exit status 1; last line: boom (log: logs/x.log)"]

    plots = write_plots(results, out)
    written = write_results(results, out, plots)
    assert [p.name for p in written] == ["results.md", "results.csv", "results_runs.csv", "results.json"]
    assert (out / "accuracy.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "## Problems" in md and "![accuracy](accuracy.png)" in md and "test machine" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 6
    sup_lp = next(r for r in rows if r["method"] == "sup" and r["column"] == "linear_probe")
    assert sup_lp["status"] == "failed" and "boom" in sup_lp["error"]
    data = json.loads((out / "results.json").read_text())
    assert data["methods"][0]["evals"]["knn"]["top1"] == 31.0 and data["budget"]["images"] == 1000


def test_collect__missing_pretraining_output_is_a_problem(tmp_path: Path):
    plan, runs, out = _fake_plan(tmp_path)
    results = collect(plan, runs, {}, machine="m")
    assert any(p.startswith("pretrain/mae: missing") for p in results.problems)
    assert not results.ok


@pytest.mark.parametrize("seconds, text", [(None, "-"), (4.25, "4.2s"), (75.2, "1m 15s"), (4000, "1h 06m")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text
