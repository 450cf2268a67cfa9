"""Every setting is validated where it is read: a value outside what a field accepts is a ConfigError naming
the key, before any data, model or output folder is touched; combinations that cannot work, and files
that are no checkpoint at all, are named as such.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_common import TINY_MAE, load_recipe, one_paragraph

from ssl_vit.accepts import Each, Items, Range, rule_of
from ssl_vit.compare.plan import BudgetConfig, ComparePlan, EvalEntry, LauncherConfig, PretrainEntry
from ssl_vit.config import ConfigError, PretrainConfig, load_config
from ssl_vit.eval.config import FinetuneEvalConfig, KNNEvalConfig, LinearProbeEvalConfig
from ssl_vit.objectives import get_objective

BUILTIN_OBJECTIVES = ("mae", "supervised", "deit", "dino", "mocov3", "ijepa", "simmim", "beit", "vqkd")
# (schema, the arguments that choose it): every recipe schema, each objective's groups included.
SCHEMAS = [(PretrainConfig, [f"objective.name={name}"]) for name in BUILTIN_OBJECTIVES] + [
    (KNNEvalConfig, []), (LinearProbeEvalConfig, []), (FinetuneEvalConfig, []),
    # tools/compare.py plans: the plan, its budget and launcher, its pretraining and evaluation entries.
    (ComparePlan, []), (BudgetConfig, []), (LauncherConfig, []), (PretrainEntry, []), (EvalEntry, []),
]


def _unwrap(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")) and len(args) == 1 else tp


def leaf_fields(schema: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every leaf of a schema tree."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out += leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f, tp))
    return out


def resolved(schema: type, choose: list[str]) -> type:
    if schema is PretrainConfig:
        return PretrainConfig.for_objective(get_objective(choose[0].split("=")[1]))
    return schema


def is_numeric(tp: Any) -> bool:
    if typing.get_origin(tp) in (list, tuple):
        return all(a in (int, float) for a in typing.get_args(tp) if a is not Ellipsis) and bool(typing.get_args(tp))
    return tp in (int, float)


def is_integer(tp: Any) -> bool:
    return tp is int or (typing.get_origin(tp) in (list, tuple) and typing.get_args(tp)[:1] == (int,))


NUMERIC = [(s, c, key, f, tp) for s, c in SCHEMAS for key, f, tp in leaf_fields(resolved(s, c)) if is_numeric(tp)]
CHOICES = [(s, c, key) for s, c in SCHEMAS for key, f, tp in leaf_fields(resolved(s, c)) if typing.get_origin(tp) is Literal]
ids = lambda case: f"{case[0].__name__}:{case[2]}"  # noqa: E731


@pytest.mark.parametrize("case", NUMERIC, ids=[ids(c) for c in NUMERIC])
def test_every_numeric_field__declares_what_it_accepts_and_its_default_is_accepted(case):
    schema, choose, key, field, tp = case
    rule, _ = rule_of(field)
    assert rule is not None, f"{key} declares no accepted range: add setting(default, rule) in its dataclass"
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    assert default is None or rule.accepts(default), key


def output_dir(schema: type, out: Path) -> list[str]:
    """Recipe schemas write to output_dir (it must stay untouched); plan schemas have none."""
    return [f"output_dir={out}"] if "output_dir" in {f.name for f in dataclasses.fields(schema)} else []


def outside(rule: Range | Each | Items, integer: bool) -> st.SearchStrategy:
    """Values the rule refuses: at or past each bound (for a fixed-length list: every item past one item's rule)."""
    if isinstance(rule, Items):
        n = len(rule.rules)
        return st.one_of(*(_outside(r, integer) for r in dict.fromkeys(rule.rules))).map(lambda v: [v] * n)
    if isinstance(rule, Each):
        return _outside(rule.rule, integer).map(lambda v: [v])
    return _outside(rule, integer)


def _outside(inner: Range, integer: bool) -> st.SearchStrategy:
    options = []
    if inner.low is not None:
        hi = inner.low
        options.append(st.integers(max_value=int(hi) - (0 if inner.low_open else 1)) if integer else
                       st.floats(max_value=hi, exclude_max=not inner.low_open, allow_nan=False, allow_infinity=False))
    if inner.high is not None:
        lo = inner.high
        options.append(st.integers(min_value=int(lo) + (0 if inner.high_open else 1)) if integer else
                       st.floats(min_value=lo, exclude_min=not inner.high_open, allow_nan=False, allow_infinity=False))
    return st.one_of(*options)


BOUNDED = [c for c in NUMERIC if rule_of(c[3])[0] is not None]


@pytest.mark.parametrize("case", BOUNDED, ids=[ids(c) for c in BOUNDED])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_values_outside_the_declared_range__are_a_config_error_naming_the_key_and_nothing_is_written(tmp_path, case, data):
    schema, choose, key, field, tp = case
    rule, _ = rule_of(field)
    value = data.draw(outside(rule, is_integer(tp)))
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as caught:
        load_config(schema, [*choose, f"{key}={value!r}", *output_dir(schema, out)])
    message = str(caught.value)
    assert message.startswith(f"{key}=") and "must be" in message and one_paragraph(message), message
    assert not out.exists()


@pytest.mark.parametrize("key, value", [
    ("dino.global_crops_scale", [1.0, 0.4]),  # reversed: low > high
    ("ijepa.target_aspect_ratio", [1.5, 0.75]),
    ("mocov3.blur_prob", [1.0]),  # one view's value of two
    ("dino.color_jitter", [0.4, 0.4, 0.2, 0.6]),  # hue > 0.5
])
def test_fixed_length_lists_out_of_order_or_of_the_wrong_length__are_a_config_error(tmp_path, key, value):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as caught:
        load_config(PretrainConfig, [f"objective.name={key.split('.')[0]}", f"{key}={value!r}", f"output_dir={out}"])
    assert str(caught.value).startswith(f"{key}=") and "must be" in str(caught.value), str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize("case", CHOICES, ids=[ids(c) for c in CHOICES])
def test_values_outside_a_choice__are_a_config_error_naming_the_key(tmp_path, case):
    schema, choose, key = case
    with pytest.raises(ConfigError, match=rf"'{key}'.*one of"):
        load_config(schema, [*choose, f"{key}=not_a_choice", *output_dir(schema, tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_help__shows_what_each_key_accepts(capsys):
    with pytest.raises(SystemExit):
        load_config(PretrainConfig, ["objective.name=mae", "--help"])
    text = capsys.readouterr().out
    assert "train.grad_accum_steps = 1  (int; an integer >= 1; the number of batches per optimizer step)" in text
    assert "mae.mask_ratio = 0.75  (float; a number in (0, 1); the fraction of patches masked)" in text
    with pytest.raises(SystemExit):
        load_config(PretrainConfig, ["objective.name=dino", "--help"])
    text = capsys.readouterr().out
    assert "dino.global_crops_scale = [0.4, 1.0]  (list of float; a list of 2 numbers in (0, 1], low <= high;" in text


# -- combinations that cannot work, and files that are no checkpoint -------------------------------


@pytest.fixture(scope="module")
def recipes():
    return {name: load_recipe(name) for name in ("mae_pretrain", "knn")}


def test_warmup_as_long_as_the_run__names_both_and_the_fix(recipes, tmp_path):
    with pytest.raises(ConfigError) as caught:
        recipes["mae_pretrain"].main([*TINY_MAE, "optim.warmup_epochs=3", f"output_dir={tmp_path}"])
    message = str(caught.value)
    assert "optim.warmup_epochs=3 of train.epochs=3" in message and "whole run (12 steps)" in message
    assert not (tmp_path / "backbone.safetensors").exists() and not (tmp_path / "checkpoint-last").exists()


def test_batch_larger_than_the_data__says_nothing_would_be_trained(recipes, tmp_path):
    from ssl_vit.data import DataError

    with pytest.raises(DataError, match="fewer than one batch"):
        recipes["mae_pretrain"].main([*TINY_MAE, "train.batch_size=64", f"output_dir={tmp_path}"])
    assert not (tmp_path / "backbone.safetensors").exists()


@pytest.mark.parametrize("kind", ["text", "empty", "image", "text_named_safetensors"])
def test_checkpoint_that_is_no_checkpoint__is_named_as_such(recipes, tmp_path, kind):
    path: Path
    if kind == "image":
        path = tmp_path / "photo.png"
        Image.new("RGB", (8, 8)).save(path)
        says = "is a PNG image, not a checkpoint"
    elif kind == "empty":
        path = tmp_path / "model.pth"
        path.write_bytes(b"")
        says = "is an empty file (0 bytes), not a checkpoint"
    else:
        path = tmp_path / ("notes.txt" if kind == "text" else "weights.safetensors")
        path.write_text("learning rate 1e-3, 300 epochs\n")
        says = "is a text file (it starts 'learning rate 1e-3, 300 epochs'), not a checkpoint"
    args = ["data.image_size=16", "data.synthetic_train_size=16", "data.synthetic_eval_size=8", "data.num_workers=0",
            f"features.cache_dir={tmp_path / 'cache'}", f"checkpoint={path}", f"output_dir={tmp_path / 'knn'}"]
    with pytest.raises(ValueError) as caught:
        recipes["knn"].main(args)
    assert says in str(caught.value) and one_paragraph(str(caught.value)), str(caught.value)
