"""The runner on stand-in recipes: runs what is missing, skips what is complete, survives failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_calls

from ssl_vit.compare import plan_from_dict, resolve_runs, run_comparison
from ssl_vit.compare.runner import MARKER, run_state
from ssl_vit.config import ConfigError


def _plan(fakes: dict, **changes) -> dict:
    plan = {
        "name": "fake",
        "shared": {"data.name": "synthetic"},
        "seeds": [0, 1],
        "budget": {"kind": "images", "images": 640},
        "pretrain": [
            {"name": "alpha", "recipe": str(fakes["pretrain"]), "overrides": {"train.batch_size": 32}},
            {"name": "beta", "recipe": str(fakes["pretrain"]), "overrides": {"train.batch_size": 64}},
            {"name": "random", "checkpoint": "random"},
        ],
        "evaluations": [
            {"protocol": "knn", "recipe": str(fakes["eval"])},
            {"protocol": "linear_probe", "recipe": str(fakes["eval"]), "overrides": {"fake.top1": 40}},
        ],
    }
    plan.update(changes)
    return plan


def test_run_comparison__runs_everything_then_writes_table_csv_json_and_plot(fakes, tmp_path: Path):
    code, results = run_comparison(plan_from_dict(_plan(fakes)), tmp_path / "out", echo=lambda s: None)
    out = tmp_path / "out"
    assert code == 0 and results is not None and results.ok
    assert (out / "results.md").is_file() and (out / "results.csv").is_file() and (out / "accuracy.png").is_file()
    calls = read_calls(fakes["calls"])
    assert sorted(c["script"] for c in calls) == ["fake_eval"] * 6 + ["fake_pretrain"] * 2
    table = (out / "results.md").read_text()
    assert "| alpha | **60.5 ± 0.7** | **50.5 ± 0.7** |" in table
    assert "| random | 50.5 ± 0.7 | 40.5 ± 0.7 | none (random init) |" in table
    data = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in data["methods"]] == ["alpha", "beta", "random"]


def test_images_budget__gives_each_method_the_same_images_whatever_its_batch(fakes, tmp_path: Path):
    runs = {r.id: r for r in resolve_runs(plan_from_dict(_plan(fakes)), tmp_path / "out")}
    assert "train.max_steps=20" in runs["pretrain/alpha"].args  # 640 / 32
    assert "train.max_steps=10" in runs["pretrain/beta"].args  # 640 / 64
    assert runs["pretrain/alpha"].budget["images_given"] == runs["pretrain/beta"].budget["images_given"] == 640


def test_second_invocation__reruns_nothing(fakes, tmp_path: Path):
    plan = plan_from_dict(_plan(fakes))
    run_comparison(plan, tmp_path / "out", echo=lambda s: None)
    n_calls = len(read_calls(fakes["calls"]))
    mtime = (tmp_path / "out" / "eval" / "alpha" / "knn" / "metrics.json").stat().st_mtime_ns
    lines: list[str] = []
    code, _ = run_comparison(plan, tmp_path / "out", echo=lines.append)
    assert code == 0
    assert len(read_calls(fakes["calls"])) == n_calls
    assert (tmp_path / "out" / "eval" / "alpha" / "knn" / "metrics.json").stat().st_mtime_ns == mtime
    assert sum(line.startswith("[skip]") for line in lines) == 8
    assert (tmp_path / "out" / "results.md").is_file()


def test_broken_entry__is_reported_and_the_rest_is_still_written(fakes, tmp_path: Path):
    raw = _plan(fakes)
    raw["pretrain"][1]["overrides"]["fake.fail"] = True
    code, results = run_comparison(plan_from_dict(raw), tmp_path / "out", echo=lambda s: None)
    assert code == 1 and results is not None
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| beta (pretraining FAILED) | blocked | blocked |" in table
    assert "| alpha | **60.5 ± 0.7** |" in table and "| random | 50.5 ± 0.7 |" in table
    assert any("pretrain/beta: failed" in p and "fake failure asked for by the plan" in p for p in results.problems)
    # Its evaluations were not launched; every other run was.
    scripts = [(c["script"], c["args"]["output_dir"]) for c in read_calls(fakes["calls"])]
    assert not any("/eval/beta/" in d for _, d in scripts)
    assert sum(s == "fake_eval" for s, _ in scripts) == 4


def test_failed_eval__is_a_cell_and_a_problem_not_a_crash(fakes, tmp_path: Path):
    raw = _plan(fakes)
    raw["evaluations"][1]["overrides"]["fake.fail"] = True
    code, results = run_comparison(plan_from_dict(raw), tmp_path / "out", echo=lambda s: None)
    assert code == 1
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| alpha | **60.5 ± 0.7** | FAILED |" in table
    assert len(results.problems) == 3  # one per method's linear probe


def test_rerun_after_failure__runs_only_what_failed(fakes, tmp_path: Path):
    raw = _plan(fakes)
    raw["pretrain"][1]["overrides"]["fake.fail"] = True
    run_comparison(plan_from_dict(raw), tmp_path / "out", echo=lambda s: None)
    del raw["pretrain"][1]["overrides"]["fake.fail"]
    before = len(read_calls(fakes["calls"]))
    code, _ = run_comparison(plan_from_dict(raw), tmp_path / "out", echo=lambda s: None)
    assert code == 0
    new = [c["args"]["output_dir"] for c in read_calls(fakes["calls"])[before:]]
    # beta's settings changed (the failure flag went away): its pretraining and both evals, nothing else.
    assert len(new) == 3 and all("beta" in d for d in new)
    assert list((tmp_path / "out" / "pretrain").glob("beta.stale-*"))  # the old attempt is kept aside


def test_partial_run__is_resumed_in_place(fakes, tmp_path: Path):
    plan = plan_from_dict(_plan(fakes))
    runs = {r.id: r for r in resolve_runs(plan, tmp_path / "out")}
    alpha = runs["pretrain/alpha"]
    assert run_state(alpha) == "new"
    alpha.output_dir.mkdir(parents=True)
    (alpha.output_dir / MARKER).write_text(json.dumps({"fingerprint": alpha.fingerprint, "status": "started"}))
    (alpha.output_dir / "checkpoint-last").mkdir()
    assert run_state(alpha) == "partial"
    run_comparison(plan, tmp_path / "out", echo=lambda s: None)
    assert (alpha.output_dir / "checkpoint-last").is_dir()  # resumed in place, not set aside
    assert run_state(alpha) == "complete"


def test_changed_settings__make_the_run_and_its_evaluations_stale(fakes, tmp_path: Path):
    run_comparison(plan_from_dict(_plan(fakes)), tmp_path / "out", echo=lambda s: None)
    raw = _plan(fakes)
    raw["pretrain"][0]["overrides"]["train.batch_size"] = 16
    runs = {r.id: r for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    assert run_state(runs["pretrain/alpha"]) == "stale"
    assert run_state(runs["eval/alpha/knn"]) == "stale"
    assert run_state(runs["pretrain/beta"]) == "complete" and run_state(runs["eval/random/knn"]) == "complete"


def test_only__runs_the_named_method_and_reports_the_rest_as_not_run(fakes, tmp_path: Path):
    code, results = run_comparison(plan_from_dict(_plan(fakes)), tmp_path / "out", only=["beta"], echo=lambda s: None)
    assert code == 0
    dirs = {c["args"]["output_dir"] for c in read_calls(fakes["calls"])}
    assert dirs and all("/beta" in d for d in dirs)
    assert "| alpha | not run | not run |" in (tmp_path / "out" / "results.md").read_text()


def test_dry_run__launches_nothing_and_writes_nothing(fakes, tmp_path: Path):
    lines: list[str] = []
    code, results = run_comparison(plan_from_dict(_plan(fakes)), tmp_path / "out", dry_run=True, echo=lines.append)
    assert code == 0 and results is None
    assert read_calls(fakes["calls"]) == [] and not (tmp_path / "out").exists()
    assert sum(line.startswith("[run]") for line in lines) == 8


def test_accelerate_launcher__wraps_every_command(fakes, tmp_path: Path):
    raw = _plan(fakes, launcher={"kind": "accelerate", "config_file": "acc.yaml", "num_processes": 2})
    runs = {r.id: r for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    plan = plan_from_dict(raw)
    cmd = runs["pretrain/alpha"].command(plan.launcher, "python")
    launch = ["python", "-m", "accelerate.commands.launch", "--config_file", "acc.yaml", "--num_processes", "2"]
    assert cmd[:7] == launch
    assert cmd[7] == str(fakes["pretrain"])
    assert "train.max_steps=10" in runs["pretrain/alpha"].args  # 640 / (32 x 2 processes)


def test_timeout__stops_the_run_and_reports_it(fakes, tmp_path: Path):
    hang = tmp_path / "fake_recipes" / "hang.py"
    hang.write_text("import time\nprint('working', flush=True)\ntime.sleep(60)\n")
    raw = _plan(fakes, launcher={"timeout_s": 0.5})
    raw["pretrain"][0]["recipe"] = str(hang)
    code, results = run_comparison(plan_from_dict(raw), tmp_path / "out", echo=lambda s: None)
    assert code == 1
    expected = "pretrain/alpha: failed: stopped after the launcher's timeout_s=0.5"
    assert any(p.startswith(expected) for p in results.problems)


def test_config_comment_edit__does_not_make_runs_stale(fakes, tmp_path: Path):
    config = tmp_path / "alpha.yaml"
    config.write_text("# expected: TBD\ntrain:\n  batch_size: 32\n")
    raw = _plan(fakes)
    raw["pretrain"][0]["config"] = str(config)
    before = {r.id: r.fingerprint for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    config.write_text("# expected: 61% top-1 (measured)\ntrain:\n  batch_size: 32\n")
    after = {r.id: r.fingerprint for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    config.write_text("# expected: 61% top-1 (measured)\ntrain:\n  batch_size: 16\n")
    changed = {r.id: r.fingerprint for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    assert before == after
    assert changed["pretrain/alpha"] != after["pretrain/alpha"] and changed["pretrain/beta"] == after["pretrain/beta"]


def test_rerun_teacher__retrains_its_student_from_scratch(fakes, tmp_path: Path):
    # beta learns from alpha (${alpha}, as DeiT from its teacher): when alpha's settings change, beta's
    # finished checkpoint was taught by the old alpha, so beta is set aside and trained again, not resumed.
    raw = _plan(fakes)
    raw["pretrain"][1]["overrides"]["distill.teacher"] = "${alpha}"
    run_comparison(plan_from_dict(raw), tmp_path / "out", echo=lambda s: None)
    raw["pretrain"][0]["overrides"]["train.batch_size"] = 16
    log: list[str] = []
    run_comparison(plan_from_dict(raw), tmp_path / "out", echo=log.append)
    beta = tmp_path / "out" / "pretrain" / "beta"
    assert beta.with_name("beta.stale-1").is_dir() and any("pretrain/beta" in line and "[stale]" in line for line in log)
    calls = [c for c in read_calls(fakes["calls"]) if c["script"] == "fake_pretrain"]
    assert len(calls) == 4  # alpha and beta, then both again
    # beta's evaluations judged the old beta: set aside and run afresh (a fine-tune resumed in place would
    # find its finished checkpoint-last and report the old fine-tune).
    knn = tmp_path / "out" / "eval" / "beta" / "knn"
    assert knn.with_name("knn.stale-1").is_dir() and any("eval/beta/knn" in line and "[stale]" in line for line in log)


def test_teacher_rerun_alone__makes_its_student_stale_at_the_next_invocation(fakes, tmp_path: Path):
    # `--only alpha` re-makes the teacher and nothing else; the next full invocation must still see that
    # beta was taught by the old alpha (the teacher's fingerprint is part of beta's), not skip it as complete.
    raw = _plan(fakes)
    raw["pretrain"][1]["overrides"]["distill.teacher"] = "${alpha}"
    run_comparison(plan_from_dict(raw), tmp_path / "out", echo=lambda s: None)
    raw["pretrain"][0]["overrides"]["train.batch_size"] = 16
    run_comparison(plan_from_dict(raw), tmp_path / "out", echo=lambda s: None, only=["alpha"])
    runs = {r.id: r for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    assert run_state(runs["pretrain/alpha"]) == "complete" and run_state(runs["pretrain/beta"]) == "stale"


def test_images_budget__reads_batch_and_epochs_from_the_config_file_of_a_script_it_cannot_load(fakes, tmp_path: Path):
    # A script outside recipes/ cannot be loaded in-process: its --config file still says its batch and its
    # epochs (the schedules' shares), not the engine's defaults (batch 64, 10 epochs).
    config = tmp_path / "mine.yaml"
    config.write_text("train:\n  batch_size: 16\n  epochs: 7\n")
    raw = _plan(fakes)
    raw["pretrain"][0] = {"name": "alpha", "recipe": str(fakes["pretrain"]), "config": str(config)}
    runs = {r.id: r for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    assert "train.max_steps=40" in runs["pretrain/alpha"].args  # 640 / 16
    assert "train.schedule_epochs=7" in runs["pretrain/alpha"].args
    raw["pretrain"][0]["overrides"] = {"train.batch_size": 32}  # the plan's keys still win
    runs = {r.id: r for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    assert "train.max_steps=20" in runs["pretrain/alpha"].args


def test_accelerate_launcher__budgets_the_processes_its_config_file_starts(fakes, tmp_path: Path):
    config = tmp_path / "multi.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 4\n")
    raw = _plan(fakes, launcher={"kind": "accelerate", "config_file": str(config)})
    runs = {r.id: r for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    assert "train.max_steps=5" in runs["pretrain/alpha"].args  # 640 / (32 x 4 processes)
    assert runs["pretrain/alpha"].budget["images_per_step"] == 128


def test_epochs_budget__keeps_each_config_s_schedule_shares(fakes, tmp_path: Path):
    config = tmp_path / "long.yaml"
    config.write_text("train:\n  epochs: 30\n")  # its config: a 30-epoch schedule, run for 3 epochs here
    raw = _plan(fakes, budget={"kind": "epochs", "epochs": 3})
    raw["pretrain"][0]["config"] = str(config)
    args = {r.id: r.args for r in resolve_runs(plan_from_dict(raw), tmp_path / "out")}
    assert "train.epochs=3" in args["pretrain/alpha"] and "train.schedule_epochs=30" in args["pretrain/alpha"]
    raw["shared"]["train.epochs"] = 5  # a shared key the budget sets: an error, not a silent overwrite
    with pytest.raises(ConfigError, match=r"train.epochs in its shared settings .* is set by the plan's budget"):
        resolve_runs(plan_from_dict(raw), tmp_path / "out")
