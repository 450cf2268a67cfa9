"""What machine a benchmark ran on, and the fastest matrix multiply it can do (the roofline we compare to)."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from typing import Any

import torch

__all__ = ["machine_info", "machine_label", "matmul_peak", "sync"]


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, library versions, GPU name (on CUDA), and the load when measured."""
    from ssl_vit.ops.linear import onednn_linear_enabled

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "device": device.type,
        "onednn_linear": onednn_linear_enabled(),
        # A shared machine's load skews timings; the ratios (same process, interleaved) much less so.
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def machine_label(info: dict[str, Any]) -> str:
    """One line naming the machine, e.g. 'AMD EPYC, 2 cores, torch 2.14.1 (CPU)'."""
    where = info.get("gpu") or "CPU"
    return f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} threads, torch {info['torch']} ({where})"


def _gemm_rate(fn: Any, a: torch.Tensor, device: torch.device, seconds: float) -> float:
    """Best FLOP/s of `fn()` (an n x n x n matrix product) over rounds filling `seconds`."""
    n = a.shape[0]
    flops = 2.0 * n**3
    for _ in range(2):  # warm-up: library init, caches, GPU clocks
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    per_round = max(1, int(0.1 / one))  # rounds of ~0.1 s: short enough to catch a quiet moment
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(per_round):
            fn()
        sync(device)
        best = max(best, flops * per_round / (time.perf_counter() - start))
        if time.perf_counter() >= deadline:
            return best


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None, seconds: float = 2.0
) -> dict[str, Any]:
    """The machine's measured matmul peak: best FLOP/s of a large square GEMM loop in `dtype`.

    On CPU both of PyTorch's GEMM libraries are measured (MKL through torch.mm, oneDNN through the
    linear kernel our backbone uses) and the faster one is the peak, so that a model's fraction of
    peak can never exceed 1 because it uses the other library. Returns
    {"flops_per_s", "size", "dtype", "by_backend": {name: flops_per_s}}.
    """
    n = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    rates = {"torch.mm": _gemm_rate(lambda: torch.mm(a, b, out=out), a, device, seconds / 2)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        b_t = b.t().contiguous()
        rates["onednn"] = _gemm_rate(
            lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], ""), a, device, seconds / 2
        )
    return {
        "flops_per_s": max(rates.values()),
        "size": n,
        "dtype": str(dtype).replace("torch.", ""),
        "by_backend": rates,
    }
