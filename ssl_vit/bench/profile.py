"""Where a training step's time goes: torch.profiler self times grouped into a few kinds of work.

Kinds: matmul (linear layers and the patch-embedding convolution), attention (the SDPA kernels),
gelu, layernorm, copies (copy/cat/gather/... : data movement), optimizer (everything inside
`optimizer.step()`), other ops (element-wise maths, losses, reductions, allocation), and
python/dispatch: wall time not spent inside any operator (Python, autograd bookkeeping, launches).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable

import torch

from ssl_vit.bench.machine import sync

__all__ = ["CATEGORIES", "categorize", "profile_step"]

CATEGORIES = ("matmul", "attention", "gelu", "layernorm", "copies", "optimizer", "other ops", "python/dispatch")

# Base op names (after "aten::", "mkldnn::") of each kind.
_KINDS: dict[str, tuple[str, ...]] = {
    "matmul": (
        "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_linear_pointwise", "convolution", "_convolution",
        "mkldnn_convolution", "convolution_backward", "cudnn_convolution",
    ),
    "attention": (
        "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_cudnn_attention_backward", "_flash_attention_forward", "_flash_attention_backward",
        "_efficient_attention_forward", "_efficient_attention_backward",
        "softmax", "_softmax", "_softmax_backward_data",
    ),
    "gelu": ("gelu", "gelu_backward"),
    "layernorm": ("layer_norm", "native_layer_norm", "native_layer_norm_backward"),
    "copies": (
        "copy_", "clone", "contiguous", "cat", "stack", "gather", "scatter", "scatter_add", "scatter_add_",
        "index", "index_select", "_to_copy", "to", "repeat", "_unsafe_view", "reshape", "masked_select",
    ),
}
_BY_NAME = {name: kind for kind, names in _KINDS.items() for name in names}


def categorize(op_name: str) -> str:
    """The kind of work an operator does: 'aten::addmm' -> 'matmul', 'aten::cat' -> 'copies', ..."""
    base = op_name.split("::")[-1]
    return _BY_NAME.get(base, "other ops")


def _inside_optimizer(event: Any) -> bool:
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.") or parent.name.startswith("optimizer."):
            return True
        parent = parent.cpu_parent
    return False


def profile_step(
    step: Callable[[], Any], device: torch.device, steps: int = 3, warmup: int = 1, top: int = 12
) -> dict[str, Any]:
    """Profile `steps` calls of `step()` after `warmup` calls.

    Returns {"step_ms", "ms_per_step": {kind: ms}, "shares": {kind: fraction of the step},
    "top_ops": [{"op", "kind", "ms_per_step"}]}. On CUDA the op times are device (kernel) times.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - start
    use_device = device.type == "cuda"
    by_kind: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.events():
        us = event.self_device_time_total if use_device else event.self_cpu_time_total
        if us <= 0 or event.name.startswith("ProfilerStep"):
            continue
        kind = "optimizer" if _inside_optimizer(event) else categorize(event.name)
        by_kind[kind] += us
        by_op[event.name] += us
    wall_us = wall * 1e6
    if not use_device:  # CPU: what no operator accounts for is Python and dispatch overhead
        by_kind["python/dispatch"] = max(0.0, wall_us - sum(by_kind.values()))
    total = wall_us if not use_device else max(sum(by_kind.values()), 1e-9)
    ms = {k: by_kind.get(k, 0.0) / 1e3 / steps for k in CATEGORIES}
    return {
        "step_ms": wall * 1e3 / steps,
        "ms_per_step": ms,
        "shares": {k: by_kind.get(k, 0.0) / total for k in CATEGORIES},
        "top_ops": [
            {"op": name, "kind": categorize(name), "ms_per_step": us / 1e3 / steps}
            for name, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
        ],
    }
