"""Pretraining seeds: each pretraining runs once per seed, finished seeds are reused, and the table's
mean, std, interval and within-noise marks equal a direct computation from the per-run metrics."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import read_calls
from test_runner import _plan as runner_plan
from test_stats import T_TABLE_975

from ssl_vit.compare import collect, plan_from_dict, resolve_runs, run_comparison, write_results
from ssl_vit.compare.report import WITHIN_NOISE
from ssl_vit.config import ConfigError


def _plan(fakes: dict, **changes) -> dict:
    """test_runner's plan (alpha, beta, random; knn and linear_probe) with seed 0 shared and a knn that
    scores 1.5 points more per pretraining seed."""
    plan = runner_plan(fakes, **changes)
    plan["shared"]["seed"] = 0
    plan["evaluations"][0]["overrides"] = {"fake.seed_gain": 1.5}
    return plan


def _quiet(line: str) -> None:
    pass


def test_two_pretrain_seeds__run_each_pretraining_twice_with_different_seeds_and_weights(fakes, tmp_path: Path):
    out = tmp_path / "out"
    code, results = run_comparison(plan_from_dict(_plan(fakes, pretrain_seeds=[0, 1])), out, echo=_quiet)
    assert code == 0 and results is not None and results.ok
    pretrains = [c["args"] for c in read_calls(fakes["calls"]) if c["script"] == "fake_pretrain"]
    seeds = sorted((Path(a["output_dir"]).name, a["seed"]) for a in pretrains)
    # The seed the entry runs anyway (shared seed 0) keeps the single-seed folder; the other gets its own.
    assert seeds == [("alpha", "0"), ("alpha@seed1", "1"), ("beta", "0"), ("beta@seed1", "1")]
    for name in ("alpha", "beta"):
        weights = [(out / "pretrain" / d / "backbone.safetensors").read_bytes() for d in (name, f"{name}@seed1")]
        assert weights[0] != weights[1]
    calls = read_calls(fakes["calls"])
    evals = {Path(c["args"]["output_dir"]).parent.name for c in calls if c["script"] == "fake_eval"}
    assert evals == {"alpha", "alpha@seed1", "beta", "beta@seed1", "random"}
    # The random init is evaluated once, its init seeds (= its eval seeds) being the pretraining seeds.
    random_knn = json.loads((out / "eval" / "random" / "knn" / "metrics.json").read_text())
    assert random_knn["seeds"] == [0, 1]
    assert results.methods[0].evals["knn"].n == 2 and results.methods[2].evals["knn"].spread == "init seeds"


def test_two_pretrain_seeds__a_rerun_runs_nothing_and_a_new_seed_runs_only_that_seed(fakes, tmp_path: Path):
    out = tmp_path / "out"
    run_comparison(plan_from_dict(_plan(fakes, pretrain_seeds=[0, 1])), out, echo=_quiet)
    n_calls = len(read_calls(fakes["calls"]))
    weights = out / "pretrain" / "alpha@seed1" / "backbone.safetensors"
    mtime = weights.stat().st_mtime_ns
    lines: list[str] = []
    assert run_comparison(plan_from_dict(_plan(fakes, pretrain_seeds=[0, 1])), out, echo=lines.append)[0] == 0
    assert len(read_calls(fakes["calls"])) == n_calls and weights.stat().st_mtime_ns == mtime
    assert sum(line.startswith("[skip]") for line in lines) == 14  # 4 pretrainings, 10 evaluations

    code, results = run_comparison(plan_from_dict(_plan(fakes, pretrain_seeds=[0, 1, 2])), out, echo=_quiet)
    assert code == 0
    new = sorted(str(Path(c["args"]["output_dir"]).relative_to(out)) for c in read_calls(fakes["calls"])[n_calls:])
    assert new == ["eval/alpha@seed2/knn", "eval/alpha@seed2/linear_probe", "eval/beta@seed2/knn",
                   "eval/beta@seed2/linear_probe",
                   "eval/random/knn", "eval/random/linear_probe",  # its init seeds grew to [0, 1, 2]
                   "pretrain/alpha@seed2", "pretrain/beta@seed2"]
    assert weights.stat().st_mtime_ns == mtime and results.methods[0].evals["knn"].n == 3


def test_single_seed_comparison__is_found_again_when_pretrain_seeds_are_added(fakes, tmp_path: Path):
    out = tmp_path / "out"
    run_comparison(plan_from_dict(_plan(fakes)), out, echo=_quiet)
    before = len(read_calls(fakes["calls"]))
    single = {r.id: r.fingerprint for r in resolve_runs(plan_from_dict(_plan(fakes)), out)}
    seeded = {r.id: r.fingerprint for r in resolve_runs(plan_from_dict(_plan(fakes, pretrain_seeds=[0, 1])), out)}
    assert {k: seeded[k] for k in single} == single  # seed 0 is the same run, under the same name
    run_comparison(plan_from_dict(_plan(fakes, pretrain_seeds=[0, 1])), out, echo=_quiet)
    new = {Path(c["args"]["output_dir"]).relative_to(out).parts[1] for c in read_calls(fakes["calls"])[before:]}
    assert new == {"alpha@seed1", "beta@seed1"}  # random's init seeds [0, 1] are its eval seeds already


def test_table__mean_std_and_interval_equal_a_direct_computation_from_the_run_metrics(fakes, tmp_path: Path):
    out = tmp_path / "out"
    run_comparison(plan_from_dict(_plan(fakes, pretrain_seeds=[0, 1, 2])), out, echo=_quiet)
    data = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    for method in ("alpha", "beta"):
        dirs = [method, f"{method}@seed1", f"{method}@seed2"]
        for column in ("knn", "linear_probe"):
            per_run = [json.loads((out / "eval" / d / column / "metrics.json").read_text())["top1"] for d in dirs]
            mean, sd = statistics.fmean(per_run), statistics.stdev(per_run)
            half = T_TABLE_975[2] * sd / math.sqrt(3)
            cell = next(m for m in data["methods"] if m["name"] == method)["evals"][column]
            assert cell["n"] == 3 and cell["top1"] == pytest.approx(mean) and cell["top1_std"] == pytest.approx(sd)
            assert cell["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-3)
            assert f"{mean:.1f} ± {sd:.1f} [{mean - half:.1f}, {mean + half:.1f}]" in table
    # knn: each seed adds 1.5 points (fake.seed_gain), so runs 0, 1, 2 score 60.5, 62.0, 63.5.
    assert next(m for m in data["methods"] if m["name"] == "alpha")["evals"]["knn"]["top1"] == pytest.approx(62.0)
    random = next(m for m in data["methods"] if m["name"] == "random")["evals"]["knn"]
    values = [r["top1"] for r in json.loads((out / "eval" / "random" / "knn" / "metrics.json").read_text())["per_seed"]]
    assert random["n"] == 3 and random["top1"] == pytest.approx(statistics.fmean(values))
    assert random["top1_std"] == pytest.approx(statistics.stdev(values))
    rows = list(csv.DictReader((out / "results_runs.csv").open()))
    assert len([r for r in rows if r["method"] == "alpha" and r["column"] == "knn"]) == 6  # 3 seeds x 2 eval seeds


def _write_metrics(path: Path, per_seed: list[float]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    rows = [{"seed": i, "top1": v, "top5": 99.0} for i, v in enumerate(per_seed)]
    (path / "metrics.json").write_text(json.dumps({
        "protocol": "knn", "seeds": list(range(len(per_seed))), "top1": statistics.fmean(per_seed), "top5": 99.0,
        "top1_std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0, "per_seed": rows, "seconds": 1.0}))


def test_within_noise_mark__on_overlapping_runs_and_not_on_runs_far_apart(tmp_path: Path):
    script = tmp_path / "stand_in.py"
    script.write_text("")
    plan = plan_from_dict({
        "name": "constructed", "seeds": [0], "pretrain_seeds": [0, 1, 2], "shared": {"seed": 0},
        "pretrain": [{"name": name, "recipe": str(script)} for name in ("lead", "close", "far")],
        "evaluations": [{"protocol": "knn", "recipe": str(script)}],
    })
    out = tmp_path / "out"
    runs = resolve_runs(plan, out)
    top1 = {"lead": [50.0, 51.0, 52.0], "close": [49.5, 51.5, 50.2], "far": [30.0, 30.5, 29.8]}
    for run in runs:
        if run.kind == "pretrain":
            run.output_dir.mkdir(parents=True)
            (run.output_dir / "backbone.safetensors").write_bytes(b"")
            (run.output_dir / "backbone.json").write_text(json.dumps({"step": 1, "images_seen": 8}))
        else:
            _write_metrics(run.output_dir, [top1[run.method][run.seed]])  # type: ignore[index]
    results = collect(plan, runs, {}, machine="m")
    cells = {m.name: m.evals["knn"] for m in results.methods}
    assert cells["lead"].best and cells["close"].within_noise is True and cells["far"].within_noise is False
    assert cells["close"].p_vs_best > 0.05 > cells["far"].p_vs_best  # type: ignore[operator]
    write_results(results, out)
    table = (out / "results.md").read_text()
    assert "| lead | **51.0 ± 1.0 [48.5, 53.5]** |" in table
    assert f"| close | 50.4 ± 1.0 [47.9, 52.9] {WITHIN_NOISE} |" in table
    far = next(line for line in table.splitlines() if line.startswith("| far |"))
    assert WITHIN_NOISE not in far and "30.1 ± 0.4" in far
    assert "- knn: best lead 51.0; close -0.6 (p = " in table
    assert "within noise); far -20.9 (p = 0.000: beyond noise)" in table


def test_single_pretrain_run__has_no_interval_and_no_mark(fakes, tmp_path: Path):
    code, results = run_comparison(plan_from_dict(_plan(fakes)), tmp_path / "out", echo=_quiet)
    cell = results.methods[0].evals["knn"]  # type: ignore[union-attr]
    assert code == 0 and cell.n == 1 and cell.ci95 is None and cell.within_noise is None
    assert "no test of the gaps" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("where", ["pretrain_shared", "entry"])
def test_pinned_seed_with_pretrain_seeds__is_an_error(fakes, where):
    raw = _plan(fakes, pretrain_seeds=[0, 1])
    if where == "entry":
        raw["pretrain"][0]["overrides"]["seed"] = 3
    else:
        raw["pretrain_shared"] = {"seed": 3}
    with pytest.raises(ConfigError, match="sets 'seed', which pretrain_seeds"):
        plan_from_dict(raw)


@pytest.mark.parametrize("seeds", [[], [0, 0]])
def test_pretrain_seeds_must_be_distinct(fakes, seeds):
    with pytest.raises(ConfigError, match="'pretrain_seeds' must be distinct integers"):
        plan_from_dict(_plan(fakes, pretrain_seeds=seeds))


def test_references__point_at_the_same_seeds_run(fakes, tmp_path: Path):
    raw = _plan(fakes, pretrain_seeds=[0, 1])
    raw["pretrain"][1]["overrides"]["fake.teacher"] = "${alpha}"
    runs = {r.id: r for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    beta1 = runs["pretrain/beta@seed1"]
    assert beta1.depends == ["pretrain/alpha@seed1"]
    assert f"fake.teacher={tmp_path.resolve() / 'out' / 'pretrain' / 'alpha@seed1'}" in beta1.args
    assert runs["pretrain/beta"].depends == ["pretrain/alpha"]


def test_loss_band__is_the_mean_min_and_max_over_the_seeds_at_the_steps_all_logged():
    from ssl_vit.compare.plots import _band

    steps, mean, low, high = _band([[(1, 3.0), (2, 2.0), (3, 1.0)], [(1, 5.0), (2, 1.0)]])
    assert steps == [1, 2] and mean == [4.0, 1.5] and low == [3.0, 1.0] and high == [5.0, 2.0]
