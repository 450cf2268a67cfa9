"""The matmul peak on a step's own GEMM shapes: which products a step runs, their FLOPs, their replay."""

from __future__ import annotations

import pytest
import torch

from ssl_vit.bench import count_flops
from ssl_vit.bench.gemm import GemmRecorder, gemm_shape_peak, gemm_shapes, product_flops
from ssl_vit.bench.gemm import _operand  # the replay's operands: same shape and layout as recorded


def test_gemm_shapes__a_linear_layer_runs_its_three_textbook_products():
    # y = x W^T + b over M = 4 x 5 rows: forward (M, K) x (K, N), and backward dX = dY W: (M, N) x (N, K),
    # dW = dY^T X: (N, M) x (M, K). Each is 2 M K N FLOPs.
    m, k, n = 20, 16, 8
    layer = torch.nn.Linear(k, n)
    x = torch.randn(4, 5, k, requires_grad=True)
    products = gemm_shapes(lambda: layer(x).sum().backward())
    dims = sorted((a, b[-1]) for _, (a, b), _ in products)  # ((rows, inner), cols)
    assert dims == sorted([((m, k), n), ((m, n), k), ((n, m), k)])
    assert sum(c * product_flops(p) for p, c in products.items()) == 3 * 2 * m * k * n
    (forward,) = [p for p in products if p[1][0] == (m, k)]
    assert forward[2] == (False, True)  # the weight (N, K) enters as its transpose: column-major (K, N)


def test_gemm_shapes__batched_products_count_every_batch():
    q, kt = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 5, 6)
    products = gemm_shapes(lambda: q @ kt.transpose(-1, -2))  # attention scores (B H, N, d) x (B H, d, N)
    ((product, count),) = products.items()
    assert product[0] == "bmm" and count == 1
    assert product_flops(product) == 2 * (2 * 3) * 4 * 6 * 5


def test_operand__rebuilds_the_recorded_layout():
    t = _operand((6, 4), True, torch.device("cpu"), torch.float32)
    assert t.shape == (6, 4) and not t.is_contiguous() and t.t().is_contiguous()
    assert _operand((6, 4), False, torch.device("cpu"), torch.float32).is_contiguous()


def test_gemm_shape_peak__weights_each_product_by_its_calls():
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(64, 32, requires_grad=True)
    products = gemm_shapes(lambda: layer(x).sum().backward())
    once = gemm_shape_peak(products, torch.device("cpu"), min_seconds=1e-4)
    doubled = gemm_shape_peak(products + products, torch.device("cpu"), min_seconds=1e-4)
    assert once["gemm_flops"] == 3 * 2 * 64 * 32 * 16 and doubled["gemm_flops"] == 2 * once["gemm_flops"]
    assert once["calls"] == 3 and doubled["calls"] == 6 and once["products"] == doubled["products"] == 3
    assert once["flops_per_s"] == pytest.approx(once["gemm_flops"] / once["gemm_seconds"])


def test_recorder_around_the_flop_counter__one_run_gives_both_unchanged():
    # The benchmark runs a step once under both modes: the products and the FLOPs are those of separate runs.
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(10, 16, requires_grad=True)

    def step():
        layer(x).sum().backward()

    with GemmRecorder() as recorder:
        flops = count_flops(step)
    assert recorder.products == gemm_shapes(step) and flops == count_flops(step) == 3 * 2 * 10 * 16 * 8
