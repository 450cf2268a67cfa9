"""Gather what a comparison produced: every metrics.json, each pretraining's compute and loss curve.

Nothing here runs a model: it reads `metrics.json` (the eval recipes' contract), `backbone.json` (the
pretraining export), the runner's `compare_run.json` markers, and TensorBoard event files. A file that
is missing or malformed becomes an error in its cell, never an exception, so one broken entry cannot
keep the rest of the table from being written.

A cell is a method judged by one protocol over its runs: one per pretraining seed (each the mean over
the eval seeds), or one per init seed for a random init. With 2+ runs it holds their mean, std and
95% t-interval, and Welch's t-test against the column's best says whether the gap is within noise
(`stats.py`); with one run, its eval seeds' spread as before.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ssl_vit.compare.plan import ComparePlan, Run, flatten_overrides
from ssl_vit.compare.runner import MARKER, RunStatus, outputs_exist
from ssl_vit.compare.stats import ALPHA, CONFIDENCE, summarize, welch

__all__ = [
    "EvalResult",
    "MethodResult",
    "Results",
    "collect",
    "machine_description",
    "pretrain_stats",
    "read_loss_curve",
    "read_metrics",
]

_PRETRAIN_KEYS = ("steps", "images_seen", "seconds", "images_per_sec")
# Tags tried in order for the pretraining loss; after these, any scalar tag whose last part is "loss".
_LOSS_TAGS = ("train/loss", "loss", "train_loss", "pretrain/loss")


@dataclass
class EvalResult:
    """One cell of the table (a method judged by one protocol), or one metrics.json (`read_metrics`).

    `top1` is the mean over the runs (pretraining or init seeds); `top1_std` their std when there are 2+
    runs, else the one run's spread over its eval seeds (`spread` says which); `eval_std` is always the
    eval seeds' spread within a run (root mean square over runs).
    """

    column: str
    protocol: str
    status: str = "missing"  # "ok", "failed", "blocked", "missing", "invalid", "not run"
    top1: Optional[float] = None
    top1_std: Optional[float] = None
    top5: Optional[float] = None
    top5_std: Optional[float] = None
    seeds: list[int] = field(default_factory=list)  # eval seeds
    seconds: Optional[float] = None
    error: Optional[str] = None
    path: Optional[str] = None
    extra: dict = field(default_factory=dict)  # by_k, hyperparameters, n_train, n_eval
    per_seed: list[dict] = field(default_factory=list)  # metrics.json's per eval seed {"seed", "top1", "top5"}
    n: int = 0  # runs in the mean
    spread: str = "eval seeds"  # what top1_std is over: "pretraining seeds", "init seeds" or "eval seeds"
    ci95: Optional[list[float]] = None  # [low, high]: t-interval of the mean over the runs (n >= 2)
    eval_std: Optional[float] = None
    # Each run: {"pretrain_seed", "label", "status", "top1", "top1_std" (eval seeds), "top5", "seeds",
    # "per_seed", "path", "error"}.
    runs: list[dict] = field(default_factory=list)
    best: bool = False  # the column's best mean
    p_vs_best: Optional[float] = None  # Welch's two-sided p against the column's best (2+ runs on each side)
    within_noise: Optional[bool] = None  # p_vs_best >= ALPHA; None: not tested (the best, or < 2 runs)


@dataclass
class MethodResult:
    """One row: how the backbone was made, what it cost, and its cells."""

    name: str
    kind: str  # "pretrain", "checkpoint", "random"
    objective: Optional[str] = None
    status: str = "ok"  # "ok", "failed", "blocked", "missing"
    error: Optional[str] = None
    pretrain: dict = field(default_factory=dict)  # steps, images_seen, seconds, images_per_sec
    budget: dict = field(default_factory=dict)
    exceptions: list[str] = field(default_factory=list)  # shared keys this entry overrides
    uses: list[str] = field(default_factory=list)  # other entries it builds on (e.g. a DeiT teacher)
    evaluated: bool = True
    loss_tag: Optional[str] = None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # the first run's
    evals: dict[str, EvalResult] = field(default_factory=dict)
    seeds: list[Optional[int]] = field(default_factory=list)  # its runs' pretraining seeds (None: config's)
    # Each pretraining run: {"seed", "label", "status", "error", "pretrain" (its stats), "path"}.
    runs: list[dict] = field(default_factory=list)
    loss_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # run label -> curve


@dataclass
class Results:
    name: str
    description: str
    created: str
    machine: str
    shared: dict
    seeds: list[int]
    budget: dict
    launcher: str
    columns: list[tuple[str, str]]  # (column name, protocol)
    methods: list[MethodResult]
    problems: list[str] = field(default_factory=list)
    column_seeds: dict[str, list[int]] = field(default_factory=dict)  # protocols with their own seeds
    pretrain_seeds: Optional[list[int]] = None  # None: one run per method, with its config's seed
    confidence: float = CONFIDENCE
    alpha: float = ALPHA
    test: str = "Welch's t-test, two-sided, over the runs"

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["columns"] = [{"name": n, "protocol": p} for n, p in self.columns]
        for m in d["methods"]:
            m.pop("loss_curve", None)  # plotted, and too long for the JSON summary
            m.pop("loss_curves", None)
        return d


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_metrics(path: str | Path, column: str = "", protocol: str = "") -> EvalResult:
    """A metrics.json as a cell; a missing or malformed file gives a cell with `status`/`error` set."""
    path = Path(path)
    result = EvalResult(column=column, protocol=protocol, path=str(path))
    if not path.is_file():
        result.error = f"no {path.name} in {path.parent}"
        return result
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        result.status, result.error = "invalid", f"{path} is not valid JSON ({err})"
        return result
    top1 = _finite(data.get("top1")) if isinstance(data, dict) else None
    if top1 is None:
        result.status, result.error = "invalid", f"{path} holds no numeric 'top1'"
        return result
    result.status = "ok"
    result.protocol = str(data.get("protocol") or protocol)
    result.top1 = top1
    result.top5 = _finite(data.get("top5"))
    per_seed = data.get("per_seed") if isinstance(data.get("per_seed"), list) else []
    result.top1_std = _finite(data.get("top1_std"))
    result.top5_std = _finite(data.get("top5_std"))
    if result.top1_std is None:  # older files: derive the spread from the per-seed values
        values = [_finite(r.get("top1")) for r in per_seed if isinstance(r, dict)]
        values = [v for v in values if v is not None]
        result.top1_std = _std(values) if values else 0.0
    seeds = data.get("seeds") or [r.get("seed") for r in per_seed if isinstance(r, dict)]
    result.seeds = [int(s) for s in seeds if isinstance(s, int)]
    result.per_seed = [{"seed": r.get("seed"), "top1": _finite(r.get("top1")), "top5": _finite(r.get("top5"))}
                       for r in per_seed if isinstance(r, dict) and _finite(r.get("top1")) is not None]
    result.n = 1
    result.seconds = _finite(data.get("seconds"))
    for key in ("by_k", "hyperparameters", "n_train", "n_eval", "method", "checkpoint", "model", "dataset",
                "split", "pretrain"):
        if key in data:
            result.extra[key] = data[key]
    return result


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def pretrain_stats(output_dir: str | Path) -> tuple[dict[str, Any], Optional[str]]:
    """(steps, images_seen, seconds, images_per_sec as found, objective) of a pretraining run folder.

    Read from `backbone.json` (top level, or under "summary"/"pretrain"), then `summary.json`; the
    runner's marker gives the wall-clock of the subprocess when the run recorded none.
    """
    out = Path(output_dir)
    stats: dict[str, Any] = {}
    objective = None
    for name in ("backbone.json", "summary.json"):
        try:
            meta = json.loads((out / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(meta, dict):
            continue
        sources = [meta] + [meta[k] for k in ("summary", "pretrain") if isinstance(meta.get(k), dict)]
        for source in sources:
            for key in _PRETRAIN_KEYS:
                if key not in stats and _finite(source.get(key)) is not None:
                    stats[key] = source[key]
            if "steps" not in stats and _finite(source.get("step")) is not None:
                stats["steps"] = source["step"]
        obj = meta.get("objective")
        objective = objective or (obj.get("name") if isinstance(obj, dict) else obj)
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        marker = {}
    if isinstance(marker, dict) and marker.get("status") == "done":
        if "seconds" not in stats and _finite(marker.get("seconds")) is not None:
            stats["seconds"] = marker["seconds"]
            stats["seconds_source"] = "subprocess wall-clock (includes start-up)"
        if _finite(marker.get("cpu_seconds")) is not None:
            stats["process_cpu_seconds"] = marker["cpu_seconds"]  # the whole subprocess, start-up included
    if "images_per_sec" not in stats and stats.get("images_seen") and _finite(stats.get("seconds")):
        stats["images_per_sec"] = float(stats["images_seen"]) / max(float(stats["seconds"]), 1e-9)
    return stats, (str(objective) if objective else None)


def read_loss_curve(output_dir: str | Path) -> tuple[Optional[str], list[tuple[int, float]]]:
    """(tag, [(step, loss)]) of the training loss in `output_dir/tb` (TensorBoard events), or (None, [])."""
    tb = Path(output_dir) / "tb"
    if not tb.is_dir():
        return None, []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return None, []
    # Accelerate's tracker may write into tb/ or a subfolder of it; a resumed run adds files to the same one.
    folders = sorted({p.parent for p in tb.rglob("events.out.tfevents.*")})
    series: dict[str, dict[int, float]] = {}
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        try:
            acc.Reload()
        except Exception:  # noqa: BLE001 - a truncated event file (crash) must not break the report
            continue
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                series.setdefault(tag, {})[int(event.step)] = float(event.value)  # resumed steps: last wins
    tag = _pick_loss_tag(list(series))
    if tag is None:
        return None, []
    return tag, sorted(series[tag].items())


def _pick_loss_tag(tags: list[str]) -> Optional[str]:
    for tag in _LOSS_TAGS:
        if tag in tags:
            return tag
    losses = sorted(t for t in tags if t.rsplit("/", 1)[-1] == "loss" and not t.startswith(("eval", "val")))
    return losses[0] if losses else None


def machine_description() -> str:
    """Where the numbers were measured: CPU model and cores, GPU if any (for the results header)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    desc = f"{cpu}, {cores} CPU cores available"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f", {torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover
        pass
    return desc


def _budget_text(plan: ComparePlan) -> dict[str, Any]:
    b = plan.budget
    return {"kind": b.kind, "images": b.images, "seconds": b.seconds, "epochs": b.epochs}


def collect(
    plan: ComparePlan,
    runs: list[Run],
    statuses: Optional[dict[str, RunStatus]] = None,
    machine: Optional[str] = None,
) -> Results:
    """Every row and cell of the comparison, from the files the runs left (statuses explain the gaps)."""
    statuses = statuses or {}
    columns = [(ev.name or ev.protocol, ev.protocol) for ev in plan.evaluations]  # type: ignore[union-attr]
    launcher = plan.launcher
    launch = "python" if launcher.kind == "python" else (
        f"accelerate launch (config {launcher.config_file or 'default'}, "
        f"processes {launcher.num_processes or 'default'})"
    )
    results = Results(
        name=plan.name,
        description=plan.description,
        created=time.strftime("%Y-%m-%d %H:%M"),
        machine=machine if machine is not None else machine_description(),
        shared=flatten_overrides(plan.shared),
        seeds=list(plan.seeds),
        budget=_budget_text(plan),
        launcher=launch,
        columns=columns,
        methods=[],
        column_seeds={ev.name or ev.protocol: list(ev.seeds) for ev in plan.evaluations if ev.seeds},
        pretrain_seeds=list(plan.pretrain_seeds) if plan.pretrain_seeds is not None else None,
    )
    by_id = {r.id: r for r in runs}
    rows: dict[str, list[Run]] = {}  # method -> its pretraining runs (one per seed), in plan order
    for run in runs:
        if run.kind != "eval":
            rows.setdefault(run.method, []).append(run)
    for name, pre_runs in rows.items():
        per_run = [_method_result(run, statuses.get(run.id), by_id) for run in pre_runs]
        for run, m in zip(pre_runs, per_run):
            if m.status not in ("ok", "not run"):
                results.problems.append(f"{run.id}: {m.status}: {m.error}")
        method = _merge_methods(pre_runs, per_run)
        if method.evaluated:
            for column, protocol in columns:
                cells = []
                for run, m in zip(pre_runs, per_run):
                    eval_run = by_id.get(f"eval/{run.label or run.method}/{column}")
                    cell = _cell(eval_run, column, protocol, statuses)
                    cells.append((run, eval_run, cell))
                    if cell.status not in ("ok", "not run") and not (cell.status == "blocked" and m.status != "ok"):
                        results.problems.append(f"eval/{run.label or run.method}/{column}: {cell.status}: {cell.error}")
                method.evals[column] = _merge_cells(column, protocol, cells)
        results.methods.append(method)
    compare_to_best(results)
    return results


def _method_result(run: Run, status: Optional[RunStatus], by_id: dict[str, Run]) -> MethodResult:
    if run.kind == "checkpoint":
        kind = "random" if run.checkpoint == "random" else "checkpoint"
        method = MethodResult(name=run.method, kind=kind, evaluated=run.evaluate,
                              objective="random init" if kind == "random" else None)
        if kind == "checkpoint" and run.checkpoint:
            stats, objective = pretrain_stats(Path(run.checkpoint) if Path(run.checkpoint).is_dir()
                                              else Path(run.checkpoint).parent)
            method.pretrain, method.objective = stats, objective or "external"
        return method
    method = MethodResult(name=run.method, kind="pretrain", budget=dict(run.budget), exceptions=list(run.exceptions),
                          uses=[by_id[d].method if d in by_id else d.split("/", 1)[1] for d in run.depends],
                          evaluated=run.evaluate)
    if status is not None and status.state == "unselected" and not outputs_exist(run):
        method.status, method.error = "not run", status.detail
    elif status is not None and status.state in ("failed", "blocked"):
        method.status, method.error = status.state, status.detail + (f" (log: {status.log})" if status.log else "")
    elif not outputs_exist(run):
        method.status, method.error = "missing", f"no backbone.safetensors/backbone.json in {run.output_dir}"
    method.pretrain, method.objective = pretrain_stats(run.output_dir)
    method.loss_tag, method.loss_curve = read_loss_curve(run.output_dir)
    return method


# The row's status when its runs disagree: the worst one.
_WORST = ("failed", "blocked", "missing", "invalid", "not run", "ok")


def _merge_methods(runs: list[Run], per_run: list[MethodResult]) -> MethodResult:
    """One row from a method's pretraining runs (one per seed): the first run's settings, averaged costs."""
    method = dataclasses.replace(per_run[0], evals={})
    method.seeds = [r.seed for r in runs]
    method.runs = [{"seed": r.seed, "label": r.label or r.method, "status": m.status, "error": m.error,
                    "pretrain": m.pretrain, "path": str(r.output_dir) if r.kind == "pretrain" else r.checkpoint}
                   for r, m in zip(runs, per_run)]
    method.loss_curves = {r.label or r.method: m.loss_curve for r, m in zip(runs, per_run) if m.loss_curve}
    method.loss_tag = next((m.loss_tag for m in per_run if m.loss_tag), None)
    method.loss_curve = next(iter(method.loss_curves.values()), [])
    method.objective = next((m.objective for m in per_run if m.objective), None)
    if len(per_run) > 1:
        method.status = min((m.status for m in per_run), key=lambda s: _WORST.index(s) if s in _WORST else 0)
        bad = [(r, m) for r, m in zip(runs, per_run) if m.status != "ok"]
        method.error = "; ".join(f"seed {r.seed}: {m.error}" for r, m in bad) or None
        done = [m.pretrain for m in per_run if m.status == "ok" and m.pretrain] or [per_run[0].pretrain]
        method.pretrain = dict(done[0])
        for key in ("seconds", "images_per_sec", "process_cpu_seconds"):  # per run, averaged over the runs
            values = [_finite(p.get(key)) for p in done]
            values = [v for v in values if v is not None]
            if values:
                method.pretrain[key] = sum(values) / len(values)
        method.pretrain["runs"] = len(done)
    return method


def _run_entry(run: Optional[Run], cell: EvalResult, seed: Optional[int]) -> dict[str, Any]:
    return {"pretrain_seed": seed, "label": (run.label or run.method) if run else None, "status": cell.status,
            "top1": cell.top1, "top1_std": cell.top1_std, "top5": cell.top5, "seeds": cell.seeds,
            "per_seed": cell.per_seed, "path": cell.path, "error": cell.error}


def _merge_cells(column: str, protocol: str, cells: list[tuple[Run, Optional[Run], EvalResult]]) -> EvalResult:
    """One cell from a method's runs of one protocol: mean, std and t-interval over them."""
    entries: list[dict[str, Any]] = []
    spread = "pretraining seeds"
    for pre, eval_run, cell in cells:
        if eval_run is not None and eval_run.seeds_are_inits and cell.status == "ok" and cell.per_seed:
            spread = "init seeds"  # a random init: each eval seed drew its own backbone, so each is a run
            for r in cell.per_seed:
                one = dataclasses.replace(cell, top1=r["top1"], top5=r["top5"], top1_std=None, seeds=[r["seed"]],
                                          per_seed=[r])
                entries.append(_run_entry(eval_run, one, r["seed"]))
        else:
            entries.append(_run_entry(eval_run, cell, pre.seed))
    done = [c for _, _, c in cells if c.status == "ok"]
    ok = [e for e in entries if e["status"] == "ok"]
    if not ok:
        worst = min((c for _, _, c in cells), key=lambda c: _WORST.index(c.status) if c.status in _WORST else 0)
        merged = dataclasses.replace(worst, runs=entries, n=0)
        if len(cells) > 1:
            merged.error = "; ".join(f"{e['label']}: {e['error']}" for e in entries if e["error"])
        return merged
    base = done[0]
    if len(entries) == 1:  # one run: as its metrics.json, with its eval seeds' spread
        return dataclasses.replace(base, runs=entries, n=1, spread="eval seeds",
                                   eval_std=base.top1_std if len(base.seeds) > 1 else None)
    summary = summarize([e["top1"] for e in ok])
    top5 = [e["top5"] for e in ok if e["top5"] is not None]
    eval_stds = [e["top1_std"] for e in ok if e["top1_std"] is not None and len(e["seeds"]) > 1]
    seconds = [c.seconds for c in done if c.seconds is not None]
    return dataclasses.replace(
        base,
        top1=summary.mean,
        top1_std=summary.std,
        top5=summarize(top5).mean if len(top5) == len(ok) else None,
        top5_std=summarize(top5).std if len(top5) == len(ok) else None,
        seeds=sorted({s for e in ok for s in e["seeds"]}) if spread == "init seeds" else base.seeds,
        seconds=sum(seconds) / len(seconds) if seconds else None,
        n=summary.n,
        spread=spread,
        ci95=[summary.ci_low, summary.ci_high] if summary.std is not None else None,
        # The eval seeds' spread inside a run, pooled over the runs (root mean square of their stds).
        eval_std=math.sqrt(sum(v * v for v in eval_stds) / len(eval_stds)) if eval_stds else None,
        runs=entries,
        error="; ".join(f"{e['label']}: {e['status']}: {e['error']}" for e in entries if e["status"] != "ok") or None,
    )


def run_values(cell: EvalResult) -> list[float]:
    """The cell's per-run top-1 (one per pretraining or init seed) that its mean is made of."""
    return [e["top1"] for e in cell.runs if e.get("status") == "ok" and e.get("top1") is not None]


def compare_to_best(results: Results) -> None:
    """Mark each column's best mean, and test every other cell against it (Welch, over the runs)."""
    for column, _ in results.columns:
        cells = [m.evals[column] for m in results.methods
                 if m.evaluated and column in m.evals and m.evals[column].status == "ok"
                 and m.evals[column].top1 is not None]
        if len(cells) < 2:
            continue
        top = max(c.top1 for c in cells)  # type: ignore[type-var]
        bests = [c for c in cells if c.top1 == top]
        for cell in cells:
            cell.best = cell in bests
            if cell.best:
                continue
            tests = [welch(run_values(cell), run_values(b)) for b in bests]
            tests = [t for t in tests if t is not None]
            if tests:
                cell.p_vs_best = max(t.p for t in tests)
                cell.within_noise = cell.p_vs_best >= results.alpha


def _cell(run: Optional[Run], column: str, protocol: str, statuses: dict[str, RunStatus]) -> EvalResult:
    if run is None:
        return EvalResult(column=column, protocol=protocol, error="not in the plan")
    status = statuses.get(run.id)
    if status is not None and status.state == "unselected":
        return EvalResult(column=column, protocol=protocol, status="not run", error=status.detail)
    if status is not None and status.state in ("failed", "blocked"):
        cell = EvalResult(column=column, protocol=protocol, status=status.state, path=str(run.output_dir))
        cell.error = status.detail + (f" (log: {status.log})" if status.log else "")
        return cell
    return read_metrics(run.output_dir / "metrics.json", column, protocol)
