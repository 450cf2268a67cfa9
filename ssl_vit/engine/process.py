"""This process's place in the run: the one way the suite reads Accelerate's process state."""

from __future__ import annotations

import logging

from typing import Any

from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import parse_flag_from_env

__all__ = ["fresh_accelerator", "process_state", "say"]

log = logging.getLogger("ssl_vit.engine")


def process_state() -> PartialState:
    """Accelerate's process state, read as `Accelerator` reads it.

    `accelerate launch --cpu` / torchrun with ACCELERATE_USE_CPU=1 mean one CPU process group; a plain
    `PartialState()` made first would settle on "not distributed" for every later Accelerator.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def say(message: str) -> None:
    """One line in the run's log and on stdout, from the main process only (as the trainer's own lines)."""
    log.info(message)
    if process_state().is_main_process:
        print(f"[ssl_vit] {message}", flush=True)


def fresh_accelerator(**kwargs: Any) -> Accelerator:
    """`Accelerator(**kwargs)` with a state of its own.

    Accelerate keeps one shared state per process; a new run in the same process (tests, a teacher
    trained before its student, an evaluation after training) gets a fresh one, so precision and
    accumulation follow its own config. The process group (PartialState) is kept.
    """
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(**kwargs)
