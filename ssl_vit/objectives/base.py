"""What an objective is, and the one place the engine asks an objective for its optional parts.

An objective is an `nn.Module` that turns a batch into a dict with a scalar `loss`. It owns its method:
its training views, its schedules (EMA momentum, temperatures), its teacher, its config, and which
encoder is exported. Every hook below is optional; the engine calls it at a fixed place of the loop
(see `ssl_vit/engine/trainer.py` and docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = [
    "Objective",
    "config_groups",
    "exported_backbone",
    "objective_kwargs",
    "train_transform",
]


@runtime_checkable
class Objective(Protocol):
    """The contract the engine relies on.

    Required:
    - `forward(batch) -> dict`: `loss` (scalar tensor) plus scalar metrics; the engine logs them all.
      A batch is a dict: `pixel_values` (B, 3, H, W), `labels` (B,) when `needs_labels`, and whatever
      the objective's `train_transform` returns (views; lists of views of other sizes).
    - `backbone`: the shared ViT being trained.

    Class attributes (all optional):
    - `needs_labels` (False): the data must have labels (they arrive as `batch["labels"]`).
    - `transform` ("supervised"): a built-in transform by name ("mae", "supervised", "eval"), used
      when the objective has no `train_transform`.
    - `backbone_defaults` ({}): backbone settings the method's paper uses (MAE `{"pos_embed": "sincos"}`,
      DINO `{"dynamic_img_size": True}`), applied where the user set nothing (`model.*` left None, the
      key not in `model.args`); the run's log says which were applied.
    - `config_groups` ({}): `{"group": Dataclass}`; each dataclass's fields become config keys
      `group.field` and the objective's constructor keyword arguments (several groups merge in order).
      Without groups, the constructor takes `objective.args`.

    Optional hooks, each called by the engine at one place (`step` = optimizer steps done, 0-based,
    the same after a resume; `total_steps` = the run's planned optimizer steps):
    - `on_train_start(total_steps, steps_per_epoch)`: once per session, after a resume, before the first
      step. `steps_per_epoch` = total_steps / train.epochs (train.schedule_epochs when set; a float):
      what one epoch of the objective's schedules lasts, so a run that train.max_steps shortens keeps
      each warm-up's share (DINO's 30 of 100 epochs of teacher-temperature warm-up -> 30% of the
      steps), as the lr warm-up does.
    - `train_transform(data_cfg) -> Callable[[PIL.Image], Tensor | dict]`: its own training views. A
      tensor becomes `pixel_values`; a dict is merged into the batch (a list of views of different
      sizes collates to a list of batched tensors, as torch's `default_collate`).
    - `on_step_start(step, total_steps)`: before the forward pass(es) of each optimizer step (schedules).
    - `on_before_optimizer_step(step, total_steps)`: after backward and gradient clipping, before the
      optimizer step (e.g. cancel the gradients of a layer frozen during warm-up).
    - `on_step_end(step, total_steps)`: after the optimizer step, on every process, under no_grad
      (e.g. an EMA teacher's update).
    - `export_backbone() -> nn.Module`: the encoder saved as `backbone.safetensors` and evaluated
      (default `self.backbone`; DINO and I-JEPA export their teacher). It must be a submodule.
    - `visualize(batch, mean, std) -> {name: Tensor(3, H, W) in [0, 1]}`: images to log and save;
      `mean` / `std` are the data normalisation, to turn inputs back into pixels.

    All state of the method (teacher, centres, queues) lives in its modules (parameters or buffers),
    so checkpoints hold it and a resumed run continues bit-exactly.
    """

    backbone: nn.Module
    needs_labels: ClassVar[bool]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...


def config_groups(cls: type) -> dict[str, type]:
    """The objective's config groups: `{"mae": MAEConfig}`; empty for objectives configured by `objective.args`."""
    groups = getattr(cls, "config_groups", None) or {}
    for name, schema in groups.items():
        if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
            raise TypeError(f"{cls.__name__}.config_groups['{name}'] must be a dataclass, got {schema!r}.")
    return dict(groups)


def objective_kwargs(cfg: Any, cls: type) -> dict[str, Any]:
    """Constructor kwargs of objective `cls` from a resolved run config: its groups' fields, then `objective.args`."""
    kwargs: dict[str, Any] = {}
    for name, schema in config_groups(cls).items():
        group = getattr(cfg, name, None) or schema()  # a config built in code may leave a group out
        kwargs.update({f.name: getattr(group, f.name) for f in dataclasses.fields(group)})
    kwargs.update(cfg.objective.args)
    return kwargs


def train_transform(objective: nn.Module, data_cfg: Any) -> str | Callable[..., Any]:
    """What the training loader applies: the objective's own `train_transform`, else its built-in name."""
    own = getattr(objective, "train_transform", None)
    if callable(own):
        return own(data_cfg)
    return getattr(objective, "transform", "supervised")


def exported_backbone(objective: nn.Module) -> tuple[nn.Module, str]:
    """(encoder to export and evaluate, its state_dict prefix inside the objective, e.g. "teacher.")."""
    export = getattr(objective, "export_backbone", None)
    module = export() if callable(export) else objective.backbone
    for name, child in objective.named_modules():
        if child is module:
            return module, (name + "." if name else "")
    raise TypeError(
        f"{type(objective).__name__}.export_backbone() returned a module that is not one of its submodules: "
        f"the engine saves it from the objective's checkpoint, so it must live inside the objective."
    )
