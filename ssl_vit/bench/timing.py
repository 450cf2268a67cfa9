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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ssl_vit.bench.machine import sync

__all__ = ["Case", "measure_memory", "median_ratio", "run_rounds", "tracked_bytes"]


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
        track: the modules and optimizer whose existing tensors (weights, gradients, optimizer state)
            count towards the case's memory on CPU.
        linear: the linear-layer path its modules compute with: "plain" (PyTorch's `F.linear`), "onednn"
            (every linear layer through `ssl_vit.ops.linear`'s oneDNN path) or "mixed"; ratios are
            like-for-like when both cases have the same path.
        variant: "" for the case as it runs by default; "plain" / "onednn" for a twin whose linear
            path was forced (`supervised/ours-plain`, `mae/hf+onednn`).
        loss: the loss of a fixed batch from the case's current weights (no backward): tests and the
            tool check that ours and its reference compute the same loss before timing them.
    """

    name: str
    group: str
    role: str
    step: Callable[[], Any]
    images: int
    flops_fn: Callable[[], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    track: tuple[Any, ...] = ()
    linear: str = "plain"
    variant: str = ""
    loss: Callable[[], Any] | None = None


def run_rounds(
    cases: list[Case], device: torch.device, *, rounds: int, steps: int, warmup: int = 1
) -> dict[str, list[float]]:
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


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages: every op's outputs join, storages leave when freed.

    Shared storages (views, in-place results) count once; frees are seen through weak references to
    the storages, so nothing is kept alive by the measurement itself.
    """

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, tuple[Any, int]] = {}  # storage id -> (weak ref, bytes)
        for t in existing:
            self._add(t)
        self.peak = self._current()

    def _add(self, t: torch.Tensor) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = t.untyped_storage()
        if storage.nbytes() and storage._cdata not in self.live:
            self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())

    def _current(self) -> int:
        gone = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in gone:
            del self.live[key]
        return sum(nbytes for _, nbytes in self.live.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t)
        self.peak = max(self.peak, self._current())
        return out


def _tracked_tensors(track: tuple[Any, ...]) -> list[torch.Tensor]:
    """Weights, buffers and gradients of the modules, and the optimizers' state tensors."""
    found: list[torch.Tensor] = []
    for obj in track:
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                found += [p] + ([p.grad] if p.grad is not None else [])
            found += list(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            found += [v for state in obj.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return found


def tracked_bytes(track: tuple[Any, ...]) -> int:
    """Bytes of the tensors `track` holds now (weights, buffers, gradients, optimizer state), each storage once."""
    seen: dict[int, int] = {}
    for t in _tracked_tensors(track):
        storage = t.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def _peak_tensor_bytes(step: Callable[[], Any], steps: int, track: tuple[Any, ...]) -> int:
    """Peak bytes of live tensors while the steps run, `track`'s existing tensors included."""
    with _LiveTensorBytes(_tracked_tensors(track)) as tracker:
        for _ in range(steps):
            step()
    return tracker.peak


def measure_memory(
    step: Callable[[], Any], device: torch.device, steps: int = 1, track: tuple[Any, ...] = ()
) -> dict[str, Any]:
    """Peak memory while running `step()` `steps` times, in MiB.

    GPU: `torch.cuda.max_memory_allocated` during the steps less what was allocated before them (other
    cases' models live on the device too), plus `track`'s tensors ("cuda_allocated"; the whole
    process's peak is `process_peak_mib`). CPU: the peak of live tensor bytes
    (weights, gradients and optimizer state of `track`, activations, temporaries; "cpu_tensors"),
    plus the process's resident set size sampled every millisecond by a thread (`rss_peak_mib`: the
    whole process, every model built so far included).
    Returns {"peak_mib", "kind", ...}.
    """
    mib = 2.0**20
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        own = peak - before + tracked_bytes(track)
        return {"peak_mib": own / mib, "kind": "cuda_allocated", "process_peak_mib": peak / mib}
    peak = _rss()
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
    rss_peak = max(peak, _rss()) / mib
    return {"peak_mib": _peak_tensor_bytes(step, steps, track) / mib, "kind": "cpu_tensors", "rss_peak_mib": rss_peak}
