"""What machine a benchmark ran on, and the fastest matrix multiply it can do (the roofline we compare to)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from typing import Any, Callable

import torch

__all__ = [
    "best_seconds_per_call",
    "cpu_description",
    "datasheet_bf16_peak",
    "machine_info",
    "machine_label",
    "matmul_peak",
    "sync",
]

# /proc/cpuinfo flags that decide which GEMM kernels a CPU gets, and how the report names them.
ISA_FLAGS = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_bf16", "AVX512-BF16"),
    ("avx512_fp16", "AVX512-FP16"),
    ("amx_tile", "AMX"),
    ("amx_bf16", "AMX-BF16"),
    ("asimd", "NEON"),
    ("sve", "SVE"),
)
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (FLOP/s, no sparsity), first match wins: what
# "model FLOP utilisation" is quoted against beside the peak measured in the same run.
DATASHEET_BF16_PEAKS = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.5e12),
    ("H100 NVL", 835.5e12),
    ("H100", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362.05e12),
    ("L4", 121e12),
)


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


def cpu_description(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model, family / model numbers, ISA flags (AVX2, AVX-512, AMX, ...) and hypervisor, from /proc/cpuinfo.

    `cpuinfo` is the file's text (tests pass one); the hypervisor's vendor comes from `lscpu` when present.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() not in fields:  # the first processor's entry
            fields[name.strip()] = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    out: dict[str, Any] = {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "family": fields.get("cpu family"),
        "model_number": fields.get("model"),
        "isa": [label for flag, label in ISA_FLAGS if flag in flags],
        "hypervisor": None,
    }
    if "hypervisor" in flags:
        out["hypervisor"] = _lscpu_field("Hypervisor vendor") or "yes"
    return out


def _lscpu_field(name: str) -> str | None:
    if shutil.which("lscpu") is None:
        return None
    try:
        text = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def datasheet_bf16_peak(gpu_name: str) -> float | None:
    """The GPU's dense bf16 peak from its datasheet (FLOP/s), or None for a GPU not in the table."""
    for key, peak in DATASHEET_BF16_PEAKS:
        if key.lower() in gpu_name.lower():
            return peak
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, library versions, GPU name (on CUDA), and the load when measured."""
    from ssl_vit.ops.linear import onednn_linear_enabled

    cpu = cpu_description()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_family_model": f"family {cpu['family']} model {cpu['model_number']}" if cpu["family"] else None,
        "isa": cpu["isa"],
        "hypervisor": cpu["hypervisor"],
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
        info["gpu_datasheet_bf16_flops"] = datasheet_bf16_peak(info["gpu"])
    return info


def machine_label(info: dict[str, Any]) -> str:
    """One line naming the machine, e.g. 'Intel(R) Xeon(R) Processor (KVM, family 6 model 167; AVX2, AVX-512,
    AMX), 2 cores, 2 threads, torch 2.14.1 (CPU)'."""
    where = info.get("gpu") or "CPU"
    details = [d for d in (info.get("hypervisor"), info.get("cpu_family_model")) if d]
    isa = ", ".join(info.get("isa") or []) or "no AVX2 / AVX-512 / AMX"
    cpu = f"{info['cpu']} ({', '.join(details)}; {isa})" if details else f"{info['cpu']} ({isa})"
    return f"{cpu}, {info['cores']} cores, {info['torch_threads']} threads, torch {info['torch']} ({where})"


def best_seconds_per_call(fn: Callable[[], Any], device: torch.device, seconds: float, round_s: float = 0.1) -> float:
    """The fastest time of one `fn()` call: after 2 warm-up calls (library init, caches, GPU clocks), rounds
    of about `round_s` (short enough to catch a quiet moment) until `seconds` have passed; the best round's mean."""
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    per_round = max(1, int(round_s / one))
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(per_round):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - start) / per_round)
        if time.perf_counter() >= deadline:
            return best


def _gemm_rate(fn: Any, a: torch.Tensor, device: torch.device, seconds: float) -> float:
    """Best FLOP/s of `fn()` (an n x n x n matrix product) over rounds filling `seconds`."""
    return 2.0 * a.shape[0] ** 3 / best_seconds_per_call(fn, device, seconds)


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
