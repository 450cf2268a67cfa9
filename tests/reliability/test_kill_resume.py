"""SIGKILL of a real `python recipes/mae_pretrain.py` at several points, then relaunch with train.resume=auto.

Every relaunch must continue from the last complete checkpoint and end with a backbone.safetensors equal
(torch.equal) to an uninterrupted run's; a half-written checkpoint is never picked up.
"""

from __future__ import annotations

import signal

import pytest
from reliability_common import (
    TINY_MAE,
    Background,
    TINY_STEPS,
    assert_same_tensors,
    backbone_weights,
    checkpoint_step,
    launch,
    leftovers,
    resumed_at,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
KILLED = -signal.SIGKILL


def run(out, faults: str = ""):
    return launch("mae_pretrain.py", *TINY_MAE, f"output_dir={out}", faults=faults)


@pytest.fixture(scope="module")
def half_written_checkpoint_run(mae_reference, tmp_path_factory):
    """The half-written-checkpoint test's launches (one after another, in a thread): they need nothing from
    the other test's, so they run alongside them, each launch on one core (the children use one thread)."""
    chain = Background(sigkill_while_checkpoint_files_are_half_written, mae_reference, tmp_path_factory.mktemp("torn"))
    yield chain
    chain.wait()


def test_sigkill_mid_step_then_mid_save_then_mid_export__each_relaunch_resumes_and_ends_equal(
    mae_reference, tmp_path, half_written_checkpoint_run  # started now: it runs alongside this test's launches
):
    # 1. Killed in step 2, before any checkpoint: the relaunch starts afresh.
    proc = run(tmp_path, "kill_forward=2")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert not (tmp_path / "checkpoint-last").exists() and not (tmp_path / "backbone.safetensors").exists()

    # 2. Killed in the 2nd save (step 6) between the renames: checkpoint-last moved aside, the new one
    #    not in place yet. Only checkpoint-prev (step 3) is a finished checkpoint of that moment.
    proc = run(tmp_path, "kill_save=2:swap")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) is None  # nothing to resume from after step 1
    assert not (tmp_path / "checkpoint-last").exists()
    assert checkpoint_step(tmp_path, "checkpoint-prev") == 3

    # 3. The relaunch puts the complete checkpoint back and resumes at step 3; killed again in its
    #    2nd save (step 9) while exporting backbone.safetensors, after checkpoint-last (step 9) was in place.
    proc = run(tmp_path, "kill_save=2:export")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) == 3
    assert checkpoint_step(tmp_path) == 9
    # The half-written export stays a temp file; the visible backbone is the previous complete one.
    assert (tmp_path / "backbone.safetensors.tmp").is_file()
    assert set(load_file(str(tmp_path / "backbone.safetensors"))) == set(mae_reference)

    # 4. The last relaunch finishes from step 9 with the uninterrupted run's weights, and tidies up.
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) == 9
    assert_same_tensors(backbone_weights(tmp_path), mae_reference)
    assert checkpoint_step(tmp_path) == TINY_STEPS
    assert leftovers(tmp_path) == []


def test_sigkill_while_checkpoint_files_are_half_written__torn_folder_never_read(half_written_checkpoint_run):
    half_written_checkpoint_run.result()  # its launches and assertions, below


def sigkill_while_checkpoint_files_are_half_written(mae_reference, tmp_path):
    # Killed in the 2nd save (step 6) with model.safetensors of the temp folder cut in half.
    proc = run(tmp_path, "kill_save=2:torn")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    torn = tmp_path / "checkpoint-last.tmp" / "model.safetensors"
    with pytest.raises(SafetensorError):
        load_file(str(torn))
    assert checkpoint_step(tmp_path) == 3

    # The relaunch resumes from the complete step-3 checkpoint, not the torn one; killed again mid-step 8
    # (5th forward of this session), after its step-6 checkpoint.
    proc = run(tmp_path, "kill_forward=5")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) == 3
    assert checkpoint_step(tmp_path) == 6 and leftovers(tmp_path) == []

    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) == 6
    assert_same_tensors(backbone_weights(tmp_path), mae_reference)
    assert leftovers(tmp_path) == []
