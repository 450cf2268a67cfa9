"""Timing on a shared, noisy machine: cases run in alternating rounds, ratios are medians of per-round ratios.

A neighbour's job that slows one round slows every case in that round about equally, so the ratio of
two cases measured in the same round is far steadier than the ratio of their separate averages.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ssl_vit.bench.machine import sync

__all__ = ["Case", "measure_memory", "median_ratio", "run_rounds"]


@dataclass
class Case:
    """One workload to time: `step()` runs one training (or inference) step on a fixed batch.

    Args:
        name: unique row name, e.g. "mae/ours".
        group: what the case belongs to ("mae", "supervised", ...), cases of a group are compared.
        role: "ours" or "reference".
        step: one step; it must not return before its work is queued (the timer syncs the device).
        images: images per step (the batch size).
        flops_fn: runs one step for FLOP counting (default: `step`).
        info: anything worth writing to the JSON (model name, config, reference class, ...).
    """

    name: str
    group: str
    role: str
    step: Callable[[], Any]
    images: int
    flops_fn: Callable[[], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def run_rounds(cases: list[Case], device: torch.device, *, rounds: int, steps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per step of every case in each round: {name: [round 1, round 2, ...]}.

    Each case first runs `warmup` untimed steps (allocator, kernel selection, lazy optimizer state);
    then every round runs each case for `steps` steps, the case order alternating (forward in even
    rounds, backward in odd ones) so that no case always runs right after the same neighbour.
    """
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be >= 1, got rounds={rounds}, steps={steps}.")
    for case in cases:
        for _ in range(warmup):
            case.step()
    sync(device)
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    for r in range(rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                case.step()
            sync(device)
            times[case.name].append((time.perf_counter() - start) / steps)
    return times


def median_ratio(ours: list[float], reference: list[float]) -> float:
    """Median over rounds of reference time / our time: > 1 means ours is faster (more images/s)."""
    if len(ours) != len(reference) or not ours:
        raise ValueError("median_ratio needs the same, non-zero number of rounds for both cases.")
    return statistics.median(r / o for o, r in zip(ours, reference))


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure_memory(step: Callable[[], Any], device: torch.device, steps: int = 1) -> dict[str, float]:
    """Peak memory while running `step()` `steps` times, in MiB.

    GPU: `torch.cuda.max_memory_allocated` (tensors only). CPU: the process's resident set size,
    sampled every millisecond by a thread (heavy kernels release the GIL, so it keeps sampling).
    Returns {"peak_mib": absolute peak, "step_mib": peak minus what was in use before the steps
    (activations, gradients, temporaries), "kind": "cuda_allocated" | "cpu_rss"}.
    """
    mib = 2.0**20
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": peak / mib, "step_mib": (peak - before) / mib, "kind": "cuda_allocated"}
    before = _rss()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(steps):
            step()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _rss())
    return {"peak_mib": peak / mib, "step_mib": (peak - before) / mib, "kind": "cpu_rss"}
