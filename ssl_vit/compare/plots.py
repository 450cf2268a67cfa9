"""PNG plots of a comparison: top-1 per protocol per method, and each pretraining's loss curve."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ssl_vit.compare.collect import Results

__all__ = ["plot_accuracy", "plot_loss_curves", "write_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the machines this runs on
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results: Results, path: str | Path) -> Optional[Path]:
    """Grouped bars: one group per protocol column, one bar per method.

    With pretraining seeds: bar = mean over the runs, error bar = its 95% t-interval, dots = the runs.
    With one run per method: error bar = std over the eval seeds.
    """
    methods = [m for m in results.methods if m.evaluated]
    columns = [name for name, _ in results.columns]
    if not methods or not columns:
        return None
    seeded = bool(results.pretrain_seeds) and len(results.pretrain_seeds or []) > 1
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.5 * len(methods) * len(columns)), 3.8))
    width = 0.8 / len(methods)
    any_bar = False
    for i, m in enumerate(methods):
        xs, ys, low, high, dots = [], [], [], [], []
        for j, name in enumerate(columns):
            cell = m.evals.get(name)
            if cell is None or cell.status != "ok" or cell.top1 is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            xs.append(x)
            ys.append(cell.top1)
            if cell.ci95:
                low.append(cell.top1 - cell.ci95[0])
                high.append(cell.ci95[1] - cell.top1)
            else:
                spread = 0.0 if seeded else (cell.top1_std or 0.0)
                low.append(spread)
                high.append(spread)
            if cell.n > 1:
                dots += [(x, e["top1"]) for e in cell.runs if e["status"] == "ok" and e["top1"] is not None]
        if xs:
            any_bar = True
            style = {"color": "0.7", "hatch": "//"} if m.kind == "random" else {}  # the floor, drawn apart
            bars = ax.bar(xs, ys, width, yerr=[low, high], capsize=3, label=m.name, **style)
            if dots:
                ax.scatter([d[0] for d in dots], [d[1] for d in dots], s=8, color="black", zorder=3)
            for bar, y, h in zip(bars, ys, high):
                ax.annotate(f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y + h), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    if not any_bar:
        plt.close(fig)
        return None
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel("top-1 (%)")
    if seeded:
        title = (f"{results.name}: top-1 by protocol, mean over pretraining seeds {results.pretrain_seeds}\n"
                 f"error bars: {results.confidence:.0%} t-interval; dots: the runs")
    else:
        title = f"{results.name}: top-1 by protocol (mean ± std over eval seeds {results.seeds}; one pretraining run)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_loss_curves(results: Results, path: str | Path) -> Optional[Path]:
    """One panel per pretraining (objectives' losses are on different scales), x = images seen.

    Several seeds: their mean, and a band from their min to their max at each logged step.
    """
    curves = [m for m in results.methods if m.loss_curves or m.loss_curve]
    if not curves:
        return None
    plt = _pyplot()
    ncols = min(3, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.0 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, curves):
        runs = list(m.loss_curves.values()) or [m.loss_curve]
        steps, mean, low, high = _band(runs)
        per_step = _images_per_step(m)
        xs = [s * per_step for s in steps] if per_step else steps
        ax.plot(xs, mean, lw=1.2, label=f"mean of {len(runs)} seeds" if len(runs) > 1 else None)
        if len(runs) > 1:
            ax.fill_between(xs, low, high, alpha=0.3, lw=0, label="min-max over seeds")
            ax.legend(fontsize=7)
        ax.set_xlabel("images seen" if per_step else "step")
        ax.set_title(f"{m.name} ({m.objective or m.kind})", fontsize=9)
        ax.set_ylabel(m.loss_tag or "loss", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.suptitle(f"{results.name}: pretraining loss", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _band(runs: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps logged by every run, mean, min, max) of several loss curves; one curve: itself."""
    by_run = [dict(curve) for curve in runs if curve]
    steps = sorted(set.intersection(*(set(c) for c in by_run))) if len(by_run) > 1 else sorted(by_run[0])
    values = [[c[s] for c in by_run] for s in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _images_per_step(m) -> Optional[float]:
    if m.budget.get("images_per_step"):
        return float(m.budget["images_per_step"])
    steps, seen = m.pretrain.get("steps"), m.pretrain.get("images_seen")
    try:
        return float(seen) / float(steps) if steps and seen else None
    except (TypeError, ValueError):
        return None


def write_plots(results: Results, out: str | Path) -> list[str]:
    """accuracy.png and loss_curves.png in `out` (each only when there is something to draw)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in (("accuracy.png", plot_accuracy), ("loss_curves.png", plot_loss_curves)):
        if fn(results, out / name) is not None:
            written.append(str(out / name))
    return written
