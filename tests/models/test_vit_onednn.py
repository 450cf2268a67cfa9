"""OneDNNLinear: the backbone's linear layers through oneDNN on CPU, numerically nn.Linear's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssl_vit.models.vit as vit
from ssl_vit.models import create_backbone
from ssl_vit.models.vit import OneDNNLinear, onednn_linear_enabled, set_onednn_linear, use_onednn_linears

needs_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="PyTorch built without oneDNN",
)


@pytest.fixture
def forced_on():
    set_onednn_linear(True)
    yield
    set_onednn_linear(None)


@pytest.fixture
def calls(monkeypatch):
    """Counts oneDNN matmuls, so a test can tell which path ran."""
    seen = []
    real = vit._onednn_mm

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vit, "_onednn_mm", counting)
    return seen


def _pair(bias: bool = True, in_features: int = 24, out_features: int = 40) -> tuple[nn.Linear, OneDNNLinear]:
    ref = nn.Linear(in_features, out_features, bias=bias)
    fast = use_onednn_linears(copy.deepcopy(ref))
    return ref, fast


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["2d", "3d", "non_contiguous"])
@pytest.mark.parametrize("k, n", [(24, 40), (40, 24)])  # both ways of computing the weight gradient
def test_onednn_linear__forward_and_gradients_equal_nn_linear(forced_on, calls, bias, layout, k, n):
    torch.manual_seed(0)
    ref, fast = _pair(bias, k, n)
    base = {"2d": torch.randn(35, k), "3d": torch.randn(5, 7, k), "non_contiguous": torch.randn(5, k, 9)}[layout]
    if layout == "non_contiguous":
        base = base.transpose(1, 2)  # (5, 9, 24), strided
    x1 = base.clone().requires_grad_(True)
    x2 = base.clone().requires_grad_(True)
    y1, y2 = ref(x1), fast(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3  # forward, grad input, grad weight all on oneDNN


@needs_onednn
def test_onednn_linear__frozen_input_skips_its_gradient(forced_on, calls):
    _, fast = _pair()
    fast(torch.randn(3, 24)).sum().backward()
    assert len(calls) == 2 and fast.weight.grad is not None


@pytest.mark.parametrize("case", ["disabled", "float64", "autocast", "empty"])
def test_onednn_linear__falls_back_to_f_linear(calls, case):
    ref, fast = _pair()
    x = torch.randn(4, 24)
    set_onednn_linear(case != "disabled")
    try:
        if case == "float64":
            ref, fast, x = ref.double(), fast.double(), x.double()
        if case == "empty":
            x = x[:0]
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own bf16 linear
                torch.testing.assert_close(fast(x), F.linear(x, ref.weight, ref.bias))
        else:
            torch.testing.assert_close(fast(x), ref(x))
    finally:
        set_onednn_linear(None)
    assert calls == []


def test_backbone__linears_are_onednn_and_keys_unchanged():
    model = create_backbone("deit_nano_distilled_patch4_32", num_classes=5)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert "blocks.0.attn.qkv.weight" in model.state_dict() and "head_dist.weight" in model.state_dict()
    model.reset_classifier(7)
    assert type(model.head) is OneDNNLinear and type(model.head_dist) is OneDNNLinear
    twin = copy.deepcopy(model)
    assert type(twin.head) is OneDNNLinear


@needs_onednn
def test_backbone__training_step_matches_plain_pytorch_path():
    torch.manual_seed(0)
    model = create_backbone("vit_nano_patch4_32", num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads = []
    for enabled in (False, True):
        set_onednn_linear(enabled)
        try:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        finally:
            set_onednn_linear(None)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_set_onednn_linear__override_and_back_to_auto():
    auto = onednn_linear_enabled()
    set_onednn_linear(False)
    assert onednn_linear_enabled() is False
    set_onednn_linear(None)
    assert onednn_linear_enabled() == auto


def test_torch_compile__traces_the_backbone_in_one_graph():
    # Under torch.compile OneDNNLinear is F.linear: no graph break per layer (each would recompile).
    import torch._dynamo as dynamo

    model = create_backbone("vit_nano_patch4_32", num_classes=10, depth=1)
    explained = dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_onednn_linear__torch_func_vmap_uses_pytorch_kernels(forced_on, calls):
    layer = OneDNNLinear(8, 4)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(torch.func.vmap(layer)(x), F.linear(x, layer.weight, layer.bias))
    assert calls == []
