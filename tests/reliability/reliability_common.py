"""Shared by the reliability tests: tiny recipe settings, launching recipes with faults, reading outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
LAUNCH = Path(__file__).with_name("faulty_launch.py")
SEQUENCE = Path(__file__).with_name("sequence_launch.py")

# The default MAE recipe shrunk to seconds: 32 synthetic 16x16 images, batch 8 (4 steps an epoch),
# 3 epochs = 12 steps, a 1-block 32-wide ViT and a 1-block decoder, a checkpoint every 3 steps.
# data.num_workers stays the recipe's 1: the real loader worker process takes part.
TINY_MAE = [
    "data.synthetic_train_size=32",
    "data.synthetic_eval_size=8",
    "data.image_size=16",
    "model.args={depth: 1, embed_dim: 32, num_heads: 2}",
    "mae.decoder_dim=16",
    "mae.decoder_depth=1",
    "mae.decoder_heads=2",
    "train.batch_size=8",
    "train.epochs=3",
    "train.save_every=3",
    "train.log_every=3",
    "train.vis_every=0",
]
TINY_STEPS = 12

# One thread per process: the 2 CI cores are shared, and runs compared bit for bit use the same count.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(
    recipe: str,
    *args: str,
    faults: str = "",
    env: dict | None = None,
    launcher: list[str] | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess:
    """Run recipes/<recipe> in a child process through faulty_launch.py (faults armed when given)."""
    cmd = (launcher or [sys.executable]) + [str(LAUNCH), str(RECIPES / recipe), *args]
    full_env = {**os.environ, **CHILD_ENV, "RELIABILITY_FAULTS": faults, **(env or {})}
    return _communicate(cmd, full_env, timeout)


def _communicate(cmd: list[str], full_env: dict, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # Its own process group: on a timeout (a hang) every process it started is stopped, not only the launcher.
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s (a hang?):\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def launch_sequence(
    runs: list[dict],
    env: dict | None = None,
    timeout: float = 300,
    cwd: Path = REPO,
    launcher: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Several runs one after another in ONE child process (sequence_launch.py): the cost of starting a
    process (imports: seconds) paid once. Each run: {"recipe": name in recipes/ or a script path, "args": [...],
    "env": {...} for that run only, "faults": faulty_launch.py's faults, last run only}. stdout/stderr are those
    of all the runs, in order."""
    import tempfile

    plan = [{**run, "recipe": str(RECIPES / run["recipe"]) if "/" not in run["recipe"] else run["recipe"]} for run in runs]
    fd, path = tempfile.mkstemp(suffix=".json", prefix="sequence_")
    with os.fdopen(fd, "w") as f:
        json.dump(plan, f)
    try:
        cmd = (launcher or [sys.executable]) + [str(SEQUENCE), path]
        full_env = {**os.environ, **CHILD_ENV, "RELIABILITY_FAULTS": "", **(env or {})}
        return _communicate(cmd, full_env, timeout, cwd)
    finally:
        os.unlink(path)


class Background:
    """fn(*args, **kwargs) in a thread, started at once: a launch that does not depend on the ones this process
    makes meanwhile uses the second CPU core while they wait for theirs. result() waits, then returns what fn
    returned or raises what it raised (assertions made in fn fail the test that asks for the result)."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._result: Any = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                self._result = fn(*args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - re-raised in result()
                self._error = error

        self._thread = threading.Thread(target=target, name=f"background {getattr(fn, '__name__', fn)}", daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def wait(self) -> None:
        """Wait for the end without raising (a fixture's teardown: no launch outlives its test files)."""
        self._thread.join()


def load_recipe(name: str) -> ModuleType:
    """recipes/<name>.py as a module (recipes/ is not a package), to call its main(argv) in this process."""
    spec = importlib.util.spec_from_file_location(f"reliability_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backbone_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "backbone.safetensors"))


def checkpoint_state(out: Path, folder: str = "checkpoint-last") -> dict[str, torch.Tensor]:
    """Everything the objective holds (backbone, heads, teacher, centre, codebook...) in a run's checkpoint."""
    from safetensors.torch import load_file

    return load_file(str(Path(out) / folder / "model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ: {differ[:5]}"


def checkpoint_step(out: Path, folder: str = "checkpoint-last") -> int:
    return json.loads((Path(out) / folder / "trainer_state.json").read_text())["step"]


def resumed_at(stderr: str) -> int | None:
    """The step the engine said it resumed from ("resuming from ... at step N"), or None."""
    found = re.search(r"resuming from \S+ at step (\d+)", stderr)
    return int(found.group(1)) if found else None


def leftovers(out: Path) -> list[str]:
    """Names in output_dir that only an interrupted save leaves behind."""
    return sorted(p.name for p in Path(out).iterdir() if p.name.endswith(".tmp") or p.name == "checkpoint-prev")


def one_paragraph(message: str) -> bool:
    """An error message a user reads at once: text, no blank line, no traceback inside."""
    text = message.strip()
    return bool(text) and "\n\n" not in text and "Traceback" not in text


# ---------------------------------------------------------------------------------------------------
# Small datasets on disk, in the layouts users bring


def png_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, n: int = 24, classes: int = 3, size: int = 16, corrupt: int | None = None) -> Path:
    """root/<class>/<i>.png, n images of random colours; `corrupt`: that file (in sorted order) is garbage."""
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(exist_ok=True)
        paths.append(folder / f"{i:04d}.png")
    for i, path in enumerate(sorted(paths)):
        data = png_bytes(tuple(int(c) for c in rng.integers(0, 256, 3)), size)
        path.write_bytes(data[: len(data) // 3] if i == corrupt else data)
    return root


def parquet(path: Path, columns: dict) -> Path:
    """A parquet file of these columns (datasets infers the features)."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    return path
