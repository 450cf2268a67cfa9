"""Experiment trackers (`train.report_to`) with two real processes on the CPU: TensorBoard, W&B (offline mode,
no network) and MLflow (a file store in tmp_path) at once; the resolved config logged as hyperparameters,
the final numbers as the summary, one tracker run per run (the main process logs), continued on resume.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import yaml
from dist_launch import RECIPE_RUNS, TINY_MAE, free_port, run

from ssl_vit.config import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def wandb_offline_records(run_dir: Path) -> tuple[dict, dict]:
    """(config, summary) of a W&B offline run, read from its `run-<id>.wandb` file: a LevelDB-style log of
    `wandb_internal_pb2.Record` protobufs (7-byte file header; 32 KiB blocks of [crc u32, length u16, type u8]
    chunks, type 1 = whole record, 2/3/4 = first/middle/last part)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    config, summary, pos, part = {}, {}, 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            which = record.WhichOneof("record_type")
            if which == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif which == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif which == "summary":
                summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                for i in record.summary.update})
    return config, summary


def mlflow_metric(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """[(step, value)] of an MLflow file-store metric (lines `timestamp value step`)."""
    lines = (run_dir / "metrics" / key).read_text().split("\n")
    return [(int(line.split()[2]), float(line.split()[1])) for line in lines if line.strip()]


def test_report_to__tensorboard_wandb_and_mlflow_at_once_from_two_processes_with_config_and_summary(tmp_path):
    out, mlruns = tmp_path / "run", tmp_path / "mlruns"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "ssl_vit_test",
           "MLFLOW_TRACKING_URI": mlruns.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
           "MLFLOW_EXPERIMENT_NAME": "ssl_vit_test"}
    common = [*TINY_MAE, "optim.warmup_epochs=0", f"output_dir={out}"]
    plan = [
        # 4 steps (one epoch), all three trackers; then resumed to 8 steps with TensorBoard left out.
        {"recipe": "mae_pretrain.py", "args": [*common, "train.epochs=1", "train.report_to=[tensorboard,wandb,mlflow]"],
         "env": env},
        {"recipe": "mae_pretrain.py", "args": [*common, "train.report_to=[wandb,mlflow]"], "env": env},
    ]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = run([*TORCHRUN, "--master_port", str(free_port()), str(RECIPE_RUNS), str(tmp_path / "plan.json")],
               env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # TensorBoard (first session): hyperparameters (accelerate's hparams.yml beside the events) and the summary.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (hparams,) = (out / "tb").rglob("hparams.yml")
    assert yaml.safe_load(hparams.read_text())["train.batch_size"] == 4
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("summary/steps")] == [4.0]
    assert "train/loss" in events.Tags()["scalars"]

    # W&B: one offline run per session (the main process only), both with the same run id (resumed).
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    config, summary = wandb_offline_records(runs[-1])
    assert config["train.batch_size"] == 4 and json.loads(config["train.report_to"]) == ["wandb", "mlflow"]
    assert config["objective.name"] == "mae" and config["output_dir"] == str(out)
    assert summary["summary/steps"] == 8 and summary["summary/images_seen"] == 64 and "train/loss" in summary

    # MLflow: one run for both sessions (its id kept in output_dir/trackers.json), params = the config.
    (experiment,) = [p for p in mlruns.iterdir() if (p / "meta.yaml").is_file() and p.name != "0"]
    (run_dir,) = [p for p in experiment.iterdir() if p.is_dir() and (p / "params").is_dir()]
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == run_dir.name
    assert (run_dir / "params" / "train.batch_size").read_text() == "4"
    assert (run_dir / "params" / "data.image_size").read_text() == "16"
    assert [s for s, _ in mlflow_metric(run_dir, "summary/steps")] == [4, 8]
    steps = [s for s, _ in mlflow_metric(run_dir, "train/loss")]
    assert steps == [4, 8]  # train.log_every=4: one line per session, each logged once (not once per process)


def test_report_to__a_tracker_that_is_not_installed_is_a_config_error_naming_its_extra(monkeypatch):
    import importlib.util

    from ssl_vit.engine import tracking

    real = importlib.util.find_spec
    missing_wandb = lambda name, *a: None if name == "wandb" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(tracking.importlib.util, "find_spec", missing_wandb)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[wandb\]"'):
        tracking.check_trackers(["tensorboard", "wandb"])
    tracking.check_trackers(["tensorboard"])


def test_report_to__accepts_only_known_trackers():
    from ssl_vit.config import PretrainConfig, load_config

    assert load_config(PretrainConfig, ["objective.name=mae"]).train.report_to == ["tensorboard"]
    assert load_config(PretrainConfig, ["objective.name=mae", "train.report_to=[]"]).train.report_to == []
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(PretrainConfig, ["objective.name=mae", "train.report_to=[tensorboard,comet]"])
