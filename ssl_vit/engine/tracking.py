"""Experiment trackers (`train.report_to`): TensorBoard (the default), Weights & Biases, MLflow, several at once.

Accelerate runs them; this module builds them for a run (names and folders, a resumed run continuing its
tracker runs), logs the resolved config as hyperparameters at the start and the run's summary at the end.
W&B and MLflow are optional extras (`pip install -e ".[wandb]"`, `".[mlflow]"`); asking for one that is
not installed is a ConfigError naming the extra, raised when the run's Accelerator is made (before training).

    TensorBoard  output_dir/tb/ (the compare tool reads its loss curves there)
    W&B          project $WANDB_PROJECT (default "ssl_vit"), run named after output_dir, files in output_dir/wandb/;
                 WANDB_MODE=offline works without a network (`wandb sync` uploads later)
    MLflow       $MLFLOW_TRACKING_URI (a server, or sqlite:///mlflow.db with the full `mlflow` package),
                 experiment $MLFLOW_EXPERIMENT_NAME (default "ssl_vit"), run named after output_dir
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from ssl_vit.config import ConfigError, config_to_dict

__all__ = ["TRACKERS", "build_trackers", "check_trackers", "hyperparameters", "log_summary", "start_trackers",
           "tensorboard_writer"]

logger = logging.getLogger("ssl_vit.engine")

# report_to name -> (the module it needs, the extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", None), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
# Where a run keeps its W&B / MLflow run ids, so a resumed run logs into the same tracker runs.
IDS_FILE = "trackers.json"
DEFAULT_PROJECT = "ssl_vit"


class _MLflow(MLflowTracker):
    """MLflow's tracker for a run that may be resumed with other settings (a longer schedule, ...): MLflow
    refuses to change a logged parameter, so a resumed run keeps the first values and says which changed."""

    def store_init_configuration(self, values: dict) -> None:
        import mlflow

        if getattr(self, "active_run", None) is None:  # not started (a process other than the main one)
            return
        logged = mlflow.get_run(self.active_run.info.run_id).data.params
        changed = sorted(k for k, v in values.items() if k in logged and logged[k] != str(v))
        if changed:
            logger.warning("resumed MLflow run keeps the first values of %s (MLflow parameters cannot change)",
                           ", ".join(changed))
        super().store_init_configuration({k: v for k, v in values.items() if k not in logged})


def check_trackers(report_to: list[str]) -> None:
    """Every tracker asked for can start here; else a ConfigError naming what to install or set."""
    for name in report_to:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.report_to includes '{name}', but the {module} package is not installed: "
                f"pip install -e \".[{extra}]\" (or pip install {module}), or drop '{name}' from train.report_to."
            )
    if "mlflow" in report_to:
        import mlflow

        uri = mlflow.get_tracking_uri()
        database = urlparse(uri).scheme in ("sqlite", "postgresql", "mysql", "mssql")
        if database and importlib.util.find_spec("sqlalchemy") is None:
            raise ConfigError(
                f"train.report_to includes 'mlflow' and MLflow's tracking URI is {uri}, a database store, which "
                f"needs the full mlflow package (the [mlflow] extra installs the mlflow-skinny client): set "
                f"MLFLOW_TRACKING_URI to your tracking server (http://host:5000), or pip install mlflow."
            )


def build_trackers(cfg: Any) -> list[GeneralTracker]:
    """The trackers of `cfg.train.report_to` for Accelerator(log_with=...); they start in `start_trackers`."""
    report_to = list(dict.fromkeys(getattr(cfg.train, "report_to", ["tensorboard"])))  # in order, once each
    check_trackers(report_to)
    out = Path(cfg.output_dir)
    trackers: list[GeneralTracker] = []
    for name in report_to:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tb", str(out)))
        elif name == "wandb":
            project = os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT)
            trackers.append(WandBTracker(project, name=out.name, dir=str(out)))
        elif name == "mlflow":
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
            trackers.append(_MLflow(experiment_name=experiment, run_name=out.name))
    return trackers


def hyperparameters(cfg: Any) -> dict[str, bool | int | float | str]:
    """The resolved config as flat `group.key` hyperparameters (lists, mappings and null as their YAML text)."""
    flat: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = json.dumps(value, default=str)

    walk(config_to_dict(cfg), "")
    return flat


def start_trackers(accelerator: Any, cfg: Any, resumed: bool) -> None:
    """Start the run's trackers with its config as hyperparameters; a resumed run continues its tracker runs."""
    ids_path = Path(cfg.output_dir) / IDS_FILE
    ids = {}
    if resumed and ids_path.is_file():
        try:
            ids = json.loads(ids_path.read_text())
        except (OSError, json.JSONDecodeError):
            ids = {}
    for tracker in accelerator.log_with:
        if isinstance(tracker, WandBTracker) and ids.get("wandb"):
            tracker.init_kwargs.update(id=ids["wandb"], resume="allow")
        elif isinstance(tracker, MLflowTracker) and ids.get("mlflow"):
            tracker.run_id = tracker.run_id or ids["mlflow"]
    accelerator.init_trackers("tb", config=hyperparameters(cfg))
    if accelerator.is_main_process:
        started = {}
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                started["wandb"] = tracker.run.id
            elif tracker.name == "mlflow":
                started["mlflow"] = tracker.active_run.info.run_id
        if started:
            ids_path.write_text(json.dumps(started, indent=2) + "\n")


def log_summary(accelerator: Any, summary: dict[str, Any], step: int) -> None:
    """The run's final numbers as `summary/<key>` (W&B: its run summary; MLflow: metrics; TensorBoard: scalars)."""
    numbers = {f"summary/{k}": float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    accelerator.log(numbers, step=step)
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name == "wandb":
            tracker.run.summary.update(numbers)


class _NoWriter:
    """Stands in for TensorBoard's SummaryWriter when train.report_to leaves TensorBoard out."""

    def add_image(self, *args: Any, **kwargs: Any) -> None:
        pass


def tensorboard_writer(accelerator: Any) -> Any:
    """TensorBoard's SummaryWriter (images go there), or a writer that drops them when it is not tracked."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name == "tensorboard":
            return tracker.tracker
    return _NoWriter()
