"""Benchmark ssl_vit against timm, Hugging Face and the machine's matmul peak.

Sub-commands:
  train    training images/s of each objective vs a reference of the same size, FLOP/s, % of peak, memory
           (and the bare backbone's forward + backward vs timm's model of the same config)
  eval     feature extraction vs timm inference
  scaling  MAE step time vs mask ratio and image size (and the encoder's share)
  profile  where one step's time goes (matmul, attention, GELU, LayerNorm, copies, optimizer, ...)
  all      train + eval + scaling + a profile of the MAE step, one table and one JSON
  data     the data-loader benchmark (tools/benchmark_data.py; arguments passed through)

Examples:
  python tools/benchmark.py all --out bench.json
  python tools/benchmark.py train --objectives supervised,mae --steps 2 --rounds 3
  python tools/benchmark.py scaling --mask-ratios 0.5,0.75,0.9 --sizes 32:4,64:4,224:16
  python tools/benchmark.py profile --case mae/hf
  python tools/benchmark.py train --device cuda --precision bf16 --models vit_base_patch16_224 --batch-size 128

Ratios are medians of per-round ratios: every round runs each case for --steps steps, so a noisy
neighbour slows both sides of a ratio alike. Absolute images/s on a shared machine are only indicative.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import torch

ALL = ("backbone", "supervised", "mae", "deit")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _sizes(text: str) -> list[tuple[int, int]]:
    """'32:4,64:4,224:16' -> [(32, 4), (64, 4), (224, 16)] (image size : patch size)."""
    out = []
    for item in text.split(","):
        img, _, patch = item.partition(":")
        if not patch:
            raise argparse.ArgumentTypeError(f"size '{item}' needs the form IMAGE:PATCH, e.g. 224:16")
        out.append((int(img), int(patch)))
    return out


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common")
    g.add_argument("--models", default="vit_tiny_patch4_32", help="comma-separated backbone names (%(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="training batch (default: %(default)s)")
    g.add_argument("--steps", type=int, default=3, help="timed steps per case per round (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=5, help="alternating rounds; ratios: per-round medians (%(default)s)")
    g.add_argument("--warmup", type=int, default=1, help="untimed steps per case first (default: %(default)s)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    g.add_argument("--precision", default="no", choices=["no", "bf16"], help="autocast through Accelerate (no: fp32)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-reference", action="store_true", help="time ours only")
    g.add_argument("--no-onednn", action="store_true", help="compute linear layers with PyTorch's default (MKL) path")
    g.add_argument(
        "--onednn-objective", action="store_true",
        help="also route the objective's own linear layers (MAE decoder, heads) through oneDNN",
    )
    g.add_argument("--mask-ratio", type=float, default=0.75)
    g.add_argument("--decoder-dim", type=int, default=None, help="MAE decoder width (default: 128 <= 64 px, else 512)")
    g.add_argument("--decoder-depth", type=int, default=None, help="MAE decoder blocks (default: 4 <= 64 px, else 8)")
    g.add_argument("--decoder-heads", type=int, default=None, help="MAE decoder heads (default: 4 <= 64 px, else 16)")
    g.add_argument("--num-classes", type=int, default=None, help="default: 10 for <= 64 px, else 1000")
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--peak-seconds", type=float, default=2.0, help="time spent measuring the matmul peak")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement step")
    g.add_argument("--out", default=None, help="write the report as JSON here")

    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py", description=__doc__.split("\n\n")[0],
        epilog="Run 'tools/benchmark.py SUBCOMMAND --help' for a sub-command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,scaling,profile,all,data}")
    train = sub.add_parser("train", parents=[common], help="training steps vs timm / Hugging Face")
    train.add_argument(
        "--objectives", default=",".join(ALL),
        help="comma-separated from backbone (forward + backward only), supervised, mae, deit (default: all)",
    )
    sub.add_parser("eval", parents=[common], help="feature extraction vs timm inference")
    scaling = sub.add_parser("scaling", parents=[common], help="MAE step vs mask ratio and image size")
    prof = sub.add_parser("profile", parents=[common], help="where one step's time goes")
    prof.add_argument("--case", default="mae/ours", help="case to profile: mae/ours, mae/hf, ... (%(default)s)")
    full = sub.add_parser("all", parents=[common], help="train + eval + scaling + MAE profile")
    full.add_argument("--objectives", default=",".join(ALL))
    for p in (scaling, full):
        p.add_argument("--mask-ratios", type=_floats, default=[0.5, 0.75, 0.9])
        p.add_argument(
            "--sizes", type=_sizes, default=[(32, 4), (64, 4), (224, 16)], help="IMAGE:PATCH list (32:4,64:4,224:16)"
        )
        p.add_argument("--scaling-batch", type=int, default=32)
        p.add_argument("--scaling-steps", type=int, default=2)
        p.add_argument("--scaling-rounds", type=int, default=3)
    sub.add_parser("data", help="data-loader benchmark: tools/benchmark_data.py (arguments passed on)", add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------------


def _setup(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from ssl_vit.bench import BenchEnv, machine_info, machine_label
    from ssl_vit.ops.linear import set_onednn_linear

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_onednn:
        set_onednn_linear(False)
    env = BenchEnv.create(args.device, args.precision)
    info = machine_info(env.device)
    report: dict[str, Any] = {
        "command": "python tools/benchmark.py " + " ".join(sys.argv[1:]),
        "label": machine_label(info),
        "machine": info,
        "settings": {
            "precision": args.precision, "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
            "warmup": args.warmup, "onednn_linear": info["onednn_linear"], "onednn_objective": args.onednn_objective,
        },
    }
    return env, report


def _workload_config(args: argparse.Namespace, model: str) -> Any:
    from ssl_vit.bench import WorkloadConfig

    return WorkloadConfig(
        model=model, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, num_classes=args.num_classes,
        mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
        decoder_heads=args.decoder_heads, onednn_objective=args.onednn_objective,
    )


def _measure(
    cases: list[Any], env: Any, args: argparse.Namespace, peak: float, rounds: int, steps: int, log: Any
) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """FLOPs (one forward + backward), memory (one step), then the interleaved timing rounds."""
    from ssl_vit.bench import case_rows, count_flops, measure_memory, run_rounds

    flops, memory = {}, {}
    for case in cases:
        flops[case.name] = count_flops(case.flops_fn or case.step)
        if not args.no_memory and not case.name.startswith("scaling/encoder/"):
            memory[case.name] = measure_memory(case.step, env.device, track=case.track)
    log(f"timing {len(cases)} cases: {rounds} rounds x {steps} steps")
    times = run_rounds(cases, env.device, rounds=rounds, steps=steps, warmup=args.warmup)
    return case_rows(cases, times, flops, memory, peak), times


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ssl_vit.bench import comparisons, markdown, matmul_peak, profile_step, scaling_rows, targets, write_json
    from ssl_vit.bench.workloads import eval_cases, scaling_cases, train_cases

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[benchmark {time.perf_counter() - t0:5.0f}s] {msg}", file=sys.stderr, flush=True)

    env, report = _setup(args)
    log(report["label"])
    cmd = args.command
    models = [m for m in args.models.split(",") if m]
    reference = not args.no_reference
    if cmd != "profile":
        peak = matmul_peak(env.device, env.compute_dtype, seconds=args.peak_seconds)
        report["matmul_peak"] = peak
        log(f"matmul peak {peak['flops_per_s'] / 1e9:.0f} GFLOP/s")
    rows, comps = [], []
    if cmd in ("train", "eval", "all"):
        for model in models:
            cfg = _workload_config(args, model)
            cases = []
            if cmd in ("train", "all"):
                cases += train_cases([o for o in args.objectives.split(",") if o], cfg, env, reference)
            if cmd in ("eval", "all"):
                cases += eval_cases(cfg, env, reference)
            peak = report["matmul_peak"]["flops_per_s"]
            model_rows, times = _measure(cases, env, args, peak, args.rounds, args.steps, log)
            for r in model_rows:
                r["model"] = model
            model_comps = comparisons(cases, times)
            for c in model_comps:
                c["model"] = model
            rows += model_rows
            comps += model_comps
    scaling: list[dict[str, Any]] = []
    if cmd in ("scaling", "all"):
        cfg = _workload_config(args, models[0])
        cases = scaling_cases(cfg, env, args.mask_ratios, args.sizes, args.scaling_batch)
        peak = report["matmul_peak"]["flops_per_s"]
        scale_rows, _ = _measure(cases, env, args, peak, args.scaling_rounds, args.scaling_steps, log)
        rows += scale_rows
        scaling = scaling_rows(scale_rows)
    if cmd in ("profile", "all"):
        wanted = getattr(args, "case", "mae/ours")
        cfg = _workload_config(args, models[0])
        group = wanted.split("/")[0]
        need_ref = not wanted.endswith("/ours")
        cases = train_cases([group], cfg, env, need_ref) if group != "eval" else eval_cases(cfg, env, need_ref)
        case = next((c for c in cases if c.name == wanted), None)
        if case is None:
            raise SystemExit(f"--case {wanted}: no such case; choose from {', '.join(c.name for c in cases)}.")
        log(f"profiling {wanted}")
        breakdown = profile_step(case.step, env.device, steps=args.steps, warmup=args.warmup)
        report["profile"] = {"case": wanted, **breakdown}
    report["cases"] = rows
    report["comparisons"] = comps
    report["scaling"] = scaling
    first = [c for c in comps if c.get("model") == models[0]]
    report["targets"] = targets(first, scaling)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    print(markdown(report))
    if args.out:
        log(f"wrote {write_json(report, args.out)}")
    return report


DATA_TOOL = Path(__file__).with_name("benchmark_data.py")


def run_data(argv: list[str], script: Path = DATA_TOOL) -> None:
    """Hand the remaining arguments to tools/benchmark_data.py (the data engineer's loader benchmark)."""
    if not script.exists():
        raise SystemExit(f"{script} is missing: the data-loader benchmark is not installed in this checkout.")
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data":
        run_data(argv[1:])
        return
    from ssl_vit.ops.linear import set_onednn_linear

    threads = torch.get_num_threads()
    try:
        run(build_parser().parse_args(argv))
    finally:  # --threads / --no-onednn change process-wide settings: leave them as found
        torch.set_num_threads(threads)
        set_onednn_linear(None)


if __name__ == "__main__":
    main()
