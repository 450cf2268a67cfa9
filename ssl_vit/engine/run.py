"""`run_pretrain(cfg)`: config -> data -> backbone -> objective -> Trainer, for every registered objective."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

__all__ = ["objective_kwargs", "run_pretrain"]

log = logging.getLogger("ssl_vit.engine")


def objective_kwargs(cfg: Any, cls: type) -> dict[str, Any]:
    """Constructor kwargs of an objective: its config group(s)' fields, then `objective.args` on top.

    An objective names one group (`config_group = "mae"`) or several (`config_groups = ("supervised",
    "distill")`, merged in order); user objectives without a group take `objective.args` alone.
    """
    groups = getattr(cls, "config_groups", None) or ([cls.config_group] if getattr(cls, "config_group", None) else [])
    kwargs: dict[str, Any] = {}
    for name in groups:
        group = getattr(cfg, name, None)
        if group is None:
            raise ValueError(f"objective {cls.__name__} reads config group '{name}', which {type(cfg).__name__} lacks.")
        kwargs.update({f.name: getattr(group, f.name) for f in dataclasses.fields(group)})
    kwargs.update(cfg.objective.args)
    return kwargs


def _accepts(cls: type, name: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_output_dir(path: Any) -> None:
    """Create `path` and write a file in it now, so an unwritable output_dir fails before data and model are built."""
    import tempfile
    from pathlib import Path

    from ssl_vit.config import ConfigError

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(
            f"output_dir={path} cannot be created or written ({err.strerror or err}): set output_dir to a "
            f"writable folder (checkpoints and backbone.safetensors go there)."
        ) from None


def run_pretrain(cfg: Any) -> dict[str, Any]:
    """Train `cfg.objective.name` on `cfg.data` with a `cfg.model` backbone; returns the Trainer's summary."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env, set_seed

    from ssl_vit.data import load_data, make_loader
    from ssl_vit.engine.checkpoint import load_backbone
    from ssl_vit.engine.trainer import Trainer
    from ssl_vit.models import create_model
    from ssl_vit.objectives import build_objective, get_objective, import_objective_module

    check_output_dir(cfg.output_dir)
    # Recipes are the entry point users run: show the engine's messages (data carved, resuming from
    # step N, ...). basicConfig does nothing where the caller configured logging already.
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if cfg.objective.module:
        import_objective_module(cfg.objective.module)
    cls = get_objective(cfg.objective.name)
    needs_labels = bool(getattr(cls, "needs_labels", False))
    # As Accelerator does: `accelerate launch --cpu` / torchrun with ACCELERATE_USE_CPU=1 mean one CPU process
    # group. A plain PartialState() made first would settle on "not distributed" for every later Accelerator.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    # Dataset preparation (downloads, caches) once per machine, then every process reads the cache.
    with state.local_main_process_first():
        bundle = load_data(cfg.data, need_labels=needs_labels, seed=cfg.seed)

    set_seed(cfg.seed)  # the same initial weights on every process
    m = cfg.model
    num_classes = bundle.num_classes if needs_labels else 0
    kwargs = dict(
        img_size=m.img_size or cfg.data.image_size,
        patch_size=m.patch_size,
        pos_embed=m.pos_embed,
        global_pool=m.global_pool,
        drop_path_rate=m.drop_path_rate,
        num_classes=num_classes,
        **dict(m.args),
    )
    if m.checkpoint:
        backbone = load_backbone(m.checkpoint, m, num_classes=num_classes, img_size=kwargs["img_size"])
    else:
        backbone = create_model(m.name, **kwargs)

    obj_kwargs = objective_kwargs(cfg, cls)
    if m.checkpoint and _accepts(cls, "init_backbone"):
        obj_kwargs.setdefault("init_backbone", False)  # keep the loaded weights
    for key in ("mean", "std"):  # objectives that draw images (MAE) undo the data's normalisation
        if _accepts(cls, key):
            obj_kwargs.setdefault(key, tuple(getattr(cfg.data, key)))
    objective = build_objective(cfg.objective.name, backbone, **obj_kwargs)

    transform = getattr(cls, "transform", "supervised")
    train_loader = make_loader(
        bundle, "train", transform, cfg.train.batch_size, train=True, seed=cfg.seed, repeated_aug=cfg.data.repeated_aug
    )
    eval_loader = None
    if needs_labels and bundle.eval is not None:
        eval_loader = make_loader(bundle, "eval", "eval", cfg.train.batch_size, train=False, seed=cfg.seed)
    return Trainer(cfg, objective, train_loader, eval_loader).fit()
