"""Toy training runs in a child process, for the tests that need real processes.

    python tests/engine/run_toy.py OUT resume [--kill-at-call K] [--kill-in-save N --phase write|swap]
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/engine/run_toy.py OUT ddp BATCH

`--kill-*` end the process with SIGKILL (no cleanup, as an OOM kill or a pre-emption would).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # as the in-process runs of the tests

from toys import resume_run, toy_config, toy_loader, toy_objective  # noqa: E402

from ssl_vit.engine import Trainer  # noqa: E402
from ssl_vit.engine import checkpoint as ckpt  # noqa: E402


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm_save_kill(save_number: int, phase: str) -> None:
    """SIGKILL inside the `save_number`-th checkpoint save: after its files (write) or between renames (swap)."""
    saves = {"n": 0}
    real_write, real_swap, real_replace = ckpt.write_checkpoint_files, ckpt.swap_in, os.replace

    def write(*args, **kwargs):
        real_write(*args, **kwargs)
        saves["n"] += 1
        if phase == "write" and saves["n"] == save_number:
            kill()  # the temp folder is full but has no trainer_state.json yet

    def swap(*args, **kwargs):
        if saves["n"] != save_number or phase != "swap":
            return real_swap(*args, **kwargs)
        calls = {"n": 0}

        def replace(src, dst):
            calls["n"] += 1
            real_replace(src, dst)
            if calls["n"] == 2:
                kill()  # the old checkpoint moved aside, the new one not yet in place

        ckpt.os.replace = replace
        return real_swap(*args, **kwargs)

    ckpt.write_checkpoint_files, ckpt.swap_in = write, swap


def ddp(out: str, batch: int) -> None:
    cfg = toy_config(out, batch_size=batch, epochs=1, save_every=0)
    cfg.optim = dataclasses.replace(cfg.optim, name="sgd", blr=1.0)
    summary = Trainer(cfg, toy_objective(stochastic=False), toy_loader(n=32, batch_size=batch), toy_loader(n=10, batch_size=4, shuffle=False, augment=False, drop_last=False)).fit()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out, "summary.json").write_text(json.dumps(summary))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("mode", choices=["resume", "ddp"])
    p.add_argument("batch", nargs="?", type=int, default=4)
    p.add_argument("--kill-at-call", type=int)
    p.add_argument("--kill-in-save", type=int)
    p.add_argument("--phase", choices=["write", "swap"], default="write")
    args = p.parse_args()
    if args.mode == "ddp":
        return ddp(args.out, args.batch)
    if args.kill_in_save:
        arm_save_kill(args.kill_in_save, args.phase)
    objective_kill = args.kill_at_call
    if objective_kill:
        import toys

        class Killing(toys.ToyObjective):
            def forward(self, batch):
                if self.calls + 1 >= objective_kill:
                    kill()
                return super().forward(batch)

        toys.ToyObjective = Killing
    resume_run(args.out)


if __name__ == "__main__":
    main()
