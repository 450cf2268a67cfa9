"""Run a recipe in this process with faults armed at deterministic points (for the reliability tests).

    RELIABILITY_FAULTS="kill_save=2:torn" python tests/reliability/faulty_launch.py recipes/mae_pretrain.py k=v ...
    RELIABILITY_FAULTS="kill_forward=5" RELIABILITY_RANK=1 accelerate launch --cpu --num_processes 2 \
        tests/reliability/faulty_launch.py recipes/mae_pretrain.py k=v ...

The recipe runs unchanged (`runpy`, as `python recipes/x.py` would); only library functions are wrapped,
so no test hook lives in the engine. Faults (`;`-separated in RELIABILITY_FAULTS):
    kill_forward=N          SIGKILL inside the N-th training forward of the objective (mid-step)
    nan_forward=N[,M...]    the loss of those training forwards becomes NaN
    kill_save=N:torn        in the N-th checkpoint save, model.safetensors of the temp folder is half written
    kill_save=N:swap        in the N-th save, after the old checkpoint-last moved aside, before the new moves in
    kill_save=N:export      in the N-th save, after checkpoint-last is in place, backbone.safetensors half written
    enospc_save=N           in the N-th save, the first weights file stops half way with OSError(ENOSPC)
RELIABILITY_RANK=R applies the faults on that process only (default: every process).
RELIABILITY_PROBE=FILE appends {"step", "rss_mb", "fds", "threads"} of this process after every save (soak).
Counts are per process and per launch: a relaunch starts counting again.
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def kill() -> None:
    """End this process now, as an OOM kill or a pre-emption would: no cleanup, no flush."""
    os.kill(os.getpid(), signal.SIGKILL)


def parse_faults(text: str) -> dict[str, str]:
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, _, value = item.partition("=")
        faults[key.strip()] = value.strip()
    return faults


def write_half(real_save_file: Any, tensors: dict, path: str, metadata: Any) -> None:
    """Write the file fully, then cut it to half its bytes: what a crash mid-write leaves behind."""
    real_save_file(tensors, path, metadata=metadata)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
        f.flush()
        os.fsync(f.fileno())


def arm(faults: dict[str, str]) -> None:
    from ssl_vit.engine import checkpoint as ckpt
    from ssl_vit.engine import run as run_mod
    from ssl_vit.engine import trainer as trainer_mod

    saves = {"n": 0}
    real_save = trainer_mod.Trainer.save

    def counting_save(self: Any) -> Any:
        saves["n"] += 1
        return real_save(self)

    trainer_mod.Trainer.save = counting_save

    if "kill_forward" in faults or "nan_forward" in faults:
        kill_at = int(faults["kill_forward"]) if "kill_forward" in faults else None
        nan_at = {int(x) for x in faults.get("nan_forward", "").split(",") if x}
        real_build = run_mod.build_objective

        def build_objective(*args: Any, **kwargs: Any) -> Any:
            objective = real_build(*args, **kwargs)
            forward, calls = objective.forward, {"n": 0}

            def faulty_forward(batch: Any) -> Any:
                if not objective.training:  # visualize / eval passes do not count
                    return forward(batch)
                calls["n"] += 1
                if calls["n"] == kill_at:
                    kill()
                out = forward(batch)
                if calls["n"] in nan_at:
                    out = dict(out, loss=out["loss"] * float("nan"))
                return out

            objective.forward = faulty_forward  # the instance attribute wins over the class's forward
            return objective

        run_mod.build_objective = build_objective  # what run_pretrain calls

    real_save_file = ckpt.save_file
    kill_save = faults.get("kill_save")
    enospc_at = int(faults["enospc_save"]) if "enospc_save" in faults else None
    kill_n, _, phase = (kill_save or "0:").partition(":")
    kill_n = int(kill_n)

    def save_file(tensors: dict, path: str, metadata: Any = None) -> None:
        name = Path(path).name
        if saves["n"] == enospc_at:
            write_half(lambda t, p, metadata: real_save_file(t, p, metadata=metadata), tensors, path, metadata)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        if saves["n"] == kill_n and (
            (phase == "torn" and name == "model.safetensors") or (phase == "export" and name.startswith("backbone"))
        ):
            write_half(lambda t, p, metadata: real_save_file(t, p, metadata=metadata), tensors, path, metadata)
            kill()
        real_save_file(tensors, path, metadata=metadata)

    ckpt.save_file = save_file

    if phase == "swap":
        real_swap = ckpt.swap_in

        def swap_in(*args: Any, **kwargs: Any) -> Any:
            if saves["n"] != kill_n:
                return real_swap(*args, **kwargs)
            real_replace, calls = os.replace, {"n": 0}

            def replace(src: Any, dst: Any) -> None:
                calls["n"] += 1
                real_replace(src, dst)
                # 1: trainer_state.json into the temp folder; 2: checkpoint-last -> checkpoint-prev.
                if calls["n"] == 2:
                    kill()

            ckpt.os.replace = replace  # the process dies inside this call; nothing else sees the patch
            return real_swap(*args, **kwargs)

        ckpt.swap_in = swap_in


def arm_probe(path: str) -> None:
    import psutil

    from ssl_vit.engine import trainer as trainer_mod

    real_save = trainer_mod.Trainer.save
    me = psutil.Process()

    def probing_save(self: Any) -> Any:
        result = real_save(self)
        record = {
            "step": self.pos.step,
            "rss_mb": me.memory_info().rss / 2**20,
            "fds": me.num_fds(),
            "threads": me.num_threads(),
            "children": len(me.children(recursive=True)),
        }
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return result

    trainer_mod.Trainer.save = probing_save


def main() -> None:
    import logging

    recipe, *argv = sys.argv[1:]
    # As recipes/pretrain.py does: the engine's "resuming from ... at step N" line reaches stderr.
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    faults = parse_faults(os.environ.get("RELIABILITY_FAULTS", ""))
    rank = os.environ.get("RELIABILITY_RANK")
    if faults and (rank is None or rank == os.environ.get("RANK", "0")):
        arm(faults)
    if os.environ.get("RELIABILITY_PROBE"):
        arm_probe(os.environ["RELIABILITY_PROBE"])
    sys.argv = [recipe, *argv]
    sys.path.insert(0, str(Path(recipe).resolve().parent))
    runpy.run_path(recipe, run_name="__main__")


if __name__ == "__main__":
    main()
