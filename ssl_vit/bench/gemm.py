"""The matmul peak on a step's own GEMM shapes: what its matrix products reach alone on this machine.

A large square GEMM (`machine.matmul_peak`) runs near the CPU's limit; a ViT-Tiny's products (192 wide,
a few thousand rows, some with transposed operands in the backward) cannot. Issue 19 judges a step
against the rate its own GEMM shapes reach ("MKL 184-189 GFLOP/s on the ViT's GEMM shapes"):
`gemm_shapes` records every matrix product of one step (forward and backward) with its operands' shapes
and layouts, and `gemm_shape_peak` runs each alone, back to back, with the kernel the step called and
with `torch.mm` on the same layouts, keeping the faster: their FLOPs over their time is the peak the
step's GEMMs allow. A step's achieved FLOP/s over it tells how much of the step the GEMMs' own speed
explains; the rest goes to attention, norms, activations, the optimizer and glue.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_vit.bench.machine import best_seconds_per_call

__all__ = ["GemmRecorder", "gemm_shape_peak", "gemm_shapes"]

aten = torch.ops.aten

# Which arguments of each recorded op are its two matrix operands.
_OPERANDS: dict[Any, tuple[int, int]] = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2)}
_ONEDNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None)  # x (..., K), weight (N, K): our oneDNN linear
if _ONEDNN is not None:
    _OPERANDS[_ONEDNN] = (0, 1)

# One recorded product: (kind, operand shapes, operand stored transposed). kind: "mm" (mm / addmm),
# "bmm" (bmm / baddbmm) or "onednn" (x @ weight^T).
Product = tuple[str, tuple[tuple[int, ...], tuple[int, ...]], tuple[bool, bool]]


def _transposed(t: torch.Tensor) -> bool:
    """Stored as the transpose of a contiguous matrix (column-major in its last two dims)."""
    return t.dim() >= 2 and not t.is_contiguous() and t.transpose(-1, -2).is_contiguous()


def _kind(op: Any) -> str:
    if op in (aten.mm, aten.addmm):
        return "mm"
    return "bmm" if op in (aten.bmm, aten.baddbmm) else "onednn"


class GemmRecorder(TorchDispatchMode):
    """`with GemmRecorder() as r: step()`: r.products counts every matrix product run inside, by shape and
    layout (it can wrap another mode, e.g. the FLOP counter, so one run of a step serves both)."""

    def __init__(self) -> None:
        super().__init__()
        self.products: Counter[Product] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        packet = func.overloadpacket
        if packet in _OPERANDS:
            a, b = (args[i] for i in _OPERANDS[packet])
            self.products[(_kind(packet), (tuple(a.shape), tuple(b.shape)), (_transposed(a), _transposed(b)))] += 1
        return func(*args, **(kwargs or {}))


def gemm_shapes(fn: Callable[[], Any]) -> Counter[Product]:
    """Every matrix product of running `fn()` once (forward and backward), counted by shape and layout."""
    with GemmRecorder() as recorder:
        fn()
    return recorder.products


def product_flops(product: Product) -> int:
    """2 x multiply-adds: mm (M, K) @ (K, N); bmm (B, M, K) @ (B, K, N); oneDNN (..., K) @ (N, K)^T."""
    kind, (a, b), _ = product
    if kind == "onednn":
        return 2 * math.prod(a[:-1]) * a[-1] * b[0]
    return 2 * math.prod(a) * b[-1]  # mm: M K N; bmm: B M K N


def _operand(shape: tuple[int, ...], transposed: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if not transposed:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn((*shape[:-2], shape[-1], shape[-2]), device=device, dtype=dtype).transpose(-1, -2)


def _calls(product: Product, device: torch.device, dtype: torch.dtype) -> list[Callable[[], Any]]:
    """The kernel the step called, and torch.mm on the same layouts where that is another kernel."""
    kind, (sa, sb), (ta, tb) = product
    a, b = _operand(sa, ta, device, dtype), _operand(sb, tb, device, dtype)
    if kind == "mm":
        return [lambda: torch.mm(a, b)]
    if kind == "bmm":
        return [lambda: torch.bmm(a, b)]
    a2 = a.reshape(-1, a.shape[-1])
    return [lambda: _ONEDNN(a, b, None, "none", [], ""), lambda: torch.mm(a2, b.t())]


def gemm_shape_peak(
    products: Counter[Product], device: torch.device, dtype: torch.dtype = torch.float32, min_seconds: float = 0.01
) -> dict[str, Any]:
    """The step's GEMMs alone: {"flops_per_s", "gemm_flops", "gemm_seconds", "products", "calls"}.

    Each distinct product runs alone (its fastest kernel of those `_calls` tries; 3 rounds of about
    `min_seconds` each); the total is weighted by how often the step calls it.
    """
    flops = seconds = 0.0
    for product, count in products.items():
        per_call = min(
            best_seconds_per_call(c, device, 3 * min_seconds, round_s=min_seconds) for c in _calls(product, device, dtype)
        )
        flops += count * product_flops(product)
        seconds += count * per_call
    return {
        "flops_per_s": flops / seconds if seconds > 0 else 0.0,
        "gemm_flops": int(flops),
        "gemm_seconds": seconds,
        "products": len(products),
        "calls": sum(products.values()),
    }
