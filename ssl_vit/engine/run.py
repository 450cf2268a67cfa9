"""`run_pretrain(cfg)`: config -> data -> backbone -> objective -> Trainer, for every registered objective."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn
from accelerate.utils import set_seed

from ssl_vit.config import ConfigError
from ssl_vit.data import load_data, make_loader
from ssl_vit.engine.checkpoint import load_backbone
from ssl_vit.engine.process import process_state
from ssl_vit.engine.trainer import Trainer
from ssl_vit.models import create_model
from ssl_vit.objectives import build_objective, get_objective, import_objective_module
from ssl_vit.objectives.base import objective_kwargs, train_transform

__all__ = ["build_run_objective", "check_output_dir", "run_pretrain"]

log = logging.getLogger("ssl_vit.engine")


def check_output_dir(path: Any) -> None:
    """Create `path` and write a file in it now, so an unwritable output_dir fails before data and model are built."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(
            f"output_dir={path} cannot be created or written ({err.strerror or err}): set output_dir to a "
            f"writable folder (checkpoints and backbone.safetensors go there)."
        ) from None


def _objective_defaults(cfg: Any, objective: type) -> dict[str, Any]:
    """The objective's `backbone_defaults` that the user left unset (model.* None, not in model.args); logged."""
    m = cfg.model
    applied = {}
    for key, value in (getattr(objective, "backbone_defaults", None) or {}).items():
        if key in m.args or getattr(m, key, None) is not None:
            continue
        applied[key] = value
    if applied:
        shown = ", ".join(f"{k}={v}" for k, v in applied.items())
        log.info("objective %s sets the backbone's %s (set model.* / model.args to choose otherwise)", cfg.objective.name, shown)
    return applied


def _backbone(cfg: Any, objective: type, num_classes: int) -> nn.Module:
    """`model.*`: a fresh backbone, or one rebuilt from `model.checkpoint` (architecture and weights);
    the objective's backbone defaults (MAE: fixed sin-cos positions) where the user set nothing."""
    m = cfg.model
    img_size = m.img_size or cfg.data.image_size
    defaults = _objective_defaults(cfg, objective)
    if m.checkpoint:
        defaults.pop("pos_embed", None)  # the checkpoint's own positions (learned or fixed) stay as trained
        return load_backbone(m.checkpoint, m, num_classes=num_classes, img_size=img_size, **defaults)
    kwargs = dict(
        img_size=img_size,
        patch_size=m.patch_size,
        pos_embed=m.pos_embed,
        global_pool=m.global_pool,
        drop_path_rate=m.drop_path_rate,
        num_classes=num_classes,
    )
    kwargs.update(m.args)  # any other keyword of timm's VisionTransformer; wins over model.*
    kwargs.update(defaults)
    return create_model(m.name, **kwargs)


def build_run_objective(cfg: Any, num_classes: int) -> nn.Module:
    """The run's objective around its backbone: `objective.name` built from its config groups.

    The objective initialises its own modules as its paper does (MAE re-initialises the backbone);
    a `model.checkpoint`'s weights are then put back, so continued pretraining starts from them.
    """
    backbone = _backbone(cfg, get_objective(cfg.objective.name), num_classes)
    loaded = {k: v.clone() for k, v in backbone.state_dict().items()} if cfg.model.checkpoint else None
    objective = build_objective(cfg.objective.name, backbone, **objective_kwargs(cfg, get_objective(cfg.objective.name)))
    if loaded is not None:
        objective.backbone.load_state_dict(loaded)
    return objective


def run_pretrain(cfg: Any) -> dict[str, Any]:
    """Train `cfg.objective.name` on `cfg.data` with a `cfg.model` backbone; returns the Trainer's summary."""
    check_output_dir(cfg.output_dir)
    # Recipes are the entry point users run: show the engine's messages (data carved, resuming from
    # step N, ...). basicConfig does nothing where the caller configured logging already.
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if cfg.objective.module:  # read configs imported it already; a config built in code may not have
        import_objective_module(cfg.objective.module)
    needs_labels = bool(getattr(get_objective(cfg.objective.name), "needs_labels", False))
    # Dataset preparation (downloads, caches) once per machine, then every process reads the cache.
    with process_state().local_main_process_first():
        bundle = load_data(cfg.data, need_labels=needs_labels, seed=cfg.seed)

    set_seed(cfg.seed)  # the same initial weights on every process
    objective = build_run_objective(cfg, bundle.num_classes if needs_labels else 0)

    train_loader = make_loader(
        bundle, "train", train_transform(objective, cfg.data), cfg.train.batch_size, train=True, seed=cfg.seed,
        repeated_aug=cfg.data.repeated_aug,
    )
    eval_loader = None
    if needs_labels and bundle.eval is not None:
        eval_loader = make_loader(bundle, "eval", "eval", cfg.train.batch_size, train=False, seed=cfg.seed)
    return Trainer(cfg, objective, train_loader, eval_loader).fit()
