"""Benchmarks: training and eval throughput against timm / Hugging Face, FLOPs and the matmul peak, scaling.

The command line is `tools/benchmark.py`; this package holds its parts:
`machine` (machine description, matmul peak), `gemm` (the matmul peak on a step's own GEMM shapes),
`flops` (FLOP counting), `timing` (interleaved rounds, memory), `workloads` (our steps and the
references), `profile` (where a step's time goes), `report` (rows, ratios, targets, markdown, JSON).
"""

from ssl_vit.bench.flops import count_flops, extra_flop_formulas
from ssl_vit.bench.gemm import GemmRecorder, gemm_shape_peak, gemm_shapes
from ssl_vit.bench.machine import machine_info, machine_label, matmul_peak
from ssl_vit.bench.profile import categorize, profile_step
from ssl_vit.bench.report import case_rows, comparisons, loss_checks, markdown, scaling_rows, targets, write_json
from ssl_vit.bench.timing import Case, measure_memory, median_ratio, run_rounds, tracked_bytes
from ssl_vit.bench.workloads import BenchEnv, WorkloadConfig

__all__ = [
    "BenchEnv",
    "Case",
    "GemmRecorder",
    "WorkloadConfig",
    "case_rows",
    "categorize",
    "comparisons",
    "count_flops",
    "extra_flop_formulas",
    "gemm_shape_peak",
    "gemm_shapes",
    "loss_checks",
    "machine_info",
    "machine_label",
    "markdown",
    "matmul_peak",
    "measure_memory",
    "median_ratio",
    "profile_step",
    "run_rounds",
    "scaling_rows",
    "targets",
    "tracked_bytes",
    "write_json",
]
