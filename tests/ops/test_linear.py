"""OneDNNLinear and its measured choice: numerically nn.Linear's, on only where it measures faster."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ssl_vit.ops import linear
from ssl_vit.ops.linear import (
    OneDNNLinear,
    onednn_linear_enabled,
    plain_linears,
    set_onednn_linear,
    use_onednn_linears,
)

needs_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="PyTorch built without oneDNN",
)


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """Each test: its own cache directory, nothing measured or forced yet in this process."""
    monkeypatch.setenv(linear.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(linear.ENV, raising=False)
    monkeypatch.setattr(linear, "_memory", {})
    monkeypatch.setattr(linear, "_unsettled", set())
    monkeypatch.setattr(linear, "_spent_s", 0.0)
    set_onednn_linear(None)
    yield tmp_path
    set_onednn_linear(None)


@pytest.fixture
def forced_on(monkeypatch):
    monkeypatch.setenv(linear.ENV, "1")


@pytest.fixture
def calls(monkeypatch):
    """Counts oneDNN matmuls, so a test can tell which path ran."""
    seen = []
    real = linear._onednn_mm

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(linear, "_onednn_mm", counting)
    return seen


@pytest.fixture
def measure(monkeypatch):
    """Replaces the benchmark: `measure.winner` ("onednn" / "mkl") decides; `measure.shapes` records requests."""

    class Stub:
        winner = "onednn"
        shapes: list[list[tuple[int, int]]] = []

        def __call__(self, shapes, budget_s):
            self.shapes.append(list(shapes))
            fast, slow = 1.0, 2.0
            mkl, onednn = (slow, fast) if self.winner == "onednn" else (fast, slow)
            return {s: {"rows": 64, "mkl_s": mkl, "onednn_s": onednn} for s in shapes}

    stub = Stub()
    stub.shapes = []
    monkeypatch.setattr(linear, "_measure", stub)
    return stub


def _pair(bias: bool = True, in_features: int = 24, out_features: int = 40) -> tuple[nn.Linear, OneDNNLinear]:
    ref = nn.Linear(in_features, out_features, bias=bias)
    fast = copy.deepcopy(ref)
    fast.__class__ = OneDNNLinear
    return ref, fast


def _mlp() -> nn.Module:
    return nn.Sequential(Mlp(8, 32), nn.Linear(8, 3))  # shapes (8, 32), (32, 8), (8, 3)


# -- numbers -----------------------------------------------------------------------------------------


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["2d", "3d", "non_contiguous"])
@pytest.mark.parametrize("k, n", [(24, 40), (40, 24)])  # both ways of computing the weight gradient
def test_onednn_linear__forward_and_gradients_equal_nn_linear(calls, bias, layout, k, n):
    torch.manual_seed(0)
    ref, fast = _pair(bias, k, n)
    base = {"2d": torch.randn(35, k), "3d": torch.randn(5, 7, k), "non_contiguous": torch.randn(5, k, 9)}[layout]
    if layout == "non_contiguous":
        base = base.transpose(1, 2)  # (5, 9, k), strided
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
def test_onednn_linear__frozen_input_skips_its_gradient(calls):
    _, fast = _pair()
    fast(torch.randn(3, 24)).sum().backward()
    assert len(calls) == 2 and fast.weight.grad is not None


@needs_onednn
def test_onednn_linear__double_backward_equals_f_linear(calls):
    torch.manual_seed(0)
    ref, fast = _pair(in_features=6, out_features=5)
    results = []
    for layer in (ref, fast):
        x = torch.randn(4, 6, dtype=torch.float32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss = torch.tanh(layer(x)).pow(2).sum()  # nonlinear: the second derivative is not zero
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        second = torch.autograd.grad(gx.pow(2).sum(), [x, layer.weight, layer.bias])
        results.append((gx, *second))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert calls  # the forward did run on oneDNN


@pytest.mark.parametrize("case", ["forced_off", "float64", "autocast", "empty", "mkldnn_disabled"])
def test_onednn_linear__falls_back_to_f_linear(monkeypatch, calls, case):
    ref, fast = _pair()
    x = torch.randn(4, 24)
    monkeypatch.setenv(linear.ENV, "0" if case == "forced_off" else "1")
    if case == "float64":
        ref, fast, x = ref.double(), fast.double(), x.double()
    if case == "empty":
        x = x[:0]
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own bf16 linear
            torch.testing.assert_close(fast(x), F.linear(x, ref.weight, ref.bias))
    elif case == "mkldnn_disabled":
        with torch.backends.mkldnn.flags(enabled=False):
            torch.testing.assert_close(fast(x), ref(x))
    else:
        torch.testing.assert_close(fast(x), ref(x))
    assert calls == []


def test_onednn_linear__torch_func_vmap_uses_pytorch_kernels(forced_on, calls):
    layer = OneDNNLinear(8, 4)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(torch.func.vmap(layer)(x), F.linear(x, layer.weight, layer.bias))
    assert calls == []


# -- tracing and nn.Linear tooling -------------------------------------------------------------------


def test_jit_trace__records_f_linear(forced_on, calls):
    model = use_onednn_linears(_mlp()).eval()
    x = torch.randn(3, 8)
    traced = torch.jit.trace(model, x, check_trace=False)  # the check would rerun the eager model
    graph = str(traced.inlined_graph)
    assert graph.count("aten::linear") == 3 and "mkldnn" not in graph and calls == []
    torch.testing.assert_close(traced(x), model(x))


def test_jit_script__compiles_f_linear(forced_on):
    model = use_onednn_linears(_mlp()).eval()
    assert type(model[1]) is OneDNNLinear
    scripted = torch.jit.script(model)
    x = torch.randn(3, 8)
    assert "mkldnn" not in str(scripted.inlined_graph)
    torch.testing.assert_close(scripted(x), model(x))


def test_fx_symbolic_trace__records_f_linear(forced_on):
    model = use_onednn_linears(_mlp()).eval()
    graph = torch.fx.symbolic_trace(model)
    assert sum(node.target is torch._C._nn.linear for node in graph.graph.nodes) == 3
    x = torch.randn(3, 8)
    torch.testing.assert_close(graph(x), model(x))


def test_torch_compile__traces_the_backbone_in_one_graph(forced_on):
    # Under torch.compile OneDNNLinear is F.linear: no graph break per layer (each would recompile).
    import torch._dynamo as dynamo

    from ssl_vit.models import create_backbone

    model = create_backbone("vit_nano_patch4_32", num_classes=10, depth=1, embed_dim=32, num_heads=2)
    assert type(model.head) is OneDNNLinear
    explained = dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def _quantized_linears(model: nn.Module) -> int:
    return sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def test_quantize_dynamic__off_leaves_plain_linears_it_quantizes(monkeypatch):
    monkeypatch.setenv(linear.ENV, "0")
    model = use_onednn_linears(_mlp()).eval()
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert _quantized_linears(quantized) == 3
    x = torch.randn(5, 8)
    torch.testing.assert_close(quantized(x), model(x), rtol=0.1, atol=0.05)


def test_quantize_dynamic__on_layers_are_nn_linears_and_plain_linears_hands_them_over(forced_on):
    model = use_onednn_linears(_mlp()).eval()
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 3 and all(type(m) is OneDNNLinear for m in layers)
    # quantize_dynamic matches exact types: it leaves the subclass alone, plain_linears hands it over.
    assert _quantized_linears(torch.ao.quantization.quantize_dynamic(model, {nn.Linear})) == 0
    quantized = torch.ao.quantization.quantize_dynamic(plain_linears(copy.deepcopy(model)), {nn.Linear})
    assert _quantized_linears(quantized) == 3
    x = torch.randn(5, 8)
    torch.testing.assert_close(quantized(x), model(x), rtol=0.1, atol=0.05)
    assert type(model[1]) is OneDNNLinear  # the original keeps its layers


def test_onednn_linear__same_parameters_and_state_dict_as_nn_linear(forced_on):
    ref = _mlp()
    fast = use_onednn_linears(copy.deepcopy(ref))
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict(), strict=True)
    assert type(copy.deepcopy(fast)[1]) is OneDNNLinear


# -- the choice --------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, expected", [("1", OneDNNLinear), ("0", nn.Linear), ("off", nn.Linear)])
def test_env__forces_the_path_without_measuring(monkeypatch, measure, setting, expected):
    monkeypatch.setenv(linear.ENV, setting)
    measure.winner = "mkl" if expected is OneDNNLinear else "onednn"  # the opposite of what is forced
    model = use_onednn_linears(_mlp())
    assert type(model[1]) is expected and measure.shapes == []


def test_env__unknown_value_names_the_choices(monkeypatch):
    monkeypatch.setenv(linear.ENV, "fast")
    with pytest.raises(ValueError, match="SSL_VIT_ONEDNN_LINEAR='fast'.*1.*0.*auto"):
        use_onednn_linears(_mlp())


def test_set_onednn_linear__overrides_env_and_back(monkeypatch, measure):
    monkeypatch.setenv(linear.ENV, "1")
    set_onednn_linear(False)
    assert onednn_linear_enabled() is False
    set_onednn_linear(None)
    assert onednn_linear_enabled() is True
    assert measure.shapes == []


@needs_onednn
@pytest.mark.parametrize("winner, expected", [("onednn", OneDNNLinear), ("mkl", nn.Linear)])
def test_measured__the_faster_kernel_on_the_modules_own_shapes(measure, winner, expected):
    measure.winner = winner
    model = use_onednn_linears(_mlp())
    assert type(model[0].fc1) is expected and type(model[1]) is expected
    assert sorted(measure.shapes[0]) == [(8, 3), (8, 32), (32, 8)]


@needs_onednn
def test_measured__layers_weigh_by_count_and_small_gains_keep_pytorchs_kernel(monkeypatch):
    timings = {(8, 8): (1.0, 0.5), (8, 4): (1.0, 1.5)}  # (mkl_s, onednn_s): oneDNN 2x / 0.67x

    def measure(shapes, budget_s):
        return {s: {"rows": 1, "mkl_s": timings[s][0], "onednn_s": timings[s][1]} for s in shapes}

    monkeypatch.setattr(linear, "_measure", measure)
    many_fast = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)], nn.Linear(8, 4))
    assert type(use_onednn_linears(many_fast)[0]) is OneDNNLinear  # 3 * 0.5 + 1.5 < 0.9 * 4
    timings[(8, 8)] = (1.0, 0.95)  # 5% faster: within noise, stays MKL
    linear._memory.clear()
    (linear._cache_path()).unlink()
    assert type(use_onednn_linears(nn.Linear(8, 8))) is nn.Linear


@needs_onednn
def test_measured__cached_per_machine_and_torch_version(fresh, monkeypatch, measure):
    use_onednn_linears(_mlp())
    assert len(measure.shapes) == 1
    saved = json.loads((fresh / linear.CACHE_FILE).read_text())
    (machine,) = saved["machines"]
    assert torch.__version__ in machine and "8x32" in saved["machines"][machine]

    # A new process on the same machine reads the file: no measurement, the cached winner.
    monkeypatch.setattr(linear, "_memory", {})
    measure.winner = "mkl"
    assert type(use_onednn_linears(_mlp())[1]) is OneDNNLinear and len(measure.shapes) == 1

    # Another CPU model, or another torch version: measured again, both kept in the file.
    for name, value in (("_cpu", lambda: ("Other CPU", "avx2")), ("__version__", "9.9.9")):
        monkeypatch.setattr(linear, "_memory", {})
        if name == "_cpu":
            monkeypatch.setattr(linear, name, value)
        else:
            monkeypatch.setattr(torch, name, value)
        assert type(use_onednn_linears(_mlp())[1]) is nn.Linear
    assert len(measure.shapes) == 3
    assert len(json.loads((fresh / linear.CACHE_FILE).read_text())["machines"]) == 3


@needs_onednn
def test_measured__only_missing_shapes_are_measured(measure):
    use_onednn_linears(nn.Linear(8, 32))
    use_onednn_linears(_mlp())
    assert measure.shapes == [[(8, 32)], [(32, 8), (8, 3)]]  # costliest first


@needs_onednn
def test_measured__unsettled_shapes_mean_off_and_are_not_retried(fresh, monkeypatch):
    tried = []
    monkeypatch.setattr(linear, "_measure", lambda shapes, budget: tried.append(shapes) or {})  # busy machine
    assert type(use_onednn_linears(_mlp())[1]) is nn.Linear
    assert type(use_onednn_linears(_mlp())[1]) is nn.Linear
    assert len(tried) == 1 and not (fresh / linear.CACHE_FILE).exists()


@needs_onednn
@pytest.mark.parametrize("kind", ["truncated", "bad_entry"])
def test_measured__corrupt_cache_file_is_measured_again(fresh, measure, kind):
    machine = linear._machine_key()
    text = {
        "truncated": '{"format": 1, "machi',
        "bad_entry": json.dumps({"machines": {machine: {"8x32": {"rows": 0}, "32x8": "fast", "8x3": None}}}),
    }[kind]
    (fresh / linear.CACHE_FILE).write_text(text)
    assert type(use_onednn_linears(_mlp())[1]) is OneDNNLinear and len(measure.shapes) == 1
    assert len(json.loads((fresh / linear.CACHE_FILE).read_text())["machines"][machine]) == 3


def test_mkldnn_disabled__no_swap_and_no_measurement(measure):
    with torch.backends.mkldnn.flags(enabled=False):
        assert type(use_onednn_linears(_mlp())[1]) is nn.Linear
    assert measure.shapes == []


@needs_onednn
def test_measure__real_benchmark_is_short_and_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(linear, "_busy", lambda: False)
    state = torch.random.get_rng_state()
    got = linear._measure([(16, 48)], budget_s=0.5)
    assert torch.equal(torch.random.get_rng_state(), state)
    if got:  # a busy machine may not settle in 0.5 s
        timing = got[(16, 48)]
        assert timing["rows"] == 1024 and timing["mkl_s"] > 0 and timing["onednn_s"] > 0


@needs_onednn
@pytest.mark.parametrize("second, kept", [((1.1, 0.56), True), ((1.0, 1.0), False), (None, False)])
def test_measure__a_shape_counts_when_two_passes_agree(monkeypatch, second, kept):
    passes = iter([(1.0, 0.5), second])  # (mkl_s, onednn_s) of each pass; None: did not settle in time
    monkeypatch.setattr(linear, "_busy", lambda: False)
    monkeypatch.setattr(linear, "_best_times", lambda *args: next(passes))
    got = linear._measure([(16, 48)], budget_s=0.5)
    assert got == ({(16, 48): {"rows": 1024, "mkl_s": 1.0, "onednn_s": 0.5}} if kept else {})


def test_measure__busy_machine_is_not_measured(monkeypatch):
    monkeypatch.setattr(linear, "_busy", lambda: True)
    assert linear._measure([(16, 48)], budget_s=0.5) == {}
