"""Compare pretraining methods: one plan, one command, one table, plots.

    python tools/compare.py --plan recipes/configs/compare/compare_default.yaml [--out DIR] [--dry-run]

`run_comparison` loads a plan (`plan.py`), runs what is missing as subprocesses (`runner.py`), reads
every metrics.json, pretraining summary and loss curve (`collect.py`), summarizes the runs of each
method over its pretraining seeds (`stats.py`: mean, std, 95% t-interval, Welch's t-test against each
column's best), and writes results.md/.csv/.json (`report.py`) and PNG plots (`plots.py`) into the
output folder.
"""

from __future__ import annotations

import difflib
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

from ssl_vit.compare.collect import EvalResult, MethodResult, Results, collect, read_loss_curve, read_metrics
from ssl_vit.compare.plan import ComparePlan, Run, load_plan, plan_from_dict, resolve_runs
from ssl_vit.compare.plots import write_plots
from ssl_vit.compare.report import markdown_table, write_results
from ssl_vit.compare.runner import RunStatus, execute, run_state
from ssl_vit.config import ConfigError

__all__ = [
    "ComparePlan",
    "EvalResult",
    "MethodResult",
    "Results",
    "Run",
    "RunStatus",
    "collect",
    "execute",
    "load_plan",
    "markdown_table",
    "output_dir",
    "plan_from_dict",
    "read_loss_curve",
    "read_metrics",
    "resolve_runs",
    "run_comparison",
    "run_state",
    "select_runs",
    "write_plots",
    "write_results",
]


def output_dir(plan: ComparePlan, out: Optional[str | Path] = None) -> Path:
    """`--out`, else the plan's `out`, else outputs/compare/<plan name>."""
    return Path(out or plan.out or Path("outputs") / "compare" / plan.name)


def _names(run: Run) -> set[str]:
    """What `--only` may call a run: its method, its column, method/column, and the same with its seed
    label (`mae@seed1`, `mae@seed1/knn`)."""
    label = run.label or run.method
    names = {run.method, label}
    if run.column:
        names |= {run.column, f"{run.method}/{run.column}", f"{label}/{run.column}"}
    return names


def select_runs(runs: list[Run], only: Iterable[str]) -> set[str]:
    """Run ids picked by `--only` names (a method, an eval column, method/column, or a seed's run such as
    mae@seed1) plus what they need."""
    by_id = {r.id: r for r in runs}
    picked: set[str] = set()
    names = set().union(*(_names(r) for r in runs))
    for name in only:
        hits = [r.id for r in runs if name in _names(r)]
        if not hits:
            close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.5)
            hint = f", did you mean '{close[0]}'?" if close else f" (names: {', '.join(sorted(names))})."
            raise ConfigError(f"--only {name}: no method or evaluation of that name{hint}")
        picked.update(hits)

    def add_deps(run_id: str) -> None:
        for dep in by_id[run_id].depends:
            if dep not in picked:
                picked.add(dep)
                add_deps(dep)

    for run_id in list(picked):
        add_deps(run_id)
    return picked


def run_comparison(
    plan: str | Path | ComparePlan,
    out: Optional[str | Path] = None,
    *,
    dry_run: bool = False,
    only: Optional[Iterable[str]] = None,
    python: str = sys.executable,
    echo: Callable[[str], None] = print,
) -> tuple[int, Optional[Results]]:
    """Run what the plan still needs and write its results; (exit status, results).

    Exit status 0: every run completed; 1: some run failed or left no results (the rest is still
    written, and the table names what broke). Plan errors raise `ConfigError` before anything runs.
    """
    source = None
    if not isinstance(plan, ComparePlan):
        source = Path(plan)
        plan = load_plan(source)
    out_dir = output_dir(plan, out).resolve()
    runs = resolve_runs(plan, out_dir)
    selected = select_runs(runs, only) if only else None
    helpers = len({r.method for r in runs if r.kind != "eval" and not r.evaluate})
    seeds = f" x {len(plan.pretrain_seeds)} pretraining seeds {plan.pretrain_seeds}" if plan.pretrain_seeds else ""
    echo(f"comparison '{plan.name}': {len({r.method for r in runs if r.kind != 'eval' and r.evaluate})} methods"
         + (f" (+ {helpers} helper run{'s' if helpers > 1 else ''})" if helpers else "")
         + f"{seeds}, {len(plan.evaluations)} evaluations, {len(runs)} runs -> {out_dir}")
    if not dry_run:
        out_dir.mkdir(parents=True, exist_ok=True)
        if source is not None:
            shutil.copyfile(source, out_dir / "plan.yaml")  # what these results were made from
    statuses = execute(runs, plan.launcher, out_dir / "logs", selected=selected, dry_run=dry_run, python=python,
                       echo=echo)
    if dry_run:
        todo = sum(s.state == "planned" for s in statuses.values())
        echo(f"dry run: {todo} runs to do, {sum(s.state == 'complete' for s in statuses.values())} complete")
        return 0, None
    results = collect(plan, runs, statuses)
    try:
        plots = write_plots(results, out_dir)
    except Exception as err:  # noqa: BLE001 - a plotting problem must not lose the table
        plots = []
        results.problems.append(f"plots: {type(err).__name__}: {err}")
    write_results(results, out_dir, plots)
    ran = sum(s.state == "ran" for s in statuses.values())
    skipped = sum(s.state == "complete" for s in statuses.values())
    failed = [s.run_id for s in statuses.values() if s.state in ("failed", "blocked")]
    echo("\n" + markdown_table(results) + "\n")
    echo(f"ran {ran}, skipped {skipped} complete, failed/blocked {len(failed)}"
         + (f" ({', '.join(failed)})" if failed else "") + f"; results in {out_dir / 'results.md'}")
    for problem in results.problems:
        echo(f"problem: {problem}")
    return (0 if results.ok else 1), results
