"""FLOP counting: hand counts for a linear layer and attention, on PyTorch's and oneDNN's kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_vit.bench import count_flops
from ssl_vit.ops.linear import OneDNNLinear, set_onednn_linear


@pytest.fixture
def onednn(request):
    set_onednn_linear(request.param)
    yield request.param
    set_onednn_linear(None)


@pytest.mark.parametrize("onednn", [False, True], indirect=True)
def test_count_flops__linear_forward_is_two_per_multiply_add(onednn):
    layer = OneDNNLinear(24, 40)
    x = torch.randn(5, 7, 24)  # (B, N, in): 35 rows
    with torch.no_grad():
        flops = count_flops(lambda: layer(x))
    assert flops == 2 * 35 * 24 * 40


@pytest.mark.parametrize("onednn", [False, True], indirect=True)
def test_count_flops__linear_backward_adds_input_and_weight_gradients(onednn):
    layer = OneDNNLinear(24, 40)
    x = torch.randn(35, 24, requires_grad=True)
    flops = count_flops(lambda: layer(x).sum().backward())
    assert flops == 3 * (2 * 35 * 24 * 40)  # forward + grad input + grad weight


def test_count_flops__input_without_grad_skips_its_gradient_matmul():
    layer = nn.Linear(24, 40)
    x = torch.randn(35, 24)
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * (2 * 35 * 24 * 40)


def test_count_flops__cpu_attention_is_counted_forward_and_backward():
    b, h, n, d = 2, 3, 17, 16
    q = torch.randn(b, h, n, d, requires_grad=True)
    forward = count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert forward == 2 * (2 * b * h * n * n * d)  # q @ k^T and p @ v
    both = count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    assert both > 2 * forward


def test_count_flops__optimizer_step_counts_nothing():
    layer = nn.Linear(8, 8)
    layer(torch.randn(2, 8)).sum().backward()
    opt = torch.optim.AdamW(layer.parameters())
    assert count_flops(opt.step) == 0
