"""FLOP counting of one training step with `torch.utils.flop_counter.FlopCounterMode`.

PyTorch's counter knows the GEMM, convolution and GPU attention kernels; this module adds the CPU
kernels our models run: the CPU flash-attention kernel (forward and backward) and oneDNN's linear
(`ssl_vit.ops.linear.OneDNNLinear`). Without these a CPU step would count no attention FLOPs and,
with oneDNN linears on, almost none at all. FLOPs here are 2 per multiply-add, as PyTorch counts.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_flops", "extra_flop_formulas"]

aten = torch.ops.aten


def _cpu_sdpa(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)  # q, k, v: (B, H, N, d) shapes


def _cpu_sdpa_backward(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _onednn_linear(x: Any, weight: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """x (..., K) @ weight (N, K)^T: 2 * M * K * N (the bias add is not counted, as for addmm)."""
    rows = math.prod(x[:-1])
    return 2 * rows * x[-1] * weight[0]


def extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for CPU kernels PyTorch's counter does not know (shapes in, FLOPs out)."""
    table: dict[Any, Callable[..., int]] = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward),
    ):
        if hasattr(aten, name):
            table[getattr(aten, name)] = formula
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        table[torch.ops.mkldnn._linear_pointwise] = _onednn_linear
    return table


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of running `fn()` once (forward and, if `fn` calls it, backward); optimizers count 0."""
    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())
