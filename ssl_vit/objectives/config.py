"""The `objective.*` config group: which objective a pretraining run trains.

Each objective's own settings (`mae.*`, `supervised.*`, `distill.*`, ...) are dataclasses declared in
its file (`config_groups`), joined to the run's schema when the config is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ObjectiveConfig:
    # A registered objective: "mae", "supervised", "deit", or one a user module registers.
    name: str = "mae"
    # A module to import first (e.g. "my_pkg.my_objective"); it calls `register_objective`.
    module: Optional[str] = None
    # Keyword arguments for objectives without config groups of their own (user objectives); for the
    # others they are passed on top of their groups' values.
    args: dict = field(default_factory=dict)
