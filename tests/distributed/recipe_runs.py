"""Several recipe runs, one after another, in one launch (one process group): the distributed tests'
runs share the cost of starting processes (imports take longer than these tiny runs).

    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/distributed/recipe_runs.py PLAN.json

PLAN.json is a list of runs: {"recipe": "mae_pretrain.py", "args": ["k=v", ...], "env": {...}, "kill_forward": N}.
`env` is set for that run only (ACCELERATE_USE_FSDP=true/false turns FSDP on or off: the engine reads it at
each run's Accelerator). `kill_forward=N` ends every process with SIGKILL inside that run's N-th training
forward (mid-step, no cleanup, as an OOM kill or a pre-emption would), which ends the launch.

Only here, between runs: Accelerate's end_training() destroys the process group, which a second run in
the same process would need again, so that one call is put off to the end of the launch.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)  # as OMP_NUM_THREADS=1: runs compared bit for bit use one thread


def arm_kill(real_build, kill_forward: int | None) -> None:
    """Wrap the objectives the recipe builds so that the `kill_forward`-th training forward SIGKILLs this process."""
    from ssl_vit.engine import run as run_mod

    if kill_forward is None:
        run_mod.build_objective = real_build
        return

    def build_objective(*args, **kwargs):
        objective = real_build(*args, **kwargs)
        forward, calls = objective.forward, {"n": 0}

        def killing_forward(batch):
            if objective.training:
                calls["n"] += 1
                if calls["n"] == kill_forward:
                    os.kill(os.getpid(), signal.SIGKILL)
            return forward(batch)

        objective.forward = killing_forward
        return objective

    run_mod.build_objective = build_objective


def main() -> None:
    from accelerate.state import PartialState

    from ssl_vit.engine import run as run_mod

    real_build = run_mod.build_objective
    plan = json.loads(Path(sys.argv[1]).read_text())
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    for run in plan:
        saved = {k: os.environ.get(k) for k in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        arm_kill(real_build, run.get("kill_forward"))
        sys.argv = [str(REPO / "recipes" / run["recipe"]), *run["args"]]
        runpy.run_path(sys.argv[0], run_name="__main__")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    destroy(PartialState())


if __name__ == "__main__":
    main()
