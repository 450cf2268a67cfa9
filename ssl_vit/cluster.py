"""What runs inside a cluster job of tools/compare.py (`launcher.kind: submitit`, see ssl_vit/compare/jobs.py).

Kept light on purpose (no torch, no configs): every process of every job unpickles `RunTask` and imports
this module first, and then starts the recipe in a process of its own.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MARKER", "RunTask", "results_exist", "write_marker"]

# Each run folder's record of what it was made from and what became of it (ssl_vit/compare/runner.py).
MARKER = "compare_run.json"


def write_marker(output_dir: str | Path, run_id: str, fingerprint: str, **fields: Any) -> None:
    """Replace `output_dir/compare_run.json` atomically (a reader never sees half a file)."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MARKER
    data = {"run": run_id, "fingerprint": fingerprint, **fields}
    tmp = path.with_name(f"{MARKER}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def results_exist(kind: str, output_dir: str | Path) -> bool:
    """The files a finished run leaves: metrics.json (eval) or backbone.safetensors + .json (pretrain)."""
    folder = Path(output_dir)
    if kind == "checkpoint":
        return True
    if kind == "eval":
        return (folder / "metrics.json").is_file()
    return (folder / "backbone.safetensors").is_file() and (folder / "backbone.json").is_file()


@dataclass
class RunTask:
    """One process of a run's job: set torch.distributed's variables (as torchrun would), run the recipe,
    and (the first process) write the run's marker when it ends. Returns the recipe's exit status."""

    run_id: str
    kind: str  # "pretrain" | "eval"
    output_dir: str
    fingerprint: str
    cmd: list[str]
    log: str
    cpu_only: bool  # no GPUs asked for: the processes form a CPU (gloo) group

    def __call__(self) -> int:
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            # MASTER_ADDR (the first node), a MASTER_PORT drawn from the job id, RANK, WORLD_SIZE, LOCAL_RANK.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.cpu_only and job.num_tasks > 1:
            env["ACCELERATE_USE_CPU"] = "1"
        rank = job.global_rank
        log = Path(self.log) if rank == 0 else Path(self.log).with_suffix(f".rank{rank}.log")
        start = time.time()
        with open(log, "a") as fh:
            fh.write(f"$ {shlex.join(self.cmd)}  # job {job.job_id}, process {rank} of {job.num_tasks}\n")
            fh.flush()
            rc = subprocess.call(self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if rank == 0:
            ok = rc == 0 and results_exist(self.kind, self.output_dir)
            detail = "" if ok else (f"exit status {rc}" if rc else "exited 0 but wrote no results")
            write_marker(self.output_dir, self.run_id, self.fingerprint, status="done" if ok else "failed",
                         command=self.cmd, job_id=str(job.job_id), seconds=time.time() - start, returncode=rc,
                         detail=detail, collected=False)
        return rc
