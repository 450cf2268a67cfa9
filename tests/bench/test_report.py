"""Rows, ratios, targets, the markdown table and the JSON file."""

from __future__ import annotations

import json

import pytest
import torch

from ssl_vit.bench import Case, case_rows, comparisons, loss_checks, markdown, scaling_rows, targets, write_json

TIMES = {
    "supervised/ours": [1.0, 1.0, 1.2],
    "supervised/timm": [1.1, 1.3, 1.2],
    "mae/ours": [0.4, 0.45, 0.5],
    "mae/hf": [0.5, 0.5, 0.5],
}


def _cases() -> list[Case]:
    role = {True: "ours", False: "reference"}
    return [Case(name, name.split("/")[0], role[name.endswith("ours")], lambda: None, 64) for name in TIMES]


def _report() -> dict:
    cases = _cases()
    memory = {"mae/ours": {"peak_mib": 900.0, "kind": "cpu_tensors", "rss_peak_mib": 2000.0}}
    rows = case_rows(cases, TIMES, {n: 10**11 for n in TIMES}, memory, 2e11)
    comps = comparisons(cases, TIMES)
    return {
        "date": "2026-12-05 03:00 UTC",
        "label": "Test CPU, 2 cores, 2 threads, torch x (CPU)",
        "machine": {"cpu": "Test CPU"},
        "matmul_peak": {
            "flops_per_s": 2e11, "size": 1024, "dtype": "float32", "by_backend": {"torch.mm": 1e11, "onednn": 2e11}
        },
        "cases": rows,
        "comparisons": comps,
        "targets": targets(comps, None, rows),
        "scaling": [],
    }


def test_case_rows__have_throughput_flops_fraction_of_peak_and_memory():
    rows = {r["name"]: r for r in _report()["cases"]}
    mae = rows["mae/ours"]
    assert mae["step_ms"] == pytest.approx(450.0)
    assert mae["images_per_s"] == pytest.approx(64 / 0.45)
    assert mae["gflop_per_image"] == pytest.approx(100 / 64)
    assert mae["fraction_of_peak"] == pytest.approx((1e11 / 0.45) / 2e11)
    assert mae["memory"]["peak_mib"] == 900.0
    assert "memory" not in rows["mae/hf"]
    for key in ("name", "group", "role", "step_ms_rounds", "achieved_flops_per_s", "info"):
        assert key in mae


def test_comparisons__median_of_per_round_images_per_s_ratios():
    comps = {(c["a"], c["b"]): c for c in _report()["comparisons"]}
    sup = comps[("supervised/ours", "supervised/timm")]
    assert sup["ratio"] == pytest.approx(1.1)  # per round: 1.1, 1.3, 1.0
    assert (sup["min"], sup["max"], sup["rounds"]) == (pytest.approx(1.0), pytest.approx(1.3), 3)
    assert sup["kind"] == "default" and sup["like_for_like"] and sup["linear"] == "plain / plain"
    assert comps[("mae/ours", "supervised/ours")]["kind"] == "cross"


def _twin_cases() -> tuple[list[Case], dict[str, list[float]]]:
    """Ours on oneDNN, the reference plain by default; twins on each path."""
    spec = {  # name: (role, linear, variant, seconds per round)
        "mae/ours": ("ours", "onednn", "", [1.0, 1.0, 1.0]),
        "mae/ours-plain": ("ours", "plain", "plain", [1.2, 1.2, 1.2]),
        "mae/hf": ("reference", "plain", "", [1.5, 1.5, 1.5]),
        "mae/hf+onednn": ("reference", "onednn", "onednn", [1.1, 1.1, 1.1]),
    }
    cases = [Case(n, "mae", role, lambda: None, 8, linear=lin, variant=v) for n, (role, lin, v, _) in spec.items()]
    return cases, {n: t for n, (*_, t) in spec.items()}


def test_comparisons__default_ratio_not_like_for_like_gets_its_twins():
    cases, times = _twin_cases()
    comps = {(c["a"], c["b"]): c for c in comparisons(cases, times)}
    assert set(comps) == {("mae/ours", "mae/hf"), ("mae/ours", "mae/hf+onednn"), ("mae/ours-plain", "mae/hf")}
    default = comps[("mae/ours", "mae/hf")]
    assert default["kind"] == "default" and not default["like_for_like"] and default["ratio"] == pytest.approx(1.5)
    assert comps[("mae/ours", "mae/hf+onednn")]["kind"] == "like-for-like"
    assert comps[("mae/ours-plain", "mae/hf")]["ratio"] == pytest.approx(1.25)


def test_targets__read_the_smallest_like_for_like_ratio_never_the_default_one():
    cases, times = _twin_cases()
    found = {t["target"]: t for t in targets(comparisons(cases, times))}
    mae = found["MAE step vs HF ViTMAEForPreTraining (like-for-like)"]
    assert mae["value"] == pytest.approx(1.1) and mae["note"] == "mae/ours / mae/hf+onednn"  # not the default 1.5
    assert mae["met"] is True and mae["threshold"] == 1.05 and mae["aim"] == 1.10


def test_targets__flag_met_and_unmet():
    found = {t["target"]: t for t in _report()["targets"]}
    assert found["supervised step vs timm's plain loop (like-for-like)"]["met"] is True
    mae_vs_hf = found["MAE step vs HF ViTMAEForPreTraining (like-for-like)"]
    assert mae_vs_hf["value"] == pytest.approx(0.5 / 0.45) and mae_vs_hf["met"] is True  # 1.25, 1.11, 1.0
    mae_vs_sup = found["MAE (mask 0.75) vs supervised images/s, same backbone"]
    assert mae_vs_sup["value"] == pytest.approx(2.4) and mae_vs_sup["met"] is True  # 2.5, 2.22, 2.4
    assert mae_vs_sup["aim"] == 2.5
    # No own-GEMM-shape peak in this report: judged against the square GEMM's, and named so.
    sup_peak = found["supervised step, fraction of the matmul peak (square GEMM)"]  # 1e11 FLOPs in 1.0 s of 2e11
    assert sup_peak["value"] == pytest.approx(0.5) and sup_peak["met"] is False
    assert found["MAE step, fraction of the matmul peak (square GEMM)"]["threshold"] == 0.70


def test_own_gemm_peak__gives_each_row_its_fraction_and_is_what_the_peak_targets_read():
    cases = _cases()
    gemm = {"supervised/ours": {"flops_per_s": 1.25e11}, "mae/ours": {"flops_per_s": 2.5e11}}
    rows = case_rows(cases, TIMES, {n: 10**11 for n in TIMES}, {}, 2e11, gemm_peaks=gemm)
    by_name = {r["name"]: r for r in rows}
    assert by_name["supervised/ours"]["fraction_of_gemm_peak"] == pytest.approx(1e11 / 1.0 / 1.25e11)  # 0.8
    assert by_name["mae/ours"]["fraction_of_gemm_peak"] == pytest.approx(1e11 / 0.45 / 2.5e11)  # 0.89
    assert "fraction_of_gemm_peak" not in by_name["mae/hf"]
    found = {t["target"]: t for t in targets(comparisons(cases, TIMES), None, rows)}
    assert found["supervised step, fraction of the matmul peak on its GEMM shapes"]["met"] is True  # 0.8 >= 0.75
    assert found["MAE step, fraction of the matmul peak on its GEMM shapes"]["met"] is True
    table = markdown({**_report(), "cases": rows})
    assert "its GEMM shapes' peak GFLOP/s | % of it |" in table and "| 125 | 80 |" in table


def test_loss_checks__compare_every_case_with_its_groups_ours():
    def case(name: str, value: float) -> Case:
        return Case(name, name.split("/")[0], "ours" if "ours" in name else "reference", lambda: None, 1,
                    loss=lambda: torch.tensor(value))

    checks = loss_checks([case("mae/ours", 1.0), case("mae/hf", 1.0 + 1e-6), case("deit/ours", 2.0), case("deit/timm", 2.1)])
    assert [(c["case"], c["same"]) for c in checks] == [("mae/hf", True), ("deit/timm", False)]
    assert checks[1]["abs_diff"] == pytest.approx(0.1)


def test_markdown__names_the_machine_and_has_every_table():
    text = markdown(_report())
    assert "Test CPU, 2 cores" in text and "**Date:** 2026-12-05 03:00 UTC" in text
    assert "| case | linear | img/s |" in text and "| supervised/timm | plain |" in text
    assert "| ratio of images/s" in text and "| default = like-for-like | plain / plain |" in text
    assert "Every default ratio above is like-for-like" in text
    assert "| target | measured | needs | aim | met |" in text
    assert "| supervised step, fraction of the matmul peak (square GEMM) | 50% | >= 75% | - | NO |" in text
    assert "onednn 200" in text  # peak by backend, GFLOP/s
    assert "| 900 |" in text and "live tensors at the step's peak" in text


def test_write_json__round_trips_the_fields(tmp_path):
    path = write_json(_report(), tmp_path / "sub" / "bench.json")
    data = json.loads(path.read_text())
    assert {"label", "machine", "matmul_peak", "cases", "comparisons", "targets"} <= set(data)
    assert data["cases"][0]["images_per_s"] > 0


def test_scaling_rows__pair_step_and_encoder_and_check_encoder_time_falls():
    def info(ratio: float, visible: int) -> dict:
        return dict(img_size=32, patch_size=4, patches=64, visible=visible, mask_ratio=ratio, batch_size=8)

    cases, times, flops = [], {}, {}
    for ratio, visible, t in ((0.5, 32, 0.4), (0.75, 16, 0.2), (0.9, 6, 0.1)):
        tag = f"32px/p4/mask{ratio:g}"
        cases += [Case(f"scaling/step/{tag}", "scaling", "ours", lambda: None, 8, info=info(ratio, visible)),
                  Case(f"scaling/encoder/{tag}", "scaling", "encoder", lambda: None, 8, info=info(ratio, visible))]
        times[f"scaling/step/{tag}"] = [2 * t]
        times[f"scaling/encoder/{tag}"] = [t]
        flops[f"scaling/step/{tag}"] = 1000
        flops[f"scaling/encoder/{tag}"] = visible * 10
    rows = scaling_rows(case_rows(cases, times, flops, {}, 1e9))
    assert [r["visible"] for r in rows] == [32, 16, 6]
    assert rows[1]["encoder_ms"] == pytest.approx(200.0) and rows[1]["encoder_flop_share"] == pytest.approx(0.16)
    check = targets([], rows)[-1]
    assert check["target"].startswith("encoder time falls") and check["met"] is True
    assert "| MAE image |" in markdown({"label": "x", "scaling": rows})


def test_markdown__warns_when_the_machine_was_busy():
    report = _report()
    report["machine"] = {"cpu": "Test CPU", "cores": 2, "load_average_1min": 9.5}
    assert "machine was busy (load average 9.5 on 2 cores)" in markdown(report)
    report["machine"]["load_average_1min"] = 0.5
    assert "busy" not in markdown(report)
    report["machine"]["load_average_1min_end"] = 1.5
    assert "**Load average (1 min):** 0.5 at the start, 1.5 at the end" in markdown(report)


def test_markdown__lists_loss_checks_and_grad_checkpointing_memory():
    report = _report()
    report["loss_checks"] = [{"case": "mae/hf", "ours": "mae/ours", "loss": 1.0, "ours_loss": 1.0, "abs_diff": 0.0, "same": True}]
    report["grad_checkpointing"] = [{
        "model": "vit_base_patch16_224", "objective": "mae", "batch_size": 4, "peak_mib_off": 2000.0, "peak_mib_on": 1500.0,
        "saving": 0.25, "activations_mib_off": 800.0, "activations_mib_on": 200.0, "activation_saving": 0.75,
        "step_ms_off": 900.0,
        "step_ms_on": 1100.0, "same_loss": True,
    }]
    text = markdown(report)
    assert "| mae/hf vs mae/ours | 1 | 1 | 0.0e+00 | yes |" in text
    assert "| vit_base_patch16_224, mae, 4 | 2000 | 1500 | 25% | 800 | 200 | 75% | 900 | 1100 | yes |" in text
