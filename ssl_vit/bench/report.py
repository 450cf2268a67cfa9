"""Turning timings into rows, ratios and targets; the markdown table and the JSON file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ssl_vit.bench.timing import Case

__all__ = [
    "CROSS_TARGETS",
    "PEAK_TARGETS",
    "RATIO_TARGETS",
    "TARGETS",
    "case_rows",
    "compare",
    "comparisons",
    "loss_checks",
    "markdown",
    "scaling_rows",
    "targets",
    "write_json",
]

# Issue 19's targets, on like-for-like ratios (both sides on the same linear path; the smallest of a
# group's like-for-like ratios counts): (group, what it checks, threshold, aim).
RATIO_TARGETS: list[tuple[str, str, float, float | None]] = [
    ("supervised", "supervised step vs timm's plain loop (like-for-like)", 1.00, None),
    ("mae", "MAE step vs HF ViTMAEForPreTraining (like-for-like)", 1.05, 1.10),
]
# (faster case, slower case, threshold, aim, what it checks): images/s of two of our own steps.
CROSS_TARGETS: list[tuple[str, str, float, float | None, str]] = [
    ("mae/ours", "supervised/ours", 2.0, 2.5, "MAE (mask 0.75) vs supervised images/s, same backbone"),
]
# (case, fraction of the matmul peak measured in the same run, the step's name). The issue's peak is the
# one on the step's own GEMM shapes ("MKL 184-189 GFLOP/s on the ViT's GEMM shapes"): `bench.gemm`; a
# run without it (--no-gemm-peak) is judged against the square-GEMM peak instead, and says so.
PEAK_TARGETS: list[tuple[str, float, str]] = [
    ("supervised/ours", 0.75, "supervised step"),
    ("mae/ours", 0.70, "MAE step"),
]
TARGETS = RATIO_TARGETS  # the name earlier code imported
# Ratios between our own steps, reported when both ran (twins on each linear path too): MAE vs supervised,
# and I-JEPA vs MAE (the same backbone and batch; each with its own masks).
CROSS_PAIRS: list[tuple[str, str]] = [("mae/ours", "supervised/ours"), ("ijepa/ours", "mae/ours")]


def case_rows(
    cases: list[Case],
    times: dict[str, list[float]],
    flops: dict[str, int],
    memory: dict[str, dict[str, Any]],
    peak_flops: float,
    datasheet_flops: float | None = None,
    gemm_peaks: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per case: median step time, images/s, FLOPs, achieved FLOP/s and fraction of peak (measured:
    the square GEMM's, and the step's own GEMM shapes' when `gemm_peaks` has the case; the GPU datasheet's
    when known), memory, linear path."""
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
            "linear": case.linear,
            "variant": case.variant,
        }
        if case.name in flops:
            f = flops[case.name]
            row.update(
                flops_per_step=f,
                gflop_per_image=f / case.images / 1e9,
                achieved_flops_per_s=f / step_s,
                fraction_of_peak=(f / step_s) / peak_flops if peak_flops > 0 else None,
            )
            if datasheet_flops:
                row["fraction_of_datasheet_peak"] = (f / step_s) / datasheet_flops
            gemm = (gemm_peaks or {}).get(case.name)
            if gemm and gemm["flops_per_s"] > 0:
                row["gemm_peak"] = gemm
                row["fraction_of_gemm_peak"] = (f / step_s) / gemm["flops_per_s"]
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
    """Ours vs its reference in every group that has both, with the like-for-like twins; our cross pairs.

    kind "default": each side as it runs by default (`like_for_like` when their linear paths agree);
    "like-for-like": a twin pair on the same linear path (`supervised/ours-plain` / `supervised/timm`,
    `mae/ours` / `mae/hf+onednn`, ...); "cross": two of our own steps (MAE vs supervised, I-JEPA vs MAE images/s).
    """
    by_name = {c.name: c for c in cases}
    groups: dict[str, list[Case]] = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c)
    out = []
    for group, members in groups.items():
        ours = [c for c in members if c.role == "ours"]
        refs = [c for c in members if c.role == "reference"]
        default = (next((c for c in ours if not c.variant), None), next((c for c in refs if not c.variant), None))
        for o in ours:
            for r in refs:
                same = o.linear == r.linear and o.linear != "mixed"
                if (o, r) == default:
                    kind = "default"
                elif same and o.variant in ("", "plain", "onednn"):
                    kind = "like-for-like"
                else:
                    continue
                c = compare(by_name, times, o.name, r.name)
                c.update(kind=kind, group=group, like_for_like=same, linear=f"{o.linear} / {r.linear}")
                out.append(c)
    for a, b in CROSS_PAIRS:
        for suffix in ("", "-plain", "+onednn"):
            if a + suffix in by_name and b + suffix in by_name:
                c = compare(by_name, times, a + suffix, b + suffix)
                ca, cb = by_name[a + suffix], by_name[b + suffix]
                c.update(kind="cross", group=ca.group, like_for_like=ca.linear == cb.linear, linear=f"{ca.linear} / {cb.linear}")
                out.append(c)
    return out


def loss_checks(cases: list[Case], rtol: float = 1e-4, atol: float = 1e-5) -> list[dict[str, Any]]:
    """Each case's loss on its group's fixed batch vs the group's ours: the same weights must give the same loss.

    Run before any step (steps change the weights). bf16 runs pass a looser `rtol`.
    """
    by_group: dict[str, list[Case]] = {}
    for c in cases:
        if c.loss is not None:
            by_group.setdefault(c.group, []).append(c)
    out = []
    for group, members in by_group.items():
        base = next((c for c in members if c.role == "ours" and not c.variant), None)
        if base is None or len(members) < 2:
            continue
        expected = float(base.loss())
        for c in members:
            if c is base:
                continue
            value = float(c.loss())
            out.append({
                "group": group, "case": c.name, "ours": base.name, "loss": value, "ours_loss": expected,
                "abs_diff": abs(value - expected), "same": abs(value - expected) <= atol + rtol * abs(expected),
            })
    return out


def _target(what: str, value: Any, threshold: Any, aim: Any = None, met: bool | None = None, note: str = "") -> dict[str, Any]:
    if met is None:
        met = value >= threshold
    out = {"target": what, "value": value, "threshold": threshold, "aim": aim, "met": met}
    if note:
        out["note"] = note
    return out


def targets(
    comps: list[dict[str, Any]], scaling: list[dict[str, Any]] | None = None, rows: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Issue 19's targets that this run measured, each with its value, threshold, aim and whether it is met.

    Ours-vs-reference targets read the like-for-like ratios (the smallest of the group's, when the
    linear-path twins ran); a run whose default pair is not like-for-like and has no twin reports none.
    """
    out = []
    for group, what, threshold, aim in RATIO_TARGETS:
        same = [c for c in comps if c.get("group") == group and c.get("kind") != "cross" and c.get("like_for_like")]
        if same:
            worst = min(same, key=lambda c: c["ratio"])
            out.append(_target(what, worst["ratio"], threshold, aim, note=f"{worst['a']} / {worst['b']}"))
    found = {(c["a"], c["b"]): c["ratio"] for c in comps}
    for a, b, threshold, aim, what in CROSS_TARGETS:
        if (a, b) in found:
            out.append(_target(what, found[(a, b)], threshold, aim))
    by_name = {r["name"]: r for r in rows or []}
    for name, threshold, what in PEAK_TARGETS:
        row = by_name.get(name, {})
        if row.get("fraction_of_gemm_peak") is not None:
            out.append(_target(f"{what}, fraction of the matmul peak on its GEMM shapes", row["fraction_of_gemm_peak"], threshold))
        elif row.get("fraction_of_peak") is not None:
            out.append(_target(f"{what}, fraction of the matmul peak (square GEMM)", row["fraction_of_peak"], threshold))
    if scaling:
        first = [r for r in scaling if r["img_size"] == scaling[0]["img_size"] and r["encoder_ms"] is not None]
        first.sort(key=lambda r: r["mask_ratio"])
        if len(first) > 1:
            times = [r["encoder_ms"] for r in first]
            out.append(_target(
                "encoder time falls as the mask ratio rises", " > ".join(f"{t:.0f}" for t in times) + " ms",
                "decreasing", met=all(x > y for x, y in zip(times, times[1:])),
            ))
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
    "cuda_allocated": (
        "torch.cuda.max_memory_allocated during one step, less the memory held before it, plus the case's own "
        "weights, gradients and optimizer state"
    ),
}


def _fmt(x: Any, spec: str = ".1f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _pct(x: float | None) -> str:
    return _fmt(x * 100 if x is not None else None, ".0f")


def _times(x: Any) -> str:
    return f"{x:.2f}x" if isinstance(x, float) else str(x)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: machine (CPU, ISA, load, date), cases, ratios with their like-for-like
    twins, loss checks, targets, scaling, profile, memory with and without grad checkpointing."""
    lines = [f"**Machine:** {report['label']}"]
    machine = report.get("machine", {})
    when = [f"**Date:** {report['date']}"] if report.get("date") else []
    loads = [machine[k] for k in ("load_average_1min", "load_average_1min_end") if machine.get(k) is not None]
    if loads:
        when.append("**Load average (1 min):** " + " at the start, ".join(f"{x:.1f}" for x in loads) + (" at the end" if len(loads) > 1 else ""))
    if when:
        lines.append("; ".join(when))
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
    if machine.get("gpu_datasheet_bf16_flops"):
        lines.append(f"**Datasheet bf16 peak:** {machine['gpu_datasheet_bf16_flops'] / 1e12:.0f} TFLOP/s (dense)")
    settings = report.get("settings", {})
    if settings:
        lines.append("**Settings:** " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    rows = [r for r in report.get("cases", []) if not r["name"].startswith("scaling/")]
    if rows:
        several = len({r.get("model") for r in rows}) > 1  # name the model when more than one ran
        datasheet = any("fraction_of_datasheet_peak" in r for r in rows)
        own = any("fraction_of_gemm_peak" in r for r in rows)
        lines += [
            "",
            "| case | linear | img/s | ms/step | GFLOP/img | achieved GFLOP/s | % of matmul peak |"
            + (" its GEMM shapes' peak GFLOP/s | % of it |" if own else "")
            + (" % of datasheet peak |" if datasheet else "") + " peak memory MiB |",
            "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if own else "") + ("---:|" if datasheet else "") + "---:|",
        ]
        for r in rows:
            mem = r.get("memory")
            achieved = r["achieved_flops_per_s"] / 1e9 if "achieved_flops_per_s" in r else None
            cells = [
                f"{r['name']} ({r['model']})" if several else r["name"],
                r.get("linear", "-"),
                f"{r['images_per_s']:.1f}",
                f"{r['step_ms']:.0f}",
                _fmt(r.get("gflop_per_image"), ".2f"),
                _fmt(achieved, ".0f"),
                _pct(r.get("fraction_of_peak")),
            ]
            if own:
                gemm = r.get("gemm_peak")
                cells += [_fmt(gemm["flops_per_s"] / 1e9 if gemm else None, ".0f"), _pct(r.get("fraction_of_gemm_peak"))]
            if datasheet:
                cells.append(_pct(r.get("fraction_of_datasheet_peak")))
            cells.append(f"{mem['peak_mib']:.0f}" if mem else "-")
            lines.append("| " + " | ".join(cells) + " |")
    kinds = {r["memory"]["kind"] for r in rows if r.get("memory")}
    if kinds:
        lines.append("")
        lines.append("Peak memory: " + "; ".join(_MEMORY_KINDS.get(k, k) for k in sorted(kinds)) + ".")
    comps = report.get("comparisons", [])
    if comps:
        lines += [
            "",
            "| ratio of images/s (median of per-round ratios) | kind | linear (a / b) | value | range | rounds |",
            "|---|---|---|---:|---:|---:|",
        ]
        several = len({c.get("model") for c in comps}) > 1
        order = {"default": 0, "like-for-like": 1, "cross": 2}
        ranked = sorted(enumerate(comps), key=lambda ic: (ic[1].get("model") or "", ic[1].get("group") or "", order.get(ic[1].get("kind"), 3), ic[0]))
        for _, c in ranked:
            what = f"{c['a']} / {c['b']}" + (f" ({c['model']})" if several else "")
            kind = c.get("kind", "-")
            if kind == "default" and c.get("like_for_like"):
                kind = "default = like-for-like"
            lines.append(
                f"| {what} | {kind} | {c.get('linear', '-')} | {c['ratio']:.2f}x | {c['min']:.2f}-{c['max']:.2f} | {c['rounds']} |"
            )
        if all(c.get("kind") != "like-for-like" for c in comps):
            lines.append("")
            lines.append(
                "Every default ratio above is like-for-like: both sides computed their linear layers on the same path "
                "(no oneDNN twins were needed; `--twins always` times both sides on oneDNN too)."
            )
    checks = report.get("loss_checks", [])
    if checks:
        lines += ["", "| same loss from the same weights (before timing) | loss | ours | abs diff | same |",
                  "|---|---:|---:|---:|:---:|"]
        for c in checks:
            lines.append(f"| {c['case']} vs {c['ours']} | {c['loss']:.6g} | {c['ours_loss']:.6g} | {c['abs_diff']:.1e} | "
                         f"{'yes' if c['same'] else 'NO'} |")
    tg = report.get("targets", [])
    if tg:
        lines += ["", "| target | measured | needs | aim | met |", "|---|---:|---:|---:|:---:|"]
        for t in tg:
            fraction = "fraction of the matmul peak" in t["target"]
            value = _pct(t["value"]) + "%" if fraction else _times(t["value"])
            need = (f">= {_pct(t['threshold'])}%" if fraction else f">= {_times(t['threshold'])}") if isinstance(t["threshold"], float) else t["threshold"]
            aim = _times(t["aim"]) if t.get("aim") is not None else "-"
            note = f" ({t['note']})" if t.get("note") else ""
            lines.append(f"| {t['target']}{note} | {value} | {need} | {aim} | {'yes' if t['met'] else 'NO'} |")
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
    ckpt = report.get("grad_checkpointing", [])
    if ckpt:
        lines += [
            "",
            "| grad checkpointing (model, objective, batch) | step peak MiB off | on | saving | activations MiB off "
            "| on | saving | ms/step off | on | same loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        for m in ckpt:
            lines.append(
                f"| {m['model']}, {m['objective']}, {m['batch_size']} | {m['peak_mib_off']:.0f} | {m['peak_mib_on']:.0f} | "
                f"{m['saving'] * 100:.0f}% | {m['activations_mib_off']:.0f} | {m['activations_mib_on']:.0f} | "
                f"{m['activation_saving'] * 100:.0f}% | {_fmt(m.get('step_ms_off'), '.0f')} | "
                f"{_fmt(m.get('step_ms_on'), '.0f')} | {'yes' if m['same_loss'] else 'NO'} |"
            )
        lines.append("")
        lines.append(
            "Step peak: live tensors during a whole training step. Activations: the peak of a forward + backward "
            "into already allocated gradients, less weights, gradients and optimizer state."
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
