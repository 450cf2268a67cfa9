"""Rows, ratios, targets, the markdown table and the JSON file."""

from __future__ import annotations

import json

import pytest

from ssl_vit.bench import Case, case_rows, comparisons, markdown, scaling_rows, targets, write_json

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
        "label": "Test CPU, 2 cores, 2 threads, torch x (CPU)",
        "machine": {"cpu": "Test CPU"},
        "matmul_peak": {
            "flops_per_s": 2e11, "size": 1024, "dtype": "float32", "by_backend": {"torch.mm": 1e11, "onednn": 2e11}
        },
        "cases": rows,
        "comparisons": comps,
        "targets": targets(comps),
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
    assert ("mae/ours", "supervised/ours") in comps


def test_targets__flag_met_and_unmet():
    found = {t["target"]: t for t in _report()["targets"]}
    assert found["supervised step vs timm + plain AdamW"]["met"] is True
    mae_vs_hf = found["MAE step vs HF ViTMAEForPreTraining"]
    assert mae_vs_hf["value"] == pytest.approx(0.5 / 0.45) and mae_vs_hf["met"] is True  # 1.25, 1.11, 1.0
    mae_vs_sup = found["MAE (mask 0.75) vs supervised, same backbone"]
    assert mae_vs_sup["value"] == pytest.approx(2.4) and mae_vs_sup["met"] is True  # 2.5, 2.22, 2.4


def test_markdown__names_the_machine_and_has_every_table():
    text = markdown(_report())
    assert "Test CPU, 2 cores" in text
    assert "| case | img/s |" in text and "| supervised/timm |" in text
    assert "| ratio of images/s" in text
    assert "| target | measured | needs | met |" in text
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
