"""Compare pretraining methods on one dataset: run a plan, write one table and plots.

    python tools/compare.py --plan recipes/configs/compare/compare_default.yaml [--out DIR] [--dry-run] [--only NAME]

Runs what the plan still needs (completed runs are skipped, so rerunning resumes a crashed plan, and
adding pretraining seeds to `pretrain_seeds` runs only the new seeds), then writes OUT/results.md,
results.csv, results_runs.csv, results.json, accuracy.png and loss_curves.png. Exit status: 0 when
every run completed, 1 when some failed (the rest is still written), 2 for a plan error.
"""

from __future__ import annotations

import argparse
import sys

from ssl_vit.compare import run_comparison
from ssl_vit.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", required=True, help="plan YAML, e.g. recipes/configs/compare/compare_default.yaml")
    parser.add_argument("--out", default=None,
                        help="output folder (default: the plan's 'out', else outputs/compare/<name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would run (and what is complete); run nothing")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="run only this method, evaluation, method/evaluation, or one seed's run (mae@seed1) "
                             "(repeatable); the table still shows everything already done")
    args = parser.parse_args(argv)
    try:
        code, _ = run_comparison(args.plan, args.out, dry_run=args.dry_run, only=args.only)
    except ConfigError as err:
        print(f"compare: plan error: {err}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
