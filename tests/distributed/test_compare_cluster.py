"""tools/compare.py on a cluster: each run a job through submitit (its local executor here, 2 processes a job),
independent runs submitted together, dependants waiting, and a rerun of the same command that resubmits
failed jobs and collects the ones that ended (or still run) after an earlier invocation stopped watching.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from ssl_vit.compare import plan_from_dict, resolve_runs, run_comparison
from ssl_vit.config import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
submitit = pytest.importorskip("submitit")

# A stand-in recipe: `key=value` arguments as the recipes take them; every process records itself, the
# first one writes what a pretraining (backbone.*) or an evaluation (metrics.json) leaves.
FAKE = """
import json, os, sys, time
from pathlib import Path
args = dict(a.partition("=")[::2] for a in sys.argv[1:] if "=" in a)
out = Path(args["output_dir"])
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
summed = None
if args.get("fake.dist") == "true":  # the job's processes form one torch.distributed (gloo) group
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    ones = torch.ones(1)
    dist.all_reduce(ones)
    summed = int(ones.item())
    dist.destroy_process_group()
if args.get("fake.wait_for"):  # hold the job until the test says (bounded)
    for _ in range(600):
        if Path(args["fake.wait_for"]).exists():
            break
        time.sleep(0.1)
with open(os.environ["FAKE_CALLS"], "a") as fh:
    fh.write(json.dumps({"out": out.name, "rank": rank, "world": world, "summed": summed,
                         "cpu": os.environ.get("ACCELERATE_USE_CPU")}) + "\\n")
if rank == 0:
    flag = args.get("fake.fail_once")
    if flag and not Path(flag).exists():
        Path(flag).touch()
        print("RuntimeError: fails once, as asked by the plan")
        sys.exit(3)
    out.mkdir(parents=True, exist_ok=True)
    if "checkpoint" in args:
        (out / "metrics.json").write_text(json.dumps({"protocol": "knn", "top1": 50.0, "top5": 90.0, "seeds": [0],
                                                      "per_seed": [{"seed": 0, "top1": 50.0, "top5": 90.0}]}))
    else:
        (out / "backbone.safetensors").write_bytes(b"weights")
        (out / "backbone.json").write_text(json.dumps({"model": {"name": "vit_nano_patch4_32"}, "step": 1}))
"""


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    calls = tmp_path / "calls.jsonl"
    calls.touch()
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    script = tmp_path / "fake_recipe.py"
    script.write_text(textwrap.dedent(FAKE))
    return script


def plan(fake: Path, tmp_path: Path, **pretrain_overrides) -> dict:
    return {
        "name": "cluster",
        "launcher": {"kind": "submitit", "cluster": "local", "tasks_per_node": 2, "poll_s": 0.2, "timeout_min": 5},
        "pretrain": [
            {"name": "a", "recipe": str(fake), "overrides": {"fake.dist": True, **pretrain_overrides.get("a", {})}},
            {"name": "b", "recipe": str(fake), "overrides": {"fake.fail_once": str(tmp_path / "b_failed"),
                                                            **pretrain_overrides.get("b", {})}},
            {"name": "c", "recipe": str(fake), "overrides": {"fake.teacher": "${a}"}},  # needs a's run
        ],
        "evaluations": [{"protocol": "knn", "recipe": str(fake)}],
    }


def calls(fake: Path) -> list[dict]:
    return [json.loads(line) for line in (fake.parent / "calls.jsonl").read_text().splitlines()]


def positions(lines: list[str], prefix: str) -> dict[str, int]:
    """Run id -> index of its first echo line starting with `prefix` (e.g. "[submit]")."""
    found = {}
    for i, line in enumerate(lines):
        if line.startswith(prefix):
            found.setdefault(line.split()[1].rstrip(":"), i)
    return found


def test_compare_on_a_cluster__independent_jobs_together_dependants_wait_and_a_rerun_resubmits_failures(fake, tmp_path):
    out, lines = tmp_path / "out", []
    code, _ = run_comparison(plan_from_dict(plan(fake, tmp_path)), out, echo=lines.append)
    assert code == 1, "\n".join(lines)
    submitted, done = positions(lines, "[submit]"), positions(lines, "[done]")
    failed, blocked = positions(lines, "[FAILED]"), positions(lines, "[blocked]")
    # a and b do not depend on each other: both go out before either ends; c waits for a; eval/b is blocked.
    assert max(submitted["pretrain/a"], submitted["pretrain/b"]) < min(done["pretrain/a"], failed["pretrain/b"])
    assert submitted["pretrain/c"] > done["pretrain/a"] and submitted["eval/a/knn"] > done["pretrain/a"]
    assert set(done) == {"pretrain/a", "pretrain/c", "eval/a/knn", "eval/c/knn"} and set(blocked) == {"eval/b/knn"}
    assert "exit status 3" in lines[failed["pretrain/b"]]
    # Every job ran 2 processes; a's formed one gloo group of 2 on the CPU (ACCELERATE_USE_CPU for the recipes).
    a = [c for c in calls(fake) if c["out"] == "a"]
    assert sorted(c["rank"] for c in a) == [0, 1] and {(c["world"], c["summed"], c["cpu"]) for c in a} == {(2, 2, "1")}
    assert len(calls(fake)) == 2 * 5  # a, b (failed), c, eval/a, eval/c

    lines.clear()
    code, results = run_comparison(plan_from_dict(plan(fake, tmp_path)), out, echo=lines.append)
    assert code == 0, "\n".join(lines)
    assert set(positions(lines, "[skip]")) == {"pretrain/a", "pretrain/c", "eval/a/knn", "eval/c/knn"}
    assert set(positions(lines, "[resubmit]")) == {"pretrain/b"} and set(positions(lines, "[submit]")) == {"eval/b/knn"}
    assert len(calls(fake)) == 2 * 7
    assert (out / "results.md").is_file()


def test_compare_on_a_cluster__a_rerun_collects_jobs_that_ended_or_still_run_after_the_tool_stopped(fake, tmp_path):
    from ssl_vit.compare import jobs

    release = tmp_path / "release"
    spec = plan(fake, tmp_path, b={"fake.wait_for": str(release)})
    spec["pretrain"] = spec["pretrain"][:2]
    spec["pretrain"][1]["overrides"].pop("fake.fail_once")
    p = plan_from_dict(spec)
    out = tmp_path / "out"
    runs = {r.id: r for r in resolve_runs(p, out.resolve())}
    executor = jobs.make_executor(p.launcher, out.resolve() / "logs" / "jobs")
    # An earlier invocation submitted a's and b's jobs and was stopped: a's ended since, b's still runs.
    lines: list[str] = []
    submitted = {run_id: jobs._submit(runs[run_id], "new", executor, p.launcher, out.resolve() / "logs", "python",
                                      lines.append) for run_id in ("pretrain/a", "pretrain/b")}
    assert submitted["pretrain/a"].job.results() == [0, 0]  # a's job ends (and writes its marker) meanwhile
    del submitted  # what the stopped invocation knew of its jobs is gone; only their markers remain

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("[wait]"):
            release.touch()  # b's job may end now that the tool has found it running

    lines.clear()
    code, _ = run_comparison(p, out, echo=echo)
    assert code == 0, "\n".join(lines)
    assert set(positions(lines, "[collect]")) == {"pretrain/a"}
    assert set(positions(lines, "[wait]")) == {"pretrain/b"} and "pretrain/b" in positions(lines, "[done]")
    assert not positions(lines, "[submit]").keys() & {"pretrain/a", "pretrain/b"}, "nothing submitted twice"
    assert sorted(c["out"] for c in calls(fake) if c["rank"] == 0) == ["a", "b", "knn", "knn"]


def test_launcher_keys__of_another_kind_are_plan_errors():
    base = {"pretrain": [{"name": "random", "checkpoint": "random"}], "evaluations": [{"protocol": "knn"}]}
    with pytest.raises(ConfigError, match="launcher.nodes need"):
        plan_from_dict({**base, "launcher": {"kind": "python", "nodes": 2}})
    with pytest.raises(ConfigError, match="timeout_min"):
        plan_from_dict({**base, "launcher": {"kind": "submitit", "timeout_s": 10}})
    with pytest.raises(ConfigError, match="one node"):
        plan_from_dict({**base, "launcher": {"kind": "submitit", "cluster": "local", "nodes": 2}})
    launcher = plan_from_dict({**base, "launcher": {"kind": "submitit", "nodes": 2, "gpus_per_node": 4}}).launcher
    assert launcher.processes == 8
