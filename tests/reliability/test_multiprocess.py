"""Two CPU processes (torchrun + gloo, as `accelerate launch` runs them) with one killed: the run stops
(no process left waiting in a collective past the timeout) and a relaunch resumes to the same weights.

`accelerate launch --cpu --num_processes 2` starts ONE process on a machine without an accelerate config
(it needs `accelerate config` set to multi-CPU), so the tests launch with torchrun and ACCELERATE_USE_CPU=1.
"""

from __future__ import annotations

import json
import signal

import pytest
from reliability_common import (
    TINY_MAE,
    TINY_STEPS,
    assert_same_tensors,
    backbone_weights,
    checkpoint_step,
    launch,
    launch_sequence,
    leftovers,
    resumed_at,
)

pytestmark = pytest.mark.slow
TORCHRUN = ["torchrun", "--standalone", "--nproc_per_node", "2"]
# A hang would be a rank waiting for a dead peer (gloo's default timeout is 30 min): fail long before.
HANG_TIMEOUT = 150


def tiny_args(out) -> list[str]:
    # Batch 4 per process: the same 8 images per step as the one-process runs, 12 steps.
    return [*TINY_MAE, "train.batch_size=4", f"output_dir={out}"]


def two_processes(out, faults: str = "", rank: int | None = None):
    env = {"ACCELERATE_USE_CPU": "1"}
    if rank is not None:
        env["RELIABILITY_RANK"] = str(rank)
    return launch("mae_pretrain.py", *tiny_args(out), faults=faults, env=env, launcher=TORCHRUN, timeout=HANG_TIMEOUT)


def test_two_processes__a_killed_rank_stops_the_run_and_relaunches_resume_to_equal_weights(tmp_path):
    # One launch (imports paid once) runs the uninterrupted two-process run, then, in the same process
    # group, the run in which rank 1 dies mid-step 5 (SIGKILL); rank 0 waits for its gradients in vain until
    # torchrun stops it.
    out = tmp_path / "run"
    proc = launch_sequence(
        [{"recipe": "mae_pretrain.py", "args": tiny_args(tmp_path / "reference")},
         {"recipe": "mae_pretrain.py", "args": tiny_args(out), "faults": "kill_forward=5"}],
        env={"ACCELERATE_USE_CPU": "1", "RELIABILITY_RANK": "1"}, launcher=TORCHRUN, timeout=HANG_TIMEOUT,
    )
    assert proc.returncode != 0
    assert f"exitcode  : {-signal.SIGKILL}" in proc.stderr, proc.stderr[-3000:]
    # The uninterrupted run ended normally before the killed run started (that one wrote step 3, below).
    assert checkpoint_step(tmp_path / "reference") == TINY_STEPS
    # Truly one process group of two (not two single-process runs racing on one output_dir).
    state = json.loads((tmp_path / "reference" / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["images_seen"] == 8 * TINY_STEPS
    reference = backbone_weights(tmp_path / "reference")
    assert checkpoint_step(out) == 3

    # Relaunched; now rank 0 (the one that writes) dies mid-save of step 9 while rank 1 waits at the barrier.
    proc = two_processes(out, "kill_save=2:torn", rank=0)
    assert proc.returncode != 0
    assert resumed_at(proc.stderr) == 3
    assert checkpoint_step(out) == 6 and (out / "checkpoint-last.tmp").exists()

    # The last relaunch ends with the uninterrupted two-process run's weights.
    proc = two_processes(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) == 6
    assert_same_tensors(backbone_weights(out), reference)
    assert leftovers(out) == []
