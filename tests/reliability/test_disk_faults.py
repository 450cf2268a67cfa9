"""Disk full in the middle of a checkpoint, and an output_dir that cannot be written, through the MAE recipe.

Disk full is simulated inside the process: the safetensors writer writes half of the file, then raises
OSError(ENOSPC), as a full disk does (no root, no tmpfs needed). The tests run as root, where chmod does
not stop writes, so "unwritable" is a path under a regular file.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
from reliability_common import (
    TINY_MAE,
    TINY_STEPS,
    assert_same_tensors,
    backbone_weights,
    checkpoint_step,
    leftovers,
    load_recipe,
    one_paragraph,
)
from safetensors.torch import load_file

from ssl_vit.config import ConfigError
from ssl_vit.engine import checkpoint as ckpt
from ssl_vit.engine.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def mae():
    return load_recipe("mae_pretrain")


def fill_disk_at(monkeypatch, file_name: str, nth: int) -> None:
    """The `nth` write of `file_name` stops half way with ENOSPC (once per save on the main process)."""
    real, seen = ckpt.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        if os.path.basename(path) == file_name:
            seen["n"] += 1
            if seen["n"] == nth:
                real(tensors, path, metadata=metadata)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file)


@pytest.mark.slow
@pytest.mark.parametrize(
    "file_name, last_step",
    [
        ("model.safetensors", 3),  # the full state of step 6: checkpoint-last stays the step-3 one
        ("backbone.safetensors.tmp", 6),  # the export after checkpoint-last of step 6 was in place
    ],
)
def test_disk_full_in_the_2nd_save__clear_error_previous_checkpoint_intact_then_resumes_equal(
    mae, mae_reference, monkeypatch, tmp_path, file_name, last_step
):
    out = tmp_path / "run"
    fill_disk_at(monkeypatch, file_name, nth=2)
    with pytest.raises(CheckpointError) as caught:
        mae.main([*TINY_MAE, f"output_dir={out}"])
    message = str(caught.value)
    assert one_paragraph(message), message
    assert "step 6" in message and "No space left on device" in message
    assert "intact" in message and "train.resume=auto" in message

    # What a user can still use: a complete checkpoint-last and a readable backbone of step 3.
    assert checkpoint_step(out) == last_step
    assert load_file(str(out / "checkpoint-last" / "model.safetensors"))
    assert json.loads((out / "backbone.json").read_text())["step"] == 3
    assert set(backbone_weights(out)) == set(mae_reference)

    # Space freed: the relaunch resumes from the intact checkpoint and ends as if nothing happened.
    monkeypatch.undo()
    summary = mae.main([*TINY_MAE, f"output_dir={out}"])
    assert summary["steps"] == TINY_STEPS
    assert_same_tensors(backbone_weights(out), mae_reference)
    assert leftovers(out) == []


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_output_dir__error_names_it_before_any_work(mae, tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run" if where == "under_a_file" else blocker
    with pytest.raises(ConfigError) as caught:
        mae.main([*TINY_MAE, f"output_dir={out}"])
    message = str(caught.value)
    assert one_paragraph(message) and f"output_dir={out}" in message and "writable folder" in message
    assert blocker.read_text() == "not a folder"
