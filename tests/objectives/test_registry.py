"""The objectives registry: built-ins load lazily, users register their own, errors point to the fix."""

from __future__ import annotations

import sys

import pytest
import torch.nn as nn

from ssl_vit.objectives import OBJECTIVES, build_objective, get_objective, import_objective_module, register_objective


def test_builtin_objectives__resolve_by_name():
    for name in ("mae", "supervised", "deit"):
        cls = get_objective(name)
        assert isinstance(cls.needs_labels, bool) and cls.transform in ("mae", "supervised")


def test_unknown_objective__error_suggests_the_closest_and_how_to_register():
    with pytest.raises(ValueError, match=r"unknown objective 'mea'.*Did you mean 'mae'\?.*register_objective"):
        get_objective("mea")


def test_register_objective__builds_with_backbone_and_kwargs():
    @register_objective("test_registry_toy")
    class Toy(nn.Module):
        def __init__(self, backbone, scale=1.0):
            super().__init__()
            self.backbone, self.scale = backbone, scale

    try:
        toy = build_objective("test_registry_toy", nn.Linear(2, 2), scale=3.0)
        assert isinstance(toy, Toy) and toy.scale == 3.0
    finally:
        OBJECTIVES.pop("test_registry_toy")


def test_import_objective_module__finds_a_module_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_objective_mod.py").write_text(
        "import torch.nn as nn\n"
        "from ssl_vit.objectives import register_objective\n"
        "@register_objective('cwd_toy')\n"
        "class CwdToy(nn.Module):\n"
        "    def __init__(self, backbone):\n"
        "        super().__init__()\n"
        "        self.backbone = backbone\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        import_objective_module("cwd_objective_mod")
        assert "cwd_toy" in OBJECTIVES
    finally:
        OBJECTIVES.pop("cwd_toy", None)
        sys.modules.pop("cwd_objective_mod", None)


def test_import_objective_module__missing_module_says_how_to_make_it_importable():
    with pytest.raises(ValueError, match="could not be imported.*PYTHONPATH"):
        import_objective_module("no_such_pkg_for_ssl_vit.objective")
