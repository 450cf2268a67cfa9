"""Real processes: SIGKILL mid-run or mid-save then resume; 2 CPU processes (DDP) vs 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toys import assert_equal_weights, resume_run, toy_config, weights

pytestmark = pytest.mark.slow
RUN_TOY = Path(__file__).parent / "run_toy.py"
REPO = Path(__file__).resolve().parents[2]


def child(*args: str, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(RUN_TOY), *args]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "kill_args",
    [
        ["--kill-at-call", "11"],  # mid-step, after the checkpoint of step 4
        ["--kill-in-save", "3", "--phase", "write"],  # checkpoint files written, not yet marked complete
        ["--kill-in-save", "3", "--phase", "swap"],  # old checkpoint moved aside, new one not in place
    ],
)
def test_sigkill__then_resume_auto_ends_with_weights_equal_to_an_uninterrupted_run(reference, tmp_path, kill_args):
    ref_out, _ = reference
    proc = child(str(tmp_path), "resume", *kill_args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint"))
    assert leftovers  # something was written before the kill
    resume_run(tmp_path)
    assert_equal_weights(weights(tmp_path), weights(ref_out))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-last"]


def test_two_cpu_processes__same_weights_as_one_process_with_the_same_global_batch(tmp_path):
    from ssl_vit.engine import Trainer

    proc = child(
        str(tmp_path / "two"), "ddp", "2",
        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
        launcher=["torchrun", "--standalone", "--nproc_per_node", "2"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import dataclasses

    from toys import toy_loader, toy_objective

    cfg = toy_config(tmp_path / "one", batch_size=4, epochs=1, save_every=0)
    cfg.optim = dataclasses.replace(cfg.optim, name="sgd", blr=1.0)
    one = Trainer(cfg, toy_objective(stochastic=False), toy_loader(n=32, batch_size=4), toy_loader(n=10, batch_size=4, shuffle=False, augment=False, drop_last=False)).fit()
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["steps"] == one["steps"] == 8 and two["images_seen"] == one["images_seen"] == 32
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())
    # Evaluation over 2 processes counts each of the 10 eval images once (no padding duplicates).
    assert two["eval_n"] == one["eval_n"] == 10
    assert two["top1"] == pytest.approx(one["top1"]) and two["top5"] == pytest.approx(one["top5"])
    assert json.loads((tmp_path / "two" / "backbone.json").read_text())["config"]["train"]["batch_size"] == 2
