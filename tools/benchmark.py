"""Benchmark ssl_vit against timm, Hugging Face and the machine's matmul peak.

Sub-commands:
  train    training images/s of each objective vs a reference of the same size, FLOP/s, % of peak, memory
           (and the bare backbone's forward + backward vs timm's model of the same config)
  eval     feature extraction vs timm inference
  scaling  MAE step time vs mask ratio and image size (and the encoder's share)
  profile  where one step's time goes (matmul, attention, GELU, LayerNorm, copies, optimizer, ...)
  memory   peak memory of our supervised / MAE steps with train.grad_checkpointing off and on
  all      train + eval + scaling + a profile of the MAE step, one table and one JSON
  data     the data-loader benchmark (tools/benchmark_data.py; arguments passed through)

"Ours" is the engine's training step (a Trainer's `_train_batch`: forward, backward, lr update,
clipping, the non-finite check, fused AdamW); the references are plain loops with the same AdamW
implementation. Before timing, every reference is checked to compute the same loss as ours from the
same weights. Where ours computes its linear layers through oneDNN, each ratio gets like-for-like
twins (the reference on that path, ours off it); `--twins always` adds them everywhere.

Examples:
  python tools/benchmark.py all --out bench.json
  python tools/benchmark.py train --objectives supervised,mae --steps 2 --rounds 3
  python tools/benchmark.py scaling --mask-ratios 0.5,0.75,0.9 --sizes 32:4,64:4,224:16
  python tools/benchmark.py profile --case mae/hf
  python tools/benchmark.py memory --models vit_base_patch16_224,vit_large_patch16_224 --batch-size 4
  python tools/benchmark.py train --device cuda --precision bf16 --models vit_base_patch16_224 --batch-size 128

Ratios are medians of per-round ratios: every round runs each case for --steps steps, so a noisy
neighbour slows both sides of a ratio alike. Absolute images/s on a shared machine are only indicative.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import runpy
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ALL = ("backbone", "supervised", "mae", "deit", "dino", "mocov3", "simmim", "ijepa")


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
    g.add_argument(
        "--twins", default="auto", choices=["auto", "always", "never"],
        help="linear-path twins: auto (where ours uses oneDNN), always (both sides on oneDNN too), never",
    )
    g.add_argument("--mask-ratio", type=float, default=0.75)
    g.add_argument("--decoder-dim", type=int, default=None, help="MAE decoder width (default: 128 <= 64 px, else 512)")
    g.add_argument("--decoder-depth", type=int, default=None, help="MAE decoder blocks (default: 4 <= 64 px, else 8)")
    g.add_argument("--decoder-heads", type=int, default=None, help="MAE decoder heads (default: 4 <= 64 px, else 16)")
    g.add_argument("--num-classes", type=int, default=None, help="default: 10 for <= 64 px, else 1000")
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--dino-out-dim", type=int, default=None, help="DINO head's output dim (default: 4096 <= 64 px, else 65536)")
    g.add_argument("--local-crops", type=int, default=8, help="DINO's local views per image (default: %(default)s)")
    g.add_argument("--predictor-dim", type=int, default=None, help="I-JEPA predictor width (default: half the backbone's)")
    g.add_argument("--predictor-depth", type=int, default=None, help="I-JEPA predictor blocks (default: 2 <= 64 px, else 6)")
    g.add_argument("--peak-seconds", type=float, default=2.0, help="time spent measuring the matmul peak")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement step")
    g.add_argument(
        "--no-gemm-peak", action="store_true",
        help="skip each step's own-GEMM-shape peak (its matrix products replayed alone; about a second per case)",
    )
    g.add_argument("--out", default=None, help="write the report as JSON here")

    parser = argparse.ArgumentParser(
        prog="tools/benchmark.py", description=__doc__.split("\n\n")[0],
        epilog="Run 'tools/benchmark.py SUBCOMMAND --help' for a sub-command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,scaling,profile,memory,all,data}")
    train = sub.add_parser("train", parents=[common], help="training steps vs timm / Hugging Face")
    train.add_argument(
        "--objectives", default=",".join(ALL),
        help="comma-separated from backbone (forward + backward only), supervised, mae, deit, dino, mocov3 "
        "(vs lightly's MoCo v3 parts), simmim (vs lightly's SimMIM loop, the same masks), ijepa (ours only; reported as images/s next to mae) (default: all)",
    )
    sub.add_parser("eval", parents=[common], help="feature extraction vs timm inference")
    scaling = sub.add_parser("scaling", parents=[common], help="MAE step vs mask ratio and image size")
    prof = sub.add_parser("profile", parents=[common], help="where one step's time goes")
    prof.add_argument("--case", default="mae/ours", help="case to profile: mae/ours, mae/hf, ... (%(default)s)")
    memory = sub.add_parser("memory", parents=[common], help="peak memory with train.grad_checkpointing off and on")
    memory.add_argument("--objectives", default="supervised,mae", help="supervised and/or mae (default: %(default)s)")
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
            "twins": args.twins,
        },
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return env, report


def _workload_config(args: argparse.Namespace, model: str) -> Any:
    from ssl_vit.bench import WorkloadConfig

    return WorkloadConfig(
        model=model, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, num_classes=args.num_classes,
        mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
        decoder_heads=args.decoder_heads, onednn_objective=args.onednn_objective, twins=args.twins,
        dino_out_dim=args.dino_out_dim, local_crops=args.local_crops, predictor_dim=args.predictor_dim,
        predictor_depth=args.predictor_depth,
    )


def _measure(
    cases: list[Any], env: Any, args: argparse.Namespace, peak: float, rounds: int, steps: int, log: Any,
    datasheet: float | None = None, checks: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """Loss checks (before any step changes the weights), FLOPs (one step), memory (one step), then the
    interleaved timing rounds."""
    from ssl_vit.bench import GemmRecorder, case_rows, count_flops, gemm_shape_peak, loss_checks, measure_memory, run_rounds

    if checks is not None:
        found = loss_checks(cases, rtol=2e-2 if env.precision == "bf16" else 1e-4)
        bad = [c["case"] for c in found if not c["same"]]
        log(f"same loss as ours from the same weights: {len(found) - len(bad)} of {len(found)} cases"
            + (f"; DIFFERENT: {', '.join(bad)}" if bad else ""))
        checks += found
    flops, memory, gemm_peaks = {}, {}, {}
    for case in cases:
        # One run of the step counts its FLOPs and records its GEMM shapes (each then run alone: their peak).
        with contextlib.nullcontext() if args.no_gemm_peak else GemmRecorder() as gemms:
            flops[case.name] = count_flops(case.flops_fn or case.step)
        if gemms is not None:
            gemm_peaks[case.name] = gemm_shape_peak(gemms.products, env.device, env.compute_dtype)
        if not args.no_memory and not case.name.startswith("scaling/encoder/"):
            memory[case.name] = measure_memory(case.step, env.device, track=case.track)
    log(f"timing {len(cases)} cases: {rounds} rounds x {steps} steps")
    times = run_rounds(cases, env.device, rounds=rounds, steps=steps, warmup=args.warmup)
    return case_rows(cases, times, flops, memory, peak, datasheet, gemm_peaks), times


def _grad_checkpointing(args: argparse.Namespace, env: Any, models: list[str], log: Any) -> list[dict[str, Any]]:
    """Memory and step time of our steps with train.grad_checkpointing off and on, per model and objective.

    Each trainer first takes one step (its optimizer state then exists). Then: the peak of a whole
    training step (weights, gradients, optimizer state, activations), and the activations' memory: the
    peak of a forward + backward into already allocated gradients, less weights, gradients and
    optimizer state. At a small batch the step's peak is mostly the first three, which checkpointing
    does not touch; the activations show what it saves as the batch grows.
    """
    from ssl_vit.bench import loss_checks, measure_memory, run_rounds, tracked_bytes
    from ssl_vit.bench.workloads import grad_checkpointing_cases

    out = []
    mib = 2.0**20
    for model in models:
        cfg = _workload_config(args, model)
        for objective in [o for o in args.objectives.split(",") if o]:
            # One objective at a time, freed before the next: two ViT-L trainers with AdamW state are ~10 GB.
            cases = grad_checkpointing_cases(cfg, env, [objective])
            checks = loss_checks(cases, rtol=2e-2 if env.precision == "bf16" else 1e-5, atol=1e-6)
            memory, static, activations = {}, {}, {}
            for case in cases:
                log(f"{model} {case.name}: memory")
                case.step()  # optimizer state allocated
                static[case.name] = tracked_bytes(case.track) / mib  # weights + optimizer state
                memory[case.name] = measure_memory(case.step, env.device, track=case.track)
                # Forward + backward into gradients that already exist: what is above weights, gradients and
                # optimizer state at its peak is activations (and temporaries), whatever the batch size.
                module = case.track[0]
                for p in module.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
                with_grads = tracked_bytes(case.track) / mib
                fwd_bwd = measure_memory(case.flops_fn, env.device, track=case.track)
                activations[case.name] = fwd_bwd["peak_mib"] - with_grads
                module.zero_grad(set_to_none=True)
            log(f"{model} {objective}: timing 2 cases, {args.rounds} rounds x {args.steps} steps")
            times = run_rounds(cases, env.device, rounds=args.rounds, steps=args.steps, warmup=0)
            off, on = f"{objective}/ours", f"{objective}/ours+ckpt"
            peak_off, peak_on = memory[off]["peak_mib"], memory[on]["peak_mib"]
            row = {
                "model": model, "objective": objective, "batch_size": args.batch_size, "memory_kind": memory[off]["kind"],
                "peak_mib_off": peak_off, "peak_mib_on": peak_on, "saving": 1 - peak_on / peak_off,
                "static_mib": static[off],
                "activations_mib_off": activations[off], "activations_mib_on": activations[on],
                "activation_saving": 1 - activations[on] / activations[off],
                "rss_peak_mib_off": memory[off].get("rss_peak_mib"), "rss_peak_mib_on": memory[on].get("rss_peak_mib"),
                "step_ms_off": 1e3 * statistics.median(times[off]), "step_ms_on": 1e3 * statistics.median(times[on]),
                "same_loss": checks[0]["same"], "loss_abs_diff": checks[0]["abs_diff"],
            }
            log(f"{model} {objective}: {json.dumps(row)}")  # in the log too, should the process not finish
            out.append(row)
            del cases
            gc.collect()
    return out


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
    datasheet = report["machine"].get("gpu_datasheet_bf16_flops") if env.precision == "bf16" else None
    if cmd not in ("profile", "memory"):
        peak = matmul_peak(env.device, env.compute_dtype, seconds=args.peak_seconds)
        report["matmul_peak"] = peak
        log(f"matmul peak {peak['flops_per_s'] / 1e9:.0f} GFLOP/s")
    rows, comps, checks = [], [], []
    if cmd in ("train", "eval", "all"):
        for model in models:
            cfg = _workload_config(args, model)
            cases = []
            if cmd in ("train", "all"):
                cases += train_cases([o for o in args.objectives.split(",") if o], cfg, env, reference)
            if cmd in ("eval", "all"):
                cases += eval_cases(cfg, env, reference)
            peak = report["matmul_peak"]["flops_per_s"]
            model_checks: list[dict[str, Any]] = []
            model_rows, times = _measure(cases, env, args, peak, args.rounds, args.steps, log, datasheet, model_checks)
            for r in model_rows:
                r["model"] = model
            model_comps = comparisons(cases, times)
            for c in model_comps + model_checks:
                c["model"] = model
            rows += model_rows
            comps += model_comps
            checks += model_checks
    scaling: list[dict[str, Any]] = []
    if cmd in ("scaling", "all"):
        cfg = _workload_config(args, models[0])
        cases = scaling_cases(cfg, env, args.mask_ratios, args.sizes, args.scaling_batch)
        peak = report["matmul_peak"]["flops_per_s"]
        scale_rows, _ = _measure(cases, env, args, peak, args.scaling_rounds, args.scaling_steps, log, datasheet)
        rows += scale_rows
        scaling = scaling_rows(scale_rows)
    if cmd == "memory":
        report["grad_checkpointing"] = _grad_checkpointing(args, env, models, log)
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
    report["loss_checks"] = checks
    report["scaling"] = scaling
    first = [c for c in comps if c.get("model") == models[0]]
    report["targets"] = targets(first, scaling, [r for r in rows if r.get("model") == models[0]])
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
