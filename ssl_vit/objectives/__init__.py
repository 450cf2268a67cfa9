"""The objectives registry: `register_objective(name)` adds one, `build_objective(name, ...)` builds it."""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

import torch.nn as nn

from ssl_vit.objectives.base import Objective

__all__ = [
    "OBJECTIVES",
    "Objective",
    "UnknownObjectiveError",
    "build_objective",
    "get_objective",
    "import_objective_module",
    "register_objective",
]

OBJECTIVES: dict[str, type[nn.Module]] = {}

# Built-in objectives register themselves when their module is imported; importing lazily keeps
# `import ssl_vit.objectives` cheap and lets a missing optional dependency fail only when used.
_BUILTIN_MODULES = {
    "mae": "ssl_vit.objectives.mae",
    "supervised": "ssl_vit.objectives.supervised",
    "deit": "ssl_vit.objectives.distillation",
    "ijepa": "ssl_vit.objectives.ijepa",
    "dino": "ssl_vit.objectives.dino",
    "mocov3": "ssl_vit.objectives.mocov3",
    "simmim": "ssl_vit.objectives.simmim",
    "vqkd": "ssl_vit.objectives.vqkd",
    "beit": "ssl_vit.objectives.beit",
}


class UnknownObjectiveError(ValueError):
    """`objective.name` / `objective.module` name nothing that can be trained: the message says what can."""


def register_objective(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `@register_objective("my_method")` makes it trainable by `objective.name`."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        existing = OBJECTIVES.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"objective '{name}' is already registered by {existing.__module__}.{existing.__qualname__}")
        OBJECTIVES[name] = cls
        return cls

    return add


def import_objective_module(module: str) -> None:
    """Import a user's module so that its `register_objective` calls run."""
    import os
    import sys

    # `python recipes/pretrain.py` puts recipes/ on sys.path, not the directory the user launched from,
    # where their own module usually lives.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise UnknownObjectiveError(
            f"objective.module '{module}' could not be imported ({err}): make it importable "
            f"(installed, or on PYTHONPATH / in the working directory)."
        ) from None


def get_objective(name: str) -> type[nn.Module]:
    if name not in OBJECTIVES and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in OBJECTIVES:
        known = sorted(set(OBJECTIVES) | set(_BUILTIN_MODULES))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownObjectiveError(
            f"unknown objective '{name}'.{hint} Registered: {', '.join(known)}. A new objective registers "
            f"itself with @register_objective('{name}') in a module named by objective.module."
        )
    return OBJECTIVES[name]


def build_objective(name: str, backbone: nn.Module, **cfg: Any) -> nn.Module:
    """The objective `name` wrapped around `backbone`, configured by `cfg`."""
    return get_objective(name)(backbone, **cfg)
