"""Soak test of a pretraining recipe: many steps, frequent checkpoints; memory must stay flat, no fd leaks.

    python tools/soak.py --steps 2000 --save-every 100 --out outputs/soak     # ~1-2 min on 2 idle CPU cores
    python tools/soak.py --steps 300 --save-every 50 --json                  # what the CI test runs

Runs the recipe (default recipes/mae_pretrain.py with its default config, shrunk to a tiny model and
data) in a child process. After every checkpoint save the child records, from inside, its resident
memory (RSS), its open file descriptors and threads, and the RSS of its DataLoader workers; the parent
prints them and a verdict: RSS growth from the first sample after warm-up to the last, and the fd
counts. Exit status 0 when RSS grew less than --max-rss-growth-mb and the fd count did not grow.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The default MAE recipe shrunk to milliseconds a step: 256 synthetic 16x16 images, batch 16 (16 steps
# an epoch), a 1-block 32-wide ViT and decoder. Everything else (loader worker, vis_every, log_every,
# TensorBoard, checkpoints) stays as the recipe's default config has it.
TINY = [
    "data.synthetic_train_size=256",
    "data.synthetic_eval_size=16",
    "data.image_size=16",
    "model.args={depth: 1, embed_dim: 32, num_heads: 2}",
    "mae.decoder_dim=32",
    "mae.decoder_depth=1",
    "mae.decoder_heads=2",
    "train.batch_size=16",
    "train.epochs=100000",
]


def child(recipe: str, probe: str, argv: list[str]) -> None:
    """In the child: wrap Trainer.save to append one probe record per checkpoint, then run the recipe."""
    import runpy

    import psutil

    from ssl_vit.engine import trainer as trainer_mod

    real_save, me = trainer_mod.Trainer.save, psutil.Process()

    def probing_save(self: Any) -> Any:
        result = real_save(self)
        kids = me.children(recursive=True)
        record = {
            "step": self.pos.step,
            "rss_mb": round(me.memory_info().rss / 2**20, 2),
            "workers_rss_mb": round(sum(k.memory_info().rss for k in kids) / 2**20, 2),
            "fds": me.num_fds(),
            "threads": me.num_threads(),
            "children": len(kids),
        }
        with open(probe, "a") as f:
            f.write(json.dumps(record) + "\n")
        return result

    trainer_mod.Trainer.save = probing_save
    sys.argv = [recipe, *argv]
    runpy.run_path(recipe, run_name="__main__")


def verdict(records: list[dict], warmup: int, max_growth_mb: float) -> dict[str, Any]:
    """RSS and fd change from the first record after `warmup` saves to the last."""
    if len(records) < warmup + 2:
        raise SystemExit(f"soak: only {len(records)} checkpoint samples; use more --steps or a smaller --save-every")
    first, last = records[warmup], records[-1]
    steady = records[warmup:]
    out = {
        "samples": len(records),
        "rss_start_mb": records[0]["rss_mb"],
        "rss_after_warmup_mb": first["rss_mb"],
        "rss_end_mb": last["rss_mb"],
        "rss_max_mb": max(r["rss_mb"] for r in records),
        "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 2),
        "workers_rss_growth_mb": round(last["workers_rss_mb"] - first["workers_rss_mb"], 2),
        "fds_start": records[0]["fds"],
        "fds_after_warmup": first["fds"],
        "fds_end": last["fds"],
        "fds_max": max(r["fds"] for r in steady),
        "threads_end": last["threads"],
        "steps": last["step"],
    }
    out["ok"] = bool(out["rss_growth_mb"] < max_growth_mb and out["fds_max"] <= out["fds_after_warmup"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "mae_pretrain.py"))
    p.add_argument("--out", help="output_dir of the run (default: a temporary folder, removed after)")
    p.add_argument("--warmup", type=int, default=1, help="first checkpoint samples left out of the RSS growth")
    p.add_argument("--max-rss-growth-mb", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON line")
    p.add_argument("--child", nargs=2, metavar=("RECIPE", "PROBE"), help=argparse.SUPPRESS)
    args, extra = p.parse_known_args(argv)
    if args.child:
        child(args.child[0], args.child[1], extra)
        return 0

    with tempfile.TemporaryDirectory(prefix="ssl_vit_soak_") as tmp:
        out = args.out or str(Path(tmp) / "run")
        probe = str(Path(tmp) / "probe.jsonl")
        limits = [f"train.max_steps={args.steps}", f"train.save_every={args.save_every}"]
        overrides = [*TINY, *limits, f"output_dir={out}", *extra]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", args.recipe, probe, *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            print(f"soak: the run failed (exit {proc.returncode})", file=sys.stderr)
            return 2
        records = [json.loads(line) for line in Path(probe).read_text().splitlines()]
    result = verdict(records, args.warmup, args.max_rss_growth_mb)
    if args.json:
        print(json.dumps({**result, "records": records}))
    else:
        print(f"{'step':>6} {'rss MB':>8} {'workers MB':>10} {'fds':>4} {'threads':>7}")
        for r in records:
            print(f"{r['step']:>6} {r['rss_mb']:>8.1f} {r['workers_rss_mb']:>10.1f} {r['fds']:>4} {r['threads']:>7}")
        r = result
        print(
            f"RSS {r['rss_start_mb']:.1f} MB at the first checkpoint, {r['rss_after_warmup_mb']:.1f} after warm-up, "
            f"{r['rss_end_mb']:.1f} at step {r['steps']} (growth {r['rss_growth_mb']:+.1f} MB); fds {r['fds_start']} "
            f"-> {r['fds_end']} (max {r['fds_max']}): {'OK' if r['ok'] else 'LEAK?'}"
        )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
