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
    for sub in ("train", "eval", "scaling", "profile", "all", "data"):
        assert sub in out


def test_train_help__shows_the_options(capsys):
    with pytest.raises(SystemExit):
        load_tool().main(["train", "--help"])
    out = capsys.readouterr().out
    for option in ("--objectives", "--precision", "--steps", "--rounds", "--out"):
        assert option in out


def test_sizes__parse_image_and_patch():
    tool = load_tool()
    assert tool._sizes("32:4,224:16") == [(32, 4), (224, 16)]


@pytest.mark.slow
def test_train__tiny_run_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    load_tool().main([
        "train", "--models", "vit_nano_patch4_32", "--objectives", "supervised,mae", "--batch-size", "4",
        "--steps", "1", "--rounds", "2", "--warmup", "0", "--peak-seconds", "0.05", "--threads", "1", "--out", str(out),
    ])
    text = capsys.readouterr().out
    assert "| supervised/ours |" in text and "| mae/hf |" in text and "| target |" in text
    data = json.loads(out.read_text())
    names = {r["name"] for r in data["cases"]}
    assert names == {"supervised/ours", "supervised/timm", "mae/ours", "mae/hf"}
    for row in data["cases"]:
        assert row["images_per_s"] > 0 and row["flops_per_step"] > 0 and 0 < row["fraction_of_peak"]
        assert row["memory"]["kind"] in ("cpu_tensors", "cpu_rss") and row["memory"]["peak_mib"] > 0
    assert {t["target"] for t in data["targets"]} >= {"MAE step vs HF ViTMAEForPreTraining"}
    assert data["machine"]["cores"] >= 1 and data["matmul_peak"]["flops_per_s"] > 0


def test_data__passes_remaining_arguments_to_the_data_tool(tmp_path):
    seen = tmp_path / "argv.json"
    script = tmp_path / "benchmark_data.py"
    script.write_text(f"import json, sys\njson.dump(sys.argv[1:], open({str(seen)!r}, 'w'))\n")
    load_tool().run_data(["--batch-size", "8", "--workers", "2"], script=script)
    assert json.loads(seen.read_text()) == ["--batch-size", "8", "--workers", "2"]


def test_data__missing_tool_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="benchmark_data.py is missing"):
        load_tool().run_data([], script=tmp_path / "benchmark_data.py")
