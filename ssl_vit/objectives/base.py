"""What an objective is: an nn.Module that turns a batch into a dict with a scalar `loss`."""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class Objective(Protocol):
    """The contract the engine relies on (see docs/architecture.md).

    - `forward(batch) -> dict`: `loss` (scalar tensor) plus scalar metrics; the engine logs them all.
      A batch is a dict with `pixel_values` (B, 3, H, W) and `labels` (B,) when the data has them.
    - `backbone`: the shared ViT being trained; checkpoints export it in timm's layout.
    - `needs_labels` / `transform`: what the data pipeline must provide ("mae" or "supervised").
    - `config_group`: the config group whose fields are this objective's constructor kwargs
      (None: `objective.args`).
    - optional `visualize(batch) -> dict[str, Tensor(3, H, W) in [0, 1]]`: images to log and save.
    """

    backbone: nn.Module
    needs_labels: ClassVar[bool]
    transform: ClassVar[str]
    config_group: ClassVar[str | None]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
