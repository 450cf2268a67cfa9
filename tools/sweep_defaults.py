"""Tune a default recipe by measurement: run variants of it, judge each the same way, print one table.

    python tools/sweep_defaults.py --plan tools/sweeps/defaults_2026-12-05.yaml --out outputs/sweep
    python tools/sweep_defaults.py --plan PLAN --only mae_p4 mae_p8 --threads 1

A plan lists runs (a recipe plus overrides) and random inits; each run is pretrained in its own process,
then judged by the kNN and linear-probe defaults (knn_default.yaml, linear_probe_default.yaml) plus the
plan's eval_overrides. The table gives, per run: steps, training seconds, images/s, the run's own eval top-1
(supervised / DeiT), kNN and linear-probe top-1. A finished run (its sweep_summary.json exists) is not run again. With
--threads 1 two sweeps can share a 2-core machine without slowing each other much (accuracy does not
depend on it; the seconds do: quote them from idle runs only).

Plan (YAML):
    runs:
      - {name: mae_p4, recipe: mae_pretrain, overrides: {mae.decoder_dim: 64}}
    random: [vit_nano_patch4_32]          # random-init rows, one per backbone name
    eval_overrides: {features.pool: token} # optional, for both evaluations
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = "sweep_summary.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="sweep plan (YAML): runs, random, eval_overrides")
    p.add_argument("--out", default="outputs/sweep", help="one folder per run under it")
    p.add_argument("--only", nargs="*", default=None, help="run names (and random backbone names) to do")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every process")
    p.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # internal: RECIPE args...
    return p.parse_args(argv)


def run_one(recipe: str, args: list[str]) -> None:
    """In the child: run the recipe's main() and keep what it returns (its own eval top-1 included)."""
    sys.path.insert(0, str(ROOT / "recipes"))
    module = __import__(recipe)
    summary = module.main(args)
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    keep = {k: summary.get(k) for k in ("steps", "images_seen", "seconds", "images_per_sec", "top1", "loss")}
    (out / SUMMARY).write_text(json.dumps(keep, indent=1))


def _call(cmd: list[str], log: Path, env: dict) -> None:
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"sweep: `{' '.join(cmd)}` failed (exit {rc}); see {log}")


def _evaluate(checkpoint: str, model: str | None, out: Path, overrides: dict, env: dict) -> dict[str, float]:
    """kNN and linear-probe top-1 of one checkpoint (a run folder or `random`), each from its metrics.json."""
    result = {}
    for protocol in ("knn", "linear_probe"):
        folder = out / protocol
        if not (folder / "metrics.json").exists():
            args = [f"checkpoint={checkpoint}", f"output_dir={folder}", f"features.cache_dir={out}/feature_cache"]
            args += [f"model.name={model}"] if model else []
            args += [f"{k}={v}" for k, v in overrides.items()]
            _call([sys.executable, f"recipes/{protocol}.py", *args], out / f"{protocol}.log", env)
        result[protocol] = json.loads((folder / "metrics.json").read_text())["top1"]
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.one:
        run_one(args.one[0], args.one[1:])
        return []
    plan = yaml.safe_load(Path(args.plan).read_text())
    out_root = Path(args.out).resolve()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    eval_overrides = plan.get("eval_overrides", {})
    rows = []
    for run in plan.get("runs", []):
        if args.only is not None and run["name"] not in args.only:
            continue
        out = out_root / run["name"]
        out.mkdir(parents=True, exist_ok=True)
        overrides = run.get("overrides", {})
        if not (out / "pretrain" / SUMMARY).exists():
            start = time.perf_counter()
            argv_run = [f"output_dir={out / 'pretrain'}", *(f"{k}={v}" for k, v in overrides.items())]
            _call([sys.executable, __file__, "--plan", args.plan, "--one", run["recipe"], *argv_run],
                  out / "pretrain.log", env)
            print(f"[sweep] {run['name']}: pretrained in {time.perf_counter() - start:.0f} s", flush=True)
        summary = json.loads((out / "pretrain" / SUMMARY).read_text())
        rows.append({"name": run["name"], "recipe": run["recipe"], "overrides": overrides, **summary,
                     **_evaluate(str(out / "pretrain"), None, out, eval_overrides, env)})
    for model in plan.get("random", []):
        if args.only is not None and model not in args.only:
            continue
        out = out_root / f"random_{model}"
        out.mkdir(parents=True, exist_ok=True)
        rows.append({"name": f"random {model}", "recipe": "-", "overrides": {},
                     **_evaluate("random", model, out, eval_overrides, env)})
    table = render(rows)
    (out_root / "sweep.md").write_text(table + "\n")
    print(table)
    return rows


def render(rows: list[dict]) -> str:
    """The sweep as a markdown table, one row per run."""
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| run | recipe | overrides | steps | train s | img/s | own eval top-1 | kNN top-1 | probe top-1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        changed = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
        lines.append(
            f"| {r['name']} | {r['recipe']} | {changed} | {num(r.get('steps'), 'd')} | {num(r.get('seconds'), '.0f')} "
            f"| {num(r.get('images_per_sec'), '.0f')} | {num(r.get('top1'), '.1f')} | {num(r.get('knn'), '.1f')} "
            f"| {num(r.get('linear_probe'), '.1f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
