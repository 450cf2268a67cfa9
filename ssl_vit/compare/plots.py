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
    """Grouped bars: one group per protocol column, one bar per method, error bars = std over seeds."""
    methods = [m for m in results.methods if m.evaluated]
    columns = [name for name, _ in results.columns]
    if not methods or not columns:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.5 * len(methods) * len(columns)), 3.8))
    width = 0.8 / len(methods)
    any_bar = False
    for i, m in enumerate(methods):
        xs, ys, errs = [], [], []
        for j, name in enumerate(columns):
            cell = m.evals.get(name)
            if cell is not None and cell.status == "ok" and cell.top1 is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(cell.top1)
                errs.append(cell.top1_std or 0.0)
        if xs:
            any_bar = True
            style = {"color": "0.7", "hatch": "//"} if m.kind == "random" else {}  # the floor, drawn apart
            bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, label=m.name, **style)
            for bar, y in zip(bars, ys):
                ax.annotate(f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    if not any_bar:
        plt.close(fig)
        return None
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{results.name}: top-1 by protocol (mean ± std over seeds {results.seeds})", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_loss_curves(results: Results, path: str | Path) -> Optional[Path]:
    """One panel per pretraining (objectives' losses are on different scales), x = images seen."""
    curves = [m for m in results.methods if m.loss_curve]
    if not curves:
        return None
    plt = _pyplot()
    ncols = min(3, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.0 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, curves):
        steps = [s for s, _ in m.loss_curve]
        values = [v for _, v in m.loss_curve]
        per_step = _images_per_step(m)
        if per_step:
            ax.plot([s * per_step for s in steps], values, lw=1.2)
            ax.set_xlabel("images seen")
        else:
            ax.plot(steps, values, lw=1.2)
            ax.set_xlabel("step")
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
