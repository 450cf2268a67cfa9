"""Write a comparison's results: `results.md` (the table), `results.csv` (one row per cell),
`results_runs.csv` (one row per pretraining seed and eval seed: the raw numbers) and `results.json`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

from ssl_vit.compare.collect import EvalResult, MethodResult, Results
from ssl_vit.compare.stats import t_quantile

__all__ = ["WITHIN_NOISE", "budget_text", "format_cell", "format_seconds", "markdown_table", "write_results"]

WITHIN_NOISE = "≈"  # a cell's mark: its gap to the column's best is within noise


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


def format_cell(cell: Optional[EvalResult], planned: int = 1) -> str:
    """Top-1 (percent) as the table shows it, or what went wrong in a word.

    Over 2+ runs (pretraining or init seeds): `mean ± std [95% interval]`, with `(n=k)` when k differs
    from the `planned` number of pretraining seeds. One run: `mean ± std` over its eval seeds when the
    plan has one pretraining seed, else `mean (n=1)`.
    """
    if cell is None:
        return "-"
    if cell.status == "ok" and cell.top1 is not None:
        if cell.n >= 2 and cell.top1_std is not None and cell.ci95:
            text = f"{cell.top1:.1f} ± {cell.top1_std:.1f} [{cell.ci95[0]:.1f}, {cell.ci95[1]:.1f}]"
            return text + (f" (n={cell.n})" if cell.n != planned else "")
        if planned > 1:
            return f"{cell.top1:.1f} (n=1)"
        if len(cell.seeds) > 1 and cell.top1_std is not None:
            return f"{cell.top1:.1f} ± {cell.top1_std:.1f}"
        return f"{cell.top1:.1f}"
    return {"failed": "FAILED", "blocked": "blocked", "invalid": "INVALID", "not run": "not run"}.get(
        cell.status, "missing"
    )


def _planned(results: Results) -> int:
    return len(results.pretrain_seeds) if results.pretrain_seeds else 1


def _marked(cell: Optional[EvalResult], planned: int) -> str:
    """The cell with its marks: bold for the column's best, WITHIN_NOISE when its gap to it is noise."""
    text = format_cell(cell, planned)
    if cell is None or cell.status != "ok":
        return text
    if cell.best:
        return f"**{text}**"
    return f"{text} {WITHIN_NOISE}" if cell.within_noise else text


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


def _label(m: MethodResult) -> str:
    if m.status in ("ok", "not run"):
        return m.name
    bad = [r["seed"] for r in m.runs if r["status"] not in ("ok", "not run")]
    if len(m.runs) > 1 and len(bad) < len(m.runs):  # some seeds made it: say which did not
        return f"{m.name} (pretraining seed {', '.join(str(s) for s in bad)} {m.status.upper()})"
    return f"{m.name} (pretraining {m.status.upper()})"


def markdown_table(results: Results) -> str:
    """The method x protocol table (top-1 %: mean over pretraining seeds ± std [95% t-interval], or mean
    ± std over eval seeds with one pretraining seed) with each method's compute."""
    cols = results.columns
    planned = _planned(results)
    per_run = " (per run)" if planned > 1 else ""
    head = ["method", *[f"{name} top-1" for name, _ in cols], "budget", "steps", "images seen",
            f"wall-clock{per_run}", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in results.methods:
        if not m.evaluated:
            continue
        cells = [_marked(m.evals.get(name), planned) for name, _ in cols]
        label = _label(m)
        p = m.pretrain
        compute = [budget_text(m), _int(p.get("steps")), _int(p.get("images_seen")),
                   format_seconds(p.get("seconds")), _int(p.get("images_per_sec"))]
        if m.kind == "random":
            compute = [budget_text(m), "-", "-", "-", "-"]
        lines.append("| " + " | ".join([label, *cells, *compute]) + " |")
    return "\n".join(lines)


def _seed_lines(results: Results) -> list[str]:
    """The header lines that say what the cells are made of: seeds, interval, test."""
    evals = str(results.seeds) + "".join(f"; {c}: {s}" for c, s in results.column_seeds.items())
    planned = _planned(results)
    if results.pretrain_seeds is None or planned < 2:
        seed = f" {results.pretrain_seeds[0]}" if results.pretrain_seeds else ""
        return [
            f"- Evaluation seeds: {evals} (cells: top-1 % on the eval split, mean ± std over the seeds; bold: best)",
            f"- Pretraining: one run per method (seed{seed or ' of its config'}): no interval over pretraining "
            "seeds and no test of the gaps (set `pretrain_seeds: [0, 1, 2]` in the plan for both)",
        ]
    t = t_quantile(0.5 + results.confidence / 2, planned - 1)
    return [
        f"- Pretraining seeds: {results.pretrain_seeds}: every pretraining runs once per seed (init, data order, "
        f"masks); a random init is drawn once per seed (its init seed, which is also its eval seed)",
        f"- Evaluation seeds: {evals}: each run's value is its mean over them (their spread: per-run table)",
        f"- Cells: top-1 % on the eval split, mean over the n = {planned} runs ± their std "
        f"[{results.confidence:.0%} t-interval: mean ± t({0.5 + results.confidence / 2:g}, n-1)·std/√n, "
        f"t = {t:.2f}; `(n=k)`: only k runs finished]. Bold: the column's best mean; {WITHIN_NOISE}: the gap to "
        f"the best is within noise ({results.test}, against the best: p ≥ {results.alpha:g}); no mark: "
        f"behind the best beyond noise, or not tested (fewer than 2 runs on a side, or no spread in either)",
    ]


def _gap_lines(results: Results) -> list[str]:
    """Each column's best and every other method's gap to it, with the test's p-value."""
    lines = []
    for column, _ in results.columns:
        cells = [(m.name, m.evals[column]) for m in results.methods
                 if m.evaluated and column in m.evals and m.evals[column].status == "ok"]
        bests = [(n, c) for n, c in cells if c.best]
        if not bests:
            continue
        best = bests[0][1]
        gaps = []
        for name, cell in sorted(cells, key=lambda nc: -(nc[1].top1 or 0.0)):
            if cell.best:
                continue
            gap = f"{name} {cell.top1 - best.top1:+.1f}"  # type: ignore[operator]
            if cell.p_vs_best is None:
                why = f"n = {cell.n} vs {best.n}" if min(cell.n, best.n) < 2 else "no spread over either side's runs"
                gaps.append(f"{gap} (not tested: {why})")
            else:
                verdict = "within noise" if cell.within_noise else "beyond noise"
                gaps.append(f"{gap} (p = {cell.p_vs_best:.3f}: {verdict})")
        lines.append(f"- {column}: best {', '.join(n for n, _ in bests)} {best.top1:.1f}; " + "; ".join(gaps))
    return lines


def _run_table(results: Results) -> list[str]:
    """One row per method and pretraining (or init) seed: each run's top-1, mean ± std over its eval seeds."""
    cols = [name for name, _ in results.columns]
    lines = ["| method | seed | " + " | ".join(f"{c} top-1" for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for m in results.methods:
        if not m.evaluated:
            continue
        seeds: list[Any] = []
        for cell in m.evals.values():
            seeds += [e["pretrain_seed"] for e in cell.runs if e["pretrain_seed"] not in seeds]
        for seed in seeds:
            texts = []
            for c in cols:
                entry = next((e for e in m.evals[c].runs if e["pretrain_seed"] == seed), None) if c in m.evals else None
                if entry is None:
                    texts.append("-")
                elif entry["status"] != "ok" or entry["top1"] is None:
                    texts.append(entry["status"])
                elif len(entry["seeds"]) > 1 and entry["top1_std"] is not None:
                    texts.append(f"{entry['top1']:.1f} ± {entry['top1_std']:.1f}")
                else:
                    texts.append(f"{entry['top1']:.1f}")
            lines.append(f"| {m.name} | {'config' if seed is None else seed} | " + " | ".join(texts) + " |")
    return lines


def _markdown(results: Results, plots: list[str]) -> str:
    shared = ", ".join(f"`{k}={v}`" for k, v in results.shared.items()) or "(none)"
    parts = [
        f"# Comparison: {results.name}",
        "",
        *( [results.description.strip(), ""] if results.description.strip() else []),
        f"- Date: {results.created}; machine: {results.machine}; launcher: {results.launcher}",
        f"- Shared by every run: {shared}",
        *_seed_lines(results),
        f"- Pretraining budget: {_budget_header(results)}",
        "",
        markdown_table(results),
        "",
    ]
    if _planned(results) > 1:
        parts += ["## Gaps to each column's best", "", *_gap_lines(results), "",
                  "## Per run (each pretraining or init seed; ± over its eval seeds)", "", *_run_table(results), ""]
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
    "method", "kind", "objective", "column", "protocol", "status", "top1", "top1_std", "top1_ci95_low",
    "top1_ci95_high", "n_runs", "spread", "pretrain_seeds", "eval_std", "best", "p_vs_best", "within_noise",
    "top5", "top5_std", "n_seeds", "eval_seconds", "pretrain_status", "pretrain_steps", "pretrain_images_seen",
    "pretrain_seconds", "pretrain_images_per_sec", "budget", "error",
]
_RUN_FIELDS = ["method", "run", "pretrain_seed", "column", "protocol", "status", "eval_seed", "top1", "top5", "path",
               "error"]


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
                "top1_std": cell.top1_std, "top1_ci95_low": cell.ci95[0] if cell.ci95 else None,
                "top1_ci95_high": cell.ci95[1] if cell.ci95 else None, "n_runs": cell.n, "spread": cell.spread,
                "pretrain_seeds": " ".join(str(e["pretrain_seed"]) for e in cell.runs if e["status"] == "ok"),
                "eval_std": cell.eval_std, "best": cell.best, "p_vs_best": cell.p_vs_best,
                "within_noise": cell.within_noise, "top5": cell.top5, "top5_std": cell.top5_std,
                "n_seeds": len(cell.seeds), "eval_seconds": cell.seconds,
                "error": cell.error or (m.error if m.status != "ok" else None),
            })
    return rows


def _run_rows(results: Results) -> list[dict[str, Any]]:
    """Long format: one row per (method, pretraining seed, column, eval seed), for one's own statistics."""
    rows = []
    for m in results.methods:
        for name, cell in m.evals.items():
            for e in cell.runs:
                base = {"method": m.name, "run": e["label"], "pretrain_seed": e["pretrain_seed"], "column": name,
                        "protocol": cell.protocol, "status": e["status"], "path": e["path"], "error": e["error"]}
                if e["status"] != "ok" or not e["per_seed"]:
                    rows.append({**base, "top1": e["top1"], "top5": e["top5"]})
                for r in e["per_seed"] if e["status"] == "ok" else []:
                    rows.append({**base, "eval_seed": r["seed"], "top1": r["top1"], "top5": r["top5"]})
    return rows


def _csv(fields: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_results(results: Results, out: str | Path, plots: Optional[list[str]] = None) -> list[Path]:
    """results.md, results.csv, results_runs.csv and results.json in `out` (each written whole, then renamed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name: str, text: str) -> None:
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
        written.append(out / name)

    put("results.md", _markdown(results, plots or []))
    put("results.csv", _csv(_CSV_FIELDS, _csv_rows(results)))
    put("results_runs.csv", _csv(_RUN_FIELDS, _run_rows(results)))
    data = results.to_dict()
    data["plots"] = [Path(p).name for p in plots or []]
    put("results.json", json.dumps(data, indent=2, default=str) + "\n")
    return written
