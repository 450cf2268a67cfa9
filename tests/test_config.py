"""Typed configs: YAML + dotted overrides, clear errors, resolved configs saved and reloaded."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest
import yaml

from ssl_vit.config import (
    ConfigError,
    PretrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    valid_keys,
)


def test_every_recipe_key_the_issue_names_exists_with_a_default():
    keys = set(valid_keys(PretrainConfig))
    for key in ["output_dir", "seed", "model.name", "data.name", "train.epochs", "train.max_steps", "train.batch_size"]:
        assert key in keys
    cfg = load_config(PretrainConfig, [])
    assert cfg.data.name == "synthetic" and cfg.model.name == "vit_nano_patch4_32"


def test_overrides__beat_the_file_which_beats_the_defaults(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("train:\n  epochs: 7\n  batch_size: 32\nmodel.name: vit_tiny_patch4_32\n")
    cfg = load_config(PretrainConfig, ["--config", str(file), "train.epochs=3"])
    assert cfg.train.epochs == 3  # override
    assert cfg.train.batch_size == 32  # file
    assert cfg.model.name == "vit_tiny_patch4_32"  # dotted key in the file
    assert cfg.train.grad_accum_steps == 1  # default


def test_default_file__used_unless_config_given(tmp_path):
    default = tmp_path / "default.yaml"
    default.write_text("seed: 5\n")
    other = tmp_path / "other.yaml"
    other.write_text("seed: 9\n")
    assert load_config(PretrainConfig, [], default_file=default).seed == 5
    assert load_config(PretrainConfig, [f"--config={other}"], default_file=default).seed == 9


def test_values__parsed_as_yaml_and_coerced_to_the_field_type():
    cfg = load_config(
        PretrainConfig,
        ["optim.blr=1e-3", "optim.betas=[0.9,0.999]", "train.max_steps=null", "model.args={depth: 2}", "data.name=123"],
    )
    assert cfg.optim.blr == pytest.approx(1e-3) and isinstance(cfg.optim.blr, float)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.train.max_steps is None
    assert cfg.model.args == {"depth": 2}
    assert cfg.data.name == "123"


@pytest.mark.parametrize(
    "arg, suggestion",
    [("trian.epochs=3", "train.epochs"), ("train.epoch=3", "train.epochs"), ("mae.mask_ration=0.5", "mae.mask_ratio"),
     ("sed=1", "seed")],
)
def test_unknown_key__error_names_the_closest_valid_key(arg, suggestion):
    with pytest.raises(ConfigError, match=rf"unknown config key '{arg.split('=')[0]}', did you mean '{suggestion}'\?"):
        load_config(PretrainConfig, [arg])


def test_unknown_key_in_a_file__error_too(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("train:\n  epohcs: 3\n")
    with pytest.raises(ConfigError, match="train.epohcs.*did you mean 'train.epochs'"):
        load_config(PretrainConfig, ["--config", str(file)])


@pytest.mark.parametrize(
    "arg, expected",
    [("train.epochs=abc", "expected int"), ("train.epochs=1.5", "expected int"), ("train.compile=3", "expected bool"),
     ("model.pos_embed=rope", "one of 'learn', 'sincos'"), ("seed=null", "cannot be null"),
     ("optim.betas=0.9", "expected list of float"), ("model=3", "a config group")],
)
def test_wrong_type__error_names_key_and_expected_type(arg, expected):
    with pytest.raises(ConfigError, match=rf"'{arg.split('=')[0]}'.*{expected}"):
        load_config(PretrainConfig, [arg])


def test_malformed_argument__says_how_to_write_overrides():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(PretrainConfig, ["train.epochs"])


def test_missing_config_file__clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, ["--config", str(tmp_path / "nope.yaml")])


def test_yaml__safe_loader_refuses_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    file = tmp_path / "evil.yaml"
    file.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, ["--config", str(file)])
    assert not marker.exists()


def test_saved_config__reloads_to_the_same_config(tmp_path):
    cfg = load_config(PretrainConfig, ["train.epochs=2", "optim.betas=[0.9,0.99]", "objective.args={a: 1}"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load(path.read_text())["train"]["epochs"] == 2
    again = load_config(PretrainConfig, ["--config", str(path)])
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


def test_help__lists_every_key_with_its_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(PretrainConfig, ["--help", "train.epochs=4"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "train.epochs = 4" in out and "mae.mask_ratio = 0.75" in out


@dataclasses.dataclass
class Inner:
    k: int = 20
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass
class Schema:
    inner: Inner = dataclasses.field(default_factory=Inner)
    ks: list[int] = dataclasses.field(default_factory=lambda: [10, 20])
    name: Optional[str] = None


def test_config_from_dict__works_for_any_dataclass_schema():
    cfg = config_from_dict(Schema, {"inner": {"mode": "b"}, "ks": [1, 2, 3]})
    assert cfg.inner == Inner(k=20, mode="b") and cfg.ks == [1, 2, 3] and cfg.name is None
    with pytest.raises(ConfigError, match=r"'ks\[1\]'.*expected int"):
        config_from_dict(Schema, {"ks": [1, "x"]})
