"""Write a comparison's results: `results.md` (the table), `results.csv` (long format), `results.json`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

from ssl_vit.compare.collect import EvalResult, MethodResult, Results

__all__ = ["budget_text", "format_cell", "format_seconds", "markdown_table", "write_results"]


def format_seconds(seconds: Optional[float]) -> str:
    """`75.2` -> `1m 15s`; `4000` -> `1h 06m`; None -> `-`."""
    if seconds is None:
        return "-"
    s = int(round(float(seconds)))
    if s < 60:
        return f"{float(seconds):.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s % 3600) // 60:02d}m"


def _int(x: Any) -> str:
    try:
        return f"{int(round(float(x))):,}"
    except (TypeError, ValueError):
        return "-"


def format_cell(cell: Optional[EvalResult]) -> str:
    """`mean ± std` of top-1 (percent), or what went wrong in a word."""
    if cell is None:
        return "-"
    if cell.status == "ok" and cell.top1 is not None:
        if len(cell.seeds) > 1 and cell.top1_std is not None:
            return f"{cell.top1:.1f} ± {cell.top1_std:.1f}"
        return f"{cell.top1:.1f}"
    return {"failed": "FAILED", "blocked": "blocked", "invalid": "INVALID", "not run": "not run"}.get(
        cell.status, "missing"
    )


def budget_text(method: MethodResult) -> str:
    """What the budget gave this method, e.g. `20,000 img = 312 steps x 64`."""
    if method.kind == "random":
        return "none (random init)"
    if method.kind == "checkpoint":
        return "external checkpoint"
    b = method.budget
    kind = b.get("kind")
    if kind == "images":
        text = f"{_int(b.get('images_given'))} img = {_int(b.get('steps'))} steps x {b.get('images_per_step')}"
    elif kind == "seconds":
        text = f"{format_seconds(b.get('seconds'))} wall-clock"
    elif kind == "epochs":
        text = f"{b.get('epochs')} epochs"
    else:
        text = "own config"
    return text + "".join(f" + {u}'s" for u in method.uses)  # e.g. a DeiT student's teacher


def _budget_header(results: Results) -> str:
    b = results.budget
    if b.get("kind") == "images":
        return f"equal images seen: {_int(b.get('images'))} images per pretraining (max_steps = images / batch)"
    if b.get("kind") == "seconds":
        return f"equal wall-clock: {format_seconds(b.get('seconds'))} per pretraining (train.max_seconds)"
    if b.get("kind") == "epochs":
        return f"equal epochs: {b.get('epochs')} per pretraining"
    return "none: each pretraining runs its own config (not a controlled comparison)"


def markdown_table(results: Results) -> str:
    """The method x protocol table (top-1 %, mean ± std over seeds) with each method's compute."""
    cols = results.columns
    head = ["method", *[f"{name} top-1" for name, _ in cols], "budget", "steps", "images seen", "wall-clock",
            "images/s"]
    best: dict[str, float] = {}
    for name, _ in cols:
        values = [m.evals[name].top1 for m in results.methods
                  if name in m.evals and m.evals[name].status == "ok" and m.evals[name].top1 is not None]
        if len(values) > 1:
            best[name] = max(values)  # type: ignore[type-var]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in results.methods:
        if not m.evaluated:
            continue
        cells = []
        for name, _ in cols:
            cell = m.evals.get(name)
            text = format_cell(cell)
            if cell is not None and cell.top1 is not None and best.get(name) == cell.top1 and cell.status == "ok":
                text = f"**{text}**"
            cells.append(text)
        label = m.name if m.status in ("ok", "not run") else f"{m.name} (pretraining {m.status.upper()})"
        p = m.pretrain
        compute = [budget_text(m), _int(p.get("steps")), _int(p.get("images_seen")),
                   format_seconds(p.get("seconds")), _int(p.get("images_per_sec"))]
        if m.kind == "random":
            compute = [budget_text(m), "-", "-", "-", "-"]
        lines.append("| " + " | ".join([label, *cells, *compute]) + " |")
    return "\n".join(lines)


def _markdown(results: Results, plots: list[str]) -> str:
    shared = ", ".join(f"`{k}={v}`" for k, v in results.shared.items()) or "(none)"
    seeds = str(results.seeds) + "".join(f"; {c}: {s}" for c, s in results.column_seeds.items())
    parts = [
        f"# Comparison: {results.name}",
        "",
        *( [results.description.strip(), ""] if results.description.strip() else []),
        f"- Date: {results.created}; machine: {results.machine}; launcher: {results.launcher}",
        f"- Shared by every run: {shared}",
        f"- Evaluation seeds: {seeds} (cells: top-1 % on the eval split, mean ± std over the seeds; bold: best)",
        f"- Pretraining budget: {_budget_header(results)}",
        "",
        markdown_table(results),
        "",
    ]
    helpers = [m for m in results.methods if not m.evaluated]
    if helpers:
        parts.append("Helper runs (not evaluated; their compute is on top of the methods that use them): "
                     + "; ".join(f"{m.name}: {_int(m.pretrain.get('steps'))} steps, "
                                 f"{format_seconds(m.pretrain.get('seconds'))} ({m.status})" for m in helpers))
        parts.append("")
    exceptions = [f"`{m.name}` overrides {', '.join(f'`{k}`' for k in m.exceptions)}"
                  for m in results.methods if m.exceptions]
    if exceptions:
        parts += ["Exceptions to the shared settings: " + "; ".join(exceptions) + ".", ""]
    if results.problems:
        parts += ["## Problems", "", *[f"- {p}" for p in results.problems], ""]
    for plot in plots:
        parts += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
    return "\n".join(parts)


_CSV_FIELDS = [
    "method", "kind", "objective", "column", "protocol", "status", "top1", "top1_std", "top5", "top5_std",
    "n_seeds", "eval_seconds", "pretrain_status", "pretrain_steps", "pretrain_images_seen", "pretrain_seconds",
    "pretrain_images_per_sec", "budget", "error",
]


def _csv_rows(results: Results) -> list[dict[str, Any]]:
    rows = []
    for m in results.methods:
        base = {
            "method": m.name, "kind": m.kind, "objective": m.objective, "pretrain_status": m.status,
            "pretrain_steps": m.pretrain.get("steps"), "pretrain_images_seen": m.pretrain.get("images_seen"),
            "pretrain_seconds": m.pretrain.get("seconds"), "pretrain_images_per_sec": m.pretrain.get("images_per_sec"),
            "budget": budget_text(m),
        }
        if not m.evals:
            rows.append({**base, "status": m.status, "error": m.error})
        for name, cell in m.evals.items():
            rows.append({
                **base, "column": name, "protocol": cell.protocol, "status": cell.status, "top1": cell.top1,
                "top1_std": cell.top1_std, "top5": cell.top5, "top5_std": cell.top5_std, "n_seeds": len(cell.seeds),
                "eval_seconds": cell.seconds, "error": cell.error or (m.error if m.status != "ok" else None),
            })
    return rows


def write_results(results: Results, out: str | Path, plots: Optional[list[str]] = None) -> list[Path]:
    """results.md, results.csv and results.json in `out` (each written whole, then renamed into place)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name: str, text: str) -> None:
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
        written.append(out / name)

    put("results.md", _markdown(results, plots or []))
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(_csv_rows(results))
    put("results.csv", buf.getvalue())
    data = results.to_dict()
    data["plots"] = [Path(p).name for p in plots or []]
    put("results.json", json.dumps(data, indent=2, default=str) + "\n")
    return written
