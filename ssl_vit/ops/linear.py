"""fp32 CPU linear layers through oneDNN instead of MKL, where a measurement on this machine says so.

PyTorch computes fp32 `F.linear` on CPU with MKL's sgemm; oneDNN (also inside PyTorch) has its own
kernels. Which is faster depends on the CPU, not on its vendor string. Measured (forward + backward):
- AMD EPYC with AVX-512 (Zen 5, 2 cores, torch 2.14.1): oneDNN 1.4-1.7x faster on ViT-Tiny blocks
  (this project's earlier measurement, when the choice was "every AMD CPU");
- an AVX2-only AMD EPYC: oneDNN slower (issue 19), which is why the vendor string is not the test;
- Intel Xeon with AVX-512 and AMX (KVM, 2 cores, torch 2.14.1, load average below 1): MKL faster,
  oneDNN at 0.74-0.93x of its speed on ViT-Tiny's linear shapes (1,024 and 4,160 rows) and
  0.53-0.87x on ViT-Base's (512 rows), medians of 20 runs; forward alone about even (0.90-1.06x).

So the path is chosen per machine:
- `use_onednn_linears(module)` times the module's own linear shapes (forward + backward, oneDNN and
  `F.linear` in turns; a shape counts once each kernel's best time repeats within 5%, in two passes
  that agree within 10%: a pass over ViT-Tiny's shapes took 0.34-0.44 s on a quiet 2-core machine;
  at most 1.5 s per process) and turns its plain `nn.Linear`s into `OneDNNLinear`s only if oneDNN is 10% or more faster
  over its layers. The timings are cached per CPU model, ISA flags, torch version and thread count in
  `$SSL_VIT_CACHE_DIR/onednn_linear.json` (default `~/.cache/ssl_vit/`): later runs do not measure.
  On a busy machine (1-min load average above half a core plus a quarter of the CPUs: there the
  timings swing up to 10x, and not alike for both kernels) or when the timings do not settle, the
  layers stay PyTorch's, nothing is cached, and the next process measures again.
- `SSL_VIT_ONEDNN_LINEAR=1` / `0` (or `set_onednn_linear(True/False)` in-process) forces the choice.
- When off, the modules stay plain `nn.Linear`, so tooling that matches the exact type
  (`torch.ao.quantization.quantize_dynamic`, fx leaf modules) works as ever. When on, layers are
  `OneDNNLinear`, an `nn.Linear` subclass (same parameters, state_dict keys, isinstance);
  `quantize_dynamic` skips subclasses, so hand it `plain_linears(model)`.
- A `OneDNNLinear` computes with `F.linear` wherever oneDNN's path does not apply: non-fp32 or non-CPU
  tensors, autocast, `torch.backends.mkldnn` disabled (`torch.backends.mkldnn.flags(enabled=False)`),
  the path forced off, torch.compile/export, `torch.jit.trace`/`script`, fx symbolic tracing, tensor
  subclasses, torch.func transforms. Double backward (`create_graph=True`) works: the backward then
  computes its matmuls with differentiable PyTorch ops.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OneDNNLinear", "onednn_linear_enabled", "plain_linears", "set_onednn_linear", "use_onednn_linears"]

ENV = "SSL_VIT_ONEDNN_LINEAR"  # "1": always, "0": never, unset / "auto": measured
CACHE_ENV = "SSL_VIT_CACHE_DIR"
CACHE_FILE = "onednn_linear.json"
MIN_GAIN = 0.10  # oneDNN must be at least 10% faster: below that, timing noise could pick either
BUDGET_S = 1.5  # measuring time per process at most; shapes left unmeasured count as "off"
MIN_REPS = 3  # timed runs per kernel and shape at least, after one warm-up each
SETTLE = 0.05  # a kernel's best time counts once its second best is within 5% of it
AGREE = 0.10  # and a shape's timings once two passes' MKL/oneDNN ratios are within 10% of each other
_STEP_FLOPS = 1e9  # rows per shape: about this many FLOPs per forward + backward, within 64..1024 rows
# (in, out) of a ViT-Tiny block (qkv, proj, fc1, fc2): what `onednn_linear_enabled()` asks about by default.
TINY_SHAPES = ((192, 576), (192, 192), (192, 768), (768, 192))

_override: bool | None = None
_memory: dict[tuple[str, str], dict[str, dict[str, float]]] = {}  # (cache file, machine) -> shape -> timings
_unsettled: set[tuple[tuple[str, str], tuple[int, int]]] = set()  # shapes this process failed to time
_spent_s = 0.0  # time this process has spent measuring


# ---------------------------------------------------------------------------------------------------
# The kernel


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b_t.T (+ bias) by oneDNN: a (..., K), b_t (N, K) -> (..., N); strided views are fine."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    """y = x W^T + b with oneDNN matmuls forward and backward: x (..., K), W (N, K), b (N,)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        grad_x = grad_w = grad_b = None
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight).view(x.shape)
            if ctx.needs_input_grad[1]:
                grad_w = g.t() @ x2
        else:
            if ctx.needs_input_grad[0]:
                grad_x = _onednn_mm(g, weight.t()).view(x.shape)  # (M, N) @ (N, K): no copy of W^T needed
            if ctx.needs_input_grad[1]:
                # oneDNN first copies its (transposed) left operand into a dense buffer: make that the
                # narrower of x and g (up to 1.3x faster for qkv / fc1, where K < N).
                if x2.shape[1] < g.shape[1]:
                    grad_w = _onednn_mm(x2.t(), g.t()).t().contiguous()  # ((K, M) @ (M, N))^T
                else:
                    grad_w = _onednn_mm(g.t(), x2.t())  # (N, M) @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


@functools.lru_cache(maxsize=1)
def _built_with_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _plain(t: torch.Tensor | None) -> bool:
    # fx Proxies, tensor subclasses (DTensor, FakeTensor) and torch.func transforms (vmap, grad) keep
    # PyTorch's kernels.
    if t is None:
        return True
    return type(t) in (torch.Tensor, nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        not torch.compiler.is_compiling()  # first: torch.compile / export trace F.linear, nothing below
        and not torch.jit.is_tracing()
        and _plain(x)
        and _plain(weight)
        and _plain(bias)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.enabled
        and _built_with_onednn()
        and _forced() is not False
    )


class OneDNNLinear(nn.Linear):
    """`nn.Linear` whose fp32 CPU matmuls run through oneDNN (forward and backward); else `F.linear`.

    Built directly, it takes oneDNN's path whenever that applies and the path is not forced off;
    `use_onednn_linears` creates these only where the measurement favours oneDNN.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.linear(input, self.weight, self.bias)
        else:
            return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: torch.Tensor) -> torch.Tensor:
        if _onednn_applies(input, self.weight, self.bias):
            return _OneDNNLinearFn.apply(input, self.weight, self.bias)
        return F.linear(input, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------------
# The choice


def _forced() -> bool | None:
    """The forced setting: `set_onednn_linear`, else `SSL_VIT_ONEDNN_LINEAR`; None: measure."""
    if _override is not None:
        return _override
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting not in ("", "auto"):
        raise ValueError(f"{ENV}={setting!r} is not a setting: use 1 (always oneDNN), 0 (never) or auto (measure).")
    return None


def set_onednn_linear(enabled: bool | None) -> None:
    """Force oneDNN linears on (True) or off (False) in this process; None: back to the env / measurement."""
    global _override
    _override = enabled


def onednn_linear_enabled(shapes: Iterable[tuple[int, int]] | None = None) -> bool:
    """Whether `use_onednn_linears` would now turn linears of these (in, out) shapes into `OneDNNLinear`.

    The forced setting if there is one, else the measured (cached) choice; default shapes: a ViT-Tiny block's.
    """
    if not (_built_with_onednn() and torch.backends.mkldnn.enabled):
        return False
    forced = _forced()
    if forced is not None:
        return forced
    return _measured_choice(list(shapes) if shapes is not None else list(TINY_SHAPES))


def use_onednn_linears(module: nn.Module) -> nn.Module:
    """Turn the plain `nn.Linear`s inside `module` into `OneDNNLinear`s (in place) if the path is on for
    their shapes (forced, or measured faster on this machine); else leave them as they are."""
    plain = [m for m in module.modules() if type(m) is nn.Linear]
    # Layers built on a GPU never compute on the CPU path; meta-device ones may later be materialised there.
    plain = [m for m in plain if m.weight.device.type in ("cpu", "meta")]
    if plain and onednn_linear_enabled([(m.in_features, m.out_features) for m in plain]):
        for m in plain:
            m.__class__ = OneDNNLinear
    return module


def plain_linears(module: nn.Module) -> nn.Module:
    """Turn every `OneDNNLinear` inside `module` back into a plain `nn.Linear` (in place; weights untouched),
    e.g. before `torch.ao.quantization.quantize_dynamic`, which matches the exact type `nn.Linear`."""
    for m in module.modules():
        if type(m) is OneDNNLinear:
            m.__class__ = nn.Linear
    return module


def _measured_choice(shapes: list[tuple[int, int]]) -> bool:
    """oneDNN's time over the layers' shapes (each weighted by how many layers have it) beats MKL's by MIN_GAIN."""
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    timings = _timings(list(counts))
    if len(timings) < len(counts):  # some shape could not be timed (busy machine, budget spent): PyTorch's default
        return False
    mkl = sum(counts[s] * t["mkl_s"] / t["rows"] for s, t in timings.items())
    onednn = sum(counts[s] * t["onednn_s"] / t["rows"] for s, t in timings.items())
    return onednn < (1 - MIN_GAIN) * mkl


def _timings(shapes: list[tuple[int, int]]) -> dict[tuple[int, int], dict[str, float]]:
    """{(in, out): {"rows", "mkl_s", "onednn_s"}} from the cache, measuring (and caching) the missing ones."""
    global _spent_s
    path = _cache_path()
    key = (str(path), _machine_key())
    known = _memory.get(key)
    if known is None:
        saved = _read_cache(path).get(key[1])
        known = _memory[key] = {k: t for k, t in saved.items() if _valid(t)} if isinstance(saved, dict) else {}
    missing = [s for s in shapes if _shape_name(s) not in known and (key, s) not in _unsettled]
    missing.sort(key=lambda s: -s[0] * s[1])  # the costliest first, in case the budget runs out
    if missing and _spent_s < BUDGET_S:
        start = time.perf_counter()
        measured = _measure(missing, BUDGET_S - _spent_s)
        _spent_s += time.perf_counter() - start
        _unsettled.update((key, s) for s in missing if s not in measured)  # not again in this process
        if measured:
            known.update({_shape_name(s): t for s, t in measured.items()})
            _write_cache(path, key[1], known)
    return {s: known[_shape_name(s)] for s in shapes if _shape_name(s) in known}


def _valid(timing: Any) -> bool:
    """A cache entry as `_measure` writes it (a hand-edited or foreign file may hold anything)."""
    fields = ("rows", "mkl_s", "onednn_s")
    return isinstance(timing, dict) and all(isinstance(timing.get(f), (int, float)) and timing[f] > 0 for f in fields)


def _shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _measure(shapes: list[tuple[int, int]], budget_s: float) -> dict[tuple[int, int], dict[str, float]]:
    """Best forward + backward time of F.linear (MKL) and oneDNN on each (in, out) shape, where it settled.

    A shared machine's load makes timings up to 10x slow, for one kernel more than the other (a thread
    of the GEMM's pool waits for a core). So nothing is measured on a busy machine, and a shape counts
    only when two passes agree: in each, the kernels run in turns until each one's best time repeats
    (within SETTLE), and the two passes' MKL/oneDNN ratios differ by less than AGREE. A shape that does
    not get there within its share of `budget_s` is left out (not cached).
    """
    if not (_built_with_onednn() and torch.backends.mkldnn.enabled) or _busy():
        return {}
    gen = torch.Generator().manual_seed(0)  # a private generator: the global RNG stream stays untouched
    out: dict[tuple[int, int], dict[str, float]] = {}
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        for left, (k, n) in zip(range(len(shapes), 0, -1), shapes):
            rows = int(min(1024, max(64, _STEP_FLOPS // (6 * k * n))))
            x = torch.randn(rows, k, generator=gen, device="cpu").requires_grad_()
            w = (torch.randn(n, k, generator=gen, device="cpu") / math.sqrt(k)).requires_grad_()
            b = torch.zeros(n, device="cpu", requires_grad=True)
            g = torch.randn(rows, n, generator=gen, device="cpu")

            def step(fn: Any) -> float:
                t0 = time.perf_counter()
                torch.autograd.grad(fn(x, w, b), (x, w, b), g)
                return time.perf_counter() - t0

            kernels = (F.linear, _OneDNNLinearFn.apply)
            for fn in kernels:  # warm-up, outside the budget: a process's first GEMM takes up to 0.5 s
                step(fn)
            start = time.perf_counter()
            deadline = start + budget_s / left  # this shape's share of what is left
            passes = [_best_times(step, kernels, deadline) for _ in range(2)]
            budget_s -= time.perf_counter() - start
            if None in passes:
                continue
            (mkl_a, onednn_a), (mkl_b, onednn_b) = passes
            if abs(math.log((mkl_a / onednn_a) / (mkl_b / onednn_b))) < math.log(1 + AGREE):
                out[(k, n)] = {"rows": rows, "mkl_s": min(mkl_a, mkl_b), "onednn_s": min(onednn_a, onednn_b)}
    return out


def _best_times(step: Any, kernels: tuple[Any, Any], deadline: float) -> tuple[float, float] | None:
    """(MKL, oneDNN) best times once both settled, run in turns so a burst of load hits both; None: not by then."""
    times: tuple[list[float], list[float]] = ([], [])
    while time.perf_counter() < deadline:
        for fn, seen in zip(kernels, times):
            seen.append(step(fn))
        if len(times[0]) >= MIN_REPS and all(_settled(t) for t in times):
            return min(times[0]), min(times[1])
    return None


def _busy() -> bool:
    """The 1-min load average (this process included) is above half a core plus a quarter of the CPUs."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this OS: measure regardless
        return False
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return load > 0.5 + 0.25 * cpus


def _settled(times: list[float]) -> bool:
    best, second = sorted(times)[:2]
    return second <= best * (1 + SETTLE)


# ---------------------------------------------------------------------------------------------------
# The cache


def _cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ssl_vit"
    )
    return Path(root) / CACHE_FILE


@functools.lru_cache(maxsize=1)
def _cpu() -> tuple[str, str]:
    """(CPU model name, the ISA flags that decide GEMM kernels) from /proc/cpuinfo, else platform's."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve") if f in flags]
    return model or platform.processor() or platform.machine(), " ".join(isa)


def _machine_key() -> str:
    """What the timings depend on: CPU model and ISA, torch version (its oneDNN and MKL), thread count."""
    model, isa = _cpu()
    return f"{model} | {isa or 'no listed ISA flags'} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _read_cache(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, unreadable or half-written by a killed process: measure again
    machines = data.get("machines") if isinstance(data, dict) else None
    return machines if isinstance(machines, dict) else {}


def _write_cache(path: Path, machine: str, timings: dict[str, dict[str, float]]) -> None:
    """Merge this machine's timings into the file; atomic (write + rename), best effort (read-only home)."""
    machines = _read_cache(path)
    machines[machine] = {**machines.get(machine, {}), **timings}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": 1, "machines": machines}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
