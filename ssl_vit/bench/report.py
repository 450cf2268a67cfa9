"""Turning timings into rows, ratios and targets; the markdown table and the JSON file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ssl_vit.bench.timing import Case

__all__ = [
    "TARGETS",
    "case_rows",
    "compare",
    "comparisons",
    "markdown",
    "scaling_rows",
    "targets",
    "write_json",
]

# (faster case, slower case, threshold on the images/s ratio, what it checks): issue 10's targets.
TARGETS: list[tuple[str, str, float, str]] = [
    ("supervised/ours", "supervised/timm", 0.97, "supervised step vs timm + plain AdamW"),
    ("mae/ours", "mae/hf", 1.05, "MAE step vs HF ViTMAEForPreTraining"),
    ("mae/ours", "supervised/ours", 2.0, "MAE (mask 0.75) vs supervised, same backbone"),
]
# Ours vs reference within a group, reported without a threshold when not in TARGETS.
PAIRS: list[tuple[str, str]] = [
    ("backbone/ours", "backbone/timm"),
    ("supervised/ours", "supervised/timm"),
    ("mae/ours", "mae/hf"),
    ("deit/ours", "deit/timm"),
    ("eval/ours", "eval/timm"),
    ("mae/ours", "supervised/ours"),
]


def case_rows(
    cases: list[Case],
    times: dict[str, list[float]],
    flops: dict[str, int],
    memory: dict[str, dict[str, Any]],
    peak_flops: float,
) -> list[dict[str, Any]]:
    """One row per case: median step time, images/s, FLOPs, achieved FLOP/s and fraction of peak, memory."""
    rows = []
    for case in cases:
        rounds = times[case.name]
        step_s = statistics.median(rounds)
        row: dict[str, Any] = {
            "name": case.name,
            "group": case.group,
            "role": case.role,
            "images_per_step": case.images,
            "step_ms": step_s * 1e3,
            "step_ms_rounds": [t * 1e3 for t in rounds],
            "images_per_s": case.images / step_s,
        }
        if case.name in flops:
            f = flops[case.name]
            row.update(
                flops_per_step=f,
                gflop_per_image=f / case.images / 1e9,
                achieved_flops_per_s=f / step_s,
                fraction_of_peak=(f / step_s) / peak_flops if peak_flops > 0 else None,
            )
        if case.name in memory:
            row["memory"] = memory[case.name]
        row["info"] = case.info
        rows.append(row)
    return rows


def compare(cases: dict[str, Case], times: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
    """images/s of `a` over images/s of `b`: the median of the per-round ratios (and their spread)."""
    ratios = [
        (cases[a].images / ta) / (cases[b].images / tb) for ta, tb in zip(times[a], times[b])
    ]
    return {
        "a": a,
        "b": b,
        "ratio": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
    }


def comparisons(cases: list[Case], times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Every known pair whose two cases both ran."""
    by_name = {c.name: c for c in cases}
    return [compare(by_name, times, a, b) for a, b in PAIRS if a in by_name and b in by_name]


def targets(comps: list[dict[str, Any]], scaling: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Issue 10's targets that this run measured, each with its value and whether it is met."""
    found = {(c["a"], c["b"]): c["ratio"] for c in comps}
    out = []
    for a, b, threshold, what in TARGETS:
        if (a, b) in found:
            value = found[(a, b)]
            out.append({"target": what, "value": value, "threshold": threshold, "met": value >= threshold})
    if scaling:
        first = [r for r in scaling if r["img_size"] == scaling[0]["img_size"] and r["encoder_ms"] is not None]
        first.sort(key=lambda r: r["mask_ratio"])
        if len(first) > 1:
            times = [r["encoder_ms"] for r in first]
            out.append({
                "target": "encoder time falls as the mask ratio rises",
                "value": " > ".join(f"{t:.0f}" for t in times) + " ms",
                "threshold": "decreasing",
                "met": all(x > y for x, y in zip(times, times[1:])),
            })
    return out


def scaling_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (image size, patch, mask ratio): the step and its encoder, side by side."""
    steps = [r for r in rows if r["name"].startswith("scaling/step/")]
    encoders = {r["name"].replace("scaling/encoder/", ""): r for r in rows if r["name"].startswith("scaling/encoder/")}
    out = []
    for r in steps:
        tag = r["name"].replace("scaling/step/", "")
        info = r["info"]
        enc = encoders.get(tag)
        enc_flops = enc.get("flops_per_step") if enc else None
        out.append({
            "img_size": info["img_size"],
            "patch_size": info["patch_size"],
            "patches": info["patches"],
            "visible": info["visible"],
            "mask_ratio": info["mask_ratio"],
            "batch_size": info["batch_size"],
            "images_per_s": r["images_per_s"],
            "step_ms": r["step_ms"],
            "encoder_ms": enc["step_ms"] if enc else None,
            "encoder_gflop_per_image": enc_flops / info["batch_size"] / 1e9 if enc_flops else None,
            "encoder_flop_share": enc_flops / r["flops_per_step"] if enc_flops and r.get("flops_per_step") else None,
        })
    return out


_MEMORY_KINDS = {
    "cpu_tensors": "live tensors at the step's peak (weights, gradients, optimizer state, activations)",
    "cuda_allocated": "torch.cuda.max_memory_allocated during one step",
}


def _fmt(x: Any, spec: str = ".1f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: machine, training/eval table, ratios vs targets, scaling, profile."""
    lines = [f"**Machine:** {report['label']}"]
    machine = report.get("machine", {})
    loads = [machine[k] for k in ("load_average_1min", "load_average_1min_end") if machine.get(k) is not None]
    load, cores = (max(loads) if loads else None), machine.get("cores")
    if load is not None and cores and load > cores:
        lines.append(
            f"**Warning:** the machine was busy (load average {load:.1f} on {cores} cores): timings are noisy and "
            f"multi-threaded kernels suffer most; re-measure when it is quiet, or compare with --threads 1."
        )
    peak = report.get("matmul_peak")
    if peak:
        backends = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak["by_backend"].items())
        lines.append(
            f"**Matmul peak:** {peak['flops_per_s'] / 1e9:.0f} GFLOP/s ({peak['dtype']} {peak['size']}^3 GEMM; "
            f"by backend: {backends} GFLOP/s)"
        )
    settings = report.get("settings", {})
    if settings:
        lines.append("**Settings:** " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    rows = [r for r in report.get("cases", []) if not r["name"].startswith("scaling/")]
    if rows:
        several = len({r.get("model") for r in rows}) > 1  # name the model when more than one ran
        lines += [
            "",
            "| case | img/s | ms/step | GFLOP/img | achieved GFLOP/s | % of matmul peak | peak memory MiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            mem = r.get("memory")
            frac = r.get("fraction_of_peak")
            achieved = r["achieved_flops_per_s"] / 1e9 if "achieved_flops_per_s" in r else None
            cells = [
                f"{r['name']} ({r['model']})" if several else r["name"],
                f"{r['images_per_s']:.1f}",
                f"{r['step_ms']:.0f}",
                _fmt(r.get("gflop_per_image"), ".2f"),
                _fmt(achieved, ".0f"),
                _fmt(frac * 100 if frac is not None else None, ".0f"),
                f"{mem['peak_mib']:.0f}" if mem else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    kinds = {r["memory"]["kind"] for r in rows if r.get("memory")}
    if kinds:
        lines.append("")
        lines.append("Peak memory: " + "; ".join(_MEMORY_KINDS.get(k, k) for k in sorted(kinds)) + ".")
    comps = report.get("comparisons", [])
    if comps:
        lines += [
            "",
            "| ratio of images/s (median of per-round ratios) | value | range | rounds |",
            "|---|---:|---:|---:|",
        ]
        several = len({c.get("model") for c in comps}) > 1
        for c in comps:
            what = f"{c['a']} / {c['b']}" + (f" ({c['model']})" if several else "")
            lines.append(f"| {what} | {c['ratio']:.2f}x | {c['min']:.2f}-{c['max']:.2f} | {c['rounds']} |")
    tg = report.get("targets", [])
    if tg:
        lines += ["", "| target | measured | needs | met |", "|---|---:|---:|:---:|"]
        for t in tg:
            value = f"{t['value']:.2f}x" if isinstance(t["value"], float) else t["value"]
            need = f">= {t['threshold']}x" if isinstance(t["threshold"], float) else t["threshold"]
            lines.append(f"| {t['target']} | {value} | {need} | {'yes' if t['met'] else 'NO'} |")
    sc = report.get("scaling", [])
    if sc:
        lines += [
            "",
            "| MAE image | patch | patches (visible) | mask | img/s | ms/step | encoder ms | encoder GFLOP/img "
            "| encoder share of FLOPs |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in sc:
            share = s["encoder_flop_share"]
            lines.append(
                f"| {s['img_size']} | {s['patch_size']} | {s['patches']} ({s['visible']}) | {s['mask_ratio']:g} | "
                f"{s['images_per_s']:.1f} | {s['step_ms']:.0f} | {_fmt(s['encoder_ms'], '.0f')} | "
                f"{_fmt(s['encoder_gflop_per_image'], '.3f')} | "
                f"{_fmt(share * 100 if share is not None else None, '.0f')}% |"
            )
    prof = report.get("profile")
    if prof:
        lines += ["", f"Profile of {prof['case']} ({prof['step_ms']:.0f} ms/step under the profiler):", "",
                  "| kind of work | ms/step | share |", "|---|---:|---:|"]
        for kind, ms in prof["ms_per_step"].items():
            lines.append(f"| {kind} | {ms:.1f} | {prof['shares'][kind] * 100:.1f}% |")
    return "\n".join(lines) + "\n"


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report (machine, settings, rows, ratios, targets) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path
