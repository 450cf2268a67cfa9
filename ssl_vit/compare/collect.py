"""Gather what a comparison produced: every metrics.json, each pretraining's compute and loss curve.

Nothing here runs a model: it reads `metrics.json` (the eval recipes' contract), `backbone.json` (the
pretraining export), the runner's `compare_run.json` markers, and TensorBoard event files. A file that
is missing or malformed becomes an error in its cell, never an exception, so one broken entry cannot
keep the rest of the table from being written.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ssl_vit.compare.plan import ComparePlan, Run, flatten_overrides
from ssl_vit.compare.runner import MARKER, RunStatus

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
    """One cell of the table: a method judged by one protocol, mean and std over seeds."""

    column: str
    protocol: str
    status: str = "missing"  # "ok", "failed", "blocked", "missing", "invalid"
    top1: Optional[float] = None
    top1_std: Optional[float] = None
    top5: Optional[float] = None
    top5_std: Optional[float] = None
    seeds: list[int] = field(default_factory=list)
    seconds: Optional[float] = None
    error: Optional[str] = None
    path: Optional[str] = None
    extra: dict = field(default_factory=dict)  # by_k, hyperparameters, n_train, n_eval


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
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    evals: dict[str, EvalResult] = field(default_factory=dict)


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

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["columns"] = [{"name": n, "protocol": p} for n, p in self.columns]
        for m in d["methods"]:
            m.pop("loss_curve", None)  # plotted, and too long for the JSON summary
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
    )
    by_id = {r.id: r for r in runs}
    for run in runs:
        if run.kind == "eval":
            continue
        method = _method_result(run, statuses.get(run.id))
        if method.status not in ("ok", "not run"):
            results.problems.append(f"{run.id}: {method.status}: {method.error}")
        if run.evaluate:
            for column, protocol in columns:
                eval_run = by_id.get(f"eval/{run.method}/{column}")
                cell = _cell(eval_run, column, protocol, statuses)
                method.evals[column] = cell
                if cell.status not in ("ok", "not run") and not (cell.status == "blocked" and method.status != "ok"):
                    results.problems.append(f"eval/{run.method}/{column}: {cell.status}: {cell.error}")
        results.methods.append(method)
    return results


def _method_result(run: Run, status: Optional[RunStatus]) -> MethodResult:
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
                          uses=[d.split("/", 1)[1] for d in run.depends], evaluated=run.evaluate)
    from ssl_vit.compare.runner import outputs_exist

    if status is not None and status.state == "unselected" and not outputs_exist(run):
        method.status, method.error = "not run", status.detail
    elif status is not None and status.state in ("failed", "blocked"):
        method.status, method.error = status.state, status.detail + (f" (log: {status.log})" if status.log else "")
    elif not outputs_exist(run):
        method.status, method.error = "missing", f"no backbone.safetensors/backbone.json in {run.output_dir}"
    method.pretrain, method.objective = pretrain_stats(run.output_dir)
    method.loss_tag, method.loss_curve = read_loss_curve(run.output_dir)
    return method


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
