"""Shared by tests/distributed/test_fsdp.py and test_multinode.py: tiny recipe settings, launching real
processes on the CPU, reading what the runs wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RECIPE_RUNS = Path(__file__).with_name("recipe_runs.py")
FSDP_CONFIG = REPO / "recipes" / "configs" / "accelerate" / "fsdp_vit_large.yaml"

# One thread per process (the 2 CI cores are shared; runs compared bit for bit use the same count);
# ACCELERATE_USE_CPU=1: the processes form a CPU (gloo) process group.
CPU_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# 32 synthetic 16x16 images, 4 per process per step (8 a step over 2 processes): 4 steps an epoch, 2
# epochs = 8 steps, a checkpoint every 3; a 1-block 32-wide ViT; no loader worker processes.
TINY = [
    "data.synthetic_train_size=32",
    "data.synthetic_eval_size=8",
    "data.image_size=16",
    "data.num_workers=0",
    "model.args={depth: 1, embed_dim: 32, num_heads: 2}",
    "train.batch_size=4",
    "train.epochs=2",
    "train.save_every=3",
    "train.log_every=4",
    "train.vis_every=0",
]
TINY_MAE = [*TINY, "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"]
STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a launcher on the CPU (its own process group: a hang is ended with every process it started)."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **CPU_ENV, **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s (a hang?):\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def backbone(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "backbone.safetensors"))


def trainer_state(out: Path) -> dict:
    return json.loads((Path(out) / "checkpoint-last" / "trainer_state.json").read_text())


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"weights differ (max |diff| per tensor): {dict(list(differ.items())[:5])}"
