"""Stand-in recipes for the comparison tool's tests: tiny scripts that take the recipes' arguments
(`[--config FILE] key=value ...`) and write the files the real ones write, in milliseconds."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

_COMMON = """
import json, sys, os
from pathlib import Path
args = {}
argv = sys.argv[1:]
i = 0
while i < len(argv):
    if argv[i] == "--config":
        args["--config"] = argv[i + 1]; i += 2; continue
    k, _, v = argv[i].partition("=")
    args[k] = v; i += 1
out = Path(args["output_dir"])
out.mkdir(parents=True, exist_ok=True)
with open(os.environ["FAKE_CALLS"], "a") as fh:
    fh.write(json.dumps({"script": Path(__file__).stem, "args": args}) + "\\n")
if args.get("fake.fail") == "true":
    print("Traceback (most recent call last):")
    print("RuntimeError: fake failure asked for by the plan")
    sys.exit(3)
"""

FAKE_PRETRAIN = _COMMON + """
steps = int(args.get("train.max_steps", 7))
seed = int(args.get("seed", 0))  # like the recipes: the config's seed (0) unless seed= is given
(out / "backbone.safetensors").write_bytes(f"weights drawn from seed {seed}".encode())
(out / "backbone.json").write_text(json.dumps({"model": {"name": "vit_nano_patch4_32"}, "seed": seed,
    "objective": args.get("fake.objective", "mae"), "step": steps, "images_seen": steps * 8, "seconds": 2.0, "images_per_sec": steps * 4.0}))
"""

FAKE_EVAL = _COMMON + """
seeds = json.loads(args.get("seeds", "[0]"))
base = float(args.get("fake.top1", 50.0)) + (10.0 if args.get("checkpoint") != "random" else 0.0)
if args.get("checkpoint") != "random":  # a checkpoint pretrained with seed s scores fake.seed_gain * s more
    meta = json.loads((Path(args["checkpoint"]) / "backbone.json").read_text())
    base += float(args.get("fake.seed_gain", 0.0)) * meta["seed"]
per_seed = [{"seed": s, "top1": base + s, "top5": 90.0} for s in seeds]
m = sum(r["top1"] for r in per_seed) / len(per_seed)
sd = (sum((r["top1"] - m) ** 2 for r in per_seed) / max(len(per_seed) - 1, 1)) ** 0.5
(out / "metrics.json").write_text(json.dumps({"protocol": args.get("fake.protocol", "knn"), "method": "x",
    "checkpoint": args.get("checkpoint"), "seeds": seeds, "top1": m, "top5": 90.0, "top1_std": sd, "top5_std": 0.0,
    "per_seed": per_seed, "seconds": 1.5, "pretrain": {}}))
"""


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Stand-in pretrain/eval scripts, and the file where each of their invocations is recorded."""
    calls = tmp_path / "calls.jsonl"
    calls.touch()
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    scripts = tmp_path / "fake_recipes"
    scripts.mkdir()
    (scripts / "fake_pretrain.py").write_text(textwrap.dedent(FAKE_PRETRAIN))
    (scripts / "fake_eval.py").write_text(textwrap.dedent(FAKE_EVAL))
    return {"pretrain": scripts / "fake_pretrain.py", "eval": scripts / "fake_eval.py", "calls": calls}


def read_calls(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
