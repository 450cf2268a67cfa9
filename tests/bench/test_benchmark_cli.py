"""tools/benchmark.py: help, an end-to-end tiny run that writes the JSON, and the `data` dispatch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "benchmark.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help__lists_every_subcommand(capsys):
    tool = load_tool()
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for sub in ("train", "eval", "scaling", "profile", "memory", "all", "data"):
        assert sub in out


def test_train_help__shows_the_options(capsys):
    with pytest.raises(SystemExit):
        load_tool().main(["train", "--help"])
    out = capsys.readouterr().out
    for option in ("--objectives", "--precision", "--steps", "--rounds", "--twins", "--out"):
        assert option in out
    for objective in ("dino", "mocov3", "simmim", "ijepa"):
        assert objective in out


def test_sizes__parse_image_and_patch():
    tool = load_tool()
    assert tool._sizes("32:4,224:16") == [(32, 4), (224, 16)]


TINY_RUN = ["--models", "vit_nano_patch4_32", "--batch-size", "4", "--steps", "1", "--rounds", "2", "--warmup", "0",
            "--peak-seconds", "0.05", "--threads", "1"]


@pytest.mark.slow
def test_train__tiny_run_checks_losses_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    load_tool().main(["train", *TINY_RUN, "--objectives", "supervised,mae", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| supervised/ours |" in text and "| mae/hf |" in text and "| target |" in text
    assert "**Date:**" in text and "**Load average (1 min):**" in text
    data = json.loads(out.read_text())
    names = {r["name"] for r in data["cases"]}
    assert names == {"supervised/ours", "supervised/timm", "mae/ours", "mae/hf"}
    for row in data["cases"]:
        assert row["images_per_s"] > 0 and row["flops_per_step"] > 0 and 0 < row["fraction_of_peak"]
        # Its own GEMM shapes replayed alone: every product of the step, fewer FLOPs than the whole step.
        assert 0 < row["gemm_peak"]["gemm_flops"] <= row["flops_per_step"] and row["fraction_of_gemm_peak"] > 0
        assert row["memory"]["kind"] in ("cpu_tensors", "cpu_rss") and row["memory"]["peak_mib"] > 0
        assert row["linear"] == "plain"  # the suite pins PyTorch's linear path: every ratio is like-for-like
    assert [(c["case"], c["same"]) for c in data["loss_checks"]] == [("supervised/timm", True), ("mae/hf", True)]
    assert {t["target"] for t in data["targets"]} >= {
        "MAE step vs HF ViTMAEForPreTraining (like-for-like)", "MAE step, fraction of the matmul peak on its GEMM shapes",
    }
    assert data["machine"]["cores"] >= 1 and data["matmul_peak"]["flops_per_s"] > 0 and "isa" in data["machine"]


@pytest.mark.slow
def test_memory__grad_checkpointing_off_and_on(tmp_path, capsys):
    out = tmp_path / "memory.json"
    load_tool().main(["memory", *TINY_RUN, "--objectives", "mae", "--out", str(out)])
    assert "| grad checkpointing" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["grad_checkpointing"]
    assert row["objective"] == "mae" and row["same_loss"]
    assert row["peak_mib_off"] > 0 and row["peak_mib_on"] > 0 and row["step_ms_off"] > 0
    assert 0 < row["activations_mib_on"] < row["activations_mib_off"]  # checkpointing keeps block inputs only


def test_data__passes_remaining_arguments_to_the_data_tool(tmp_path):
    seen = tmp_path / "argv.json"
    script = tmp_path / "benchmark_data.py"
    script.write_text(f"import json, sys\njson.dump(sys.argv[1:], open({str(seen)!r}, 'w'))\n")
    load_tool().run_data(["--batch-size", "8", "--workers", "2"], script=script)
    assert json.loads(seen.read_text()) == ["--batch-size", "8", "--workers", "2"]


def test_data__missing_tool_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="benchmark_data.py is missing"):
        load_tool().run_data([], script=tmp_path / "benchmark_data.py")
