"""Typed configs: dataclass trees, YAML files and dotted command-line overrides.

Every recipe reads its configuration through `load_config(Schema, argv, default_file=...)`:
dataclass defaults, then the YAML file, then `key=value` overrides. Unknown keys and values of the
wrong type are errors that name the key and the fix, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ssl_vit.accepts import non_negative, rule_of, setting

__all__ = [
    "ConfigError",
    "PretrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_args",
    "save_config",
    "valid_keys",
]


class ConfigError(ValueError):
    """A configuration problem the user can fix: the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------------
# Schema introspection


def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def valid_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key a schema accepts (leaves and groups)."""
    keys = []
    for name, tp in _hints(schema).items():
        key = f"{prefix}{name}"
        keys.append(key)
        inner, _ = _unwrap_optional(tp)
        if _is_dataclass_type(inner):
            keys.extend(valid_keys(inner, key + "."))
    return keys


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(inner))
    elif origin in (list, tuple):
        args = typing.get_args(inner)
        name = f"list of {_type_name(args[0])}" if args else "list"
    elif origin is dict or inner is dict:
        name = "mapping"
    elif origin in (Union, types.UnionType):
        name = " or ".join(_type_name(a) for a in typing.get_args(inner))
    elif _is_dataclass_type(inner):
        name = "mapping (a config group)"
    else:
        name = getattr(inner, "__name__", str(inner))
    return name + (" or null" if optional else "")


def _unknown_key_error(key: str, root: type, root_prefix: str = "") -> ConfigError:
    candidates = valid_keys(root)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # a misspelt last part under a valid group still deserves a suggestion
        group, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in candidates if k.rpartition(".")[0] == group]
        near = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
        close = [f"{group}.{near[0]}" if group else near[0]] if near else []
    hint = f", did you mean '{close[0]}'?" if close else "."
    return ConfigError(
        f"unknown config key '{key}'{hint} Run the recipe with --help to list every key and its default."
    )


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' cannot be null: expected {_type_name(tp)}.")
    origin = typing.get_origin(inner)

    def bad() -> ConfigError:
        return ConfigError(
            f"config key '{key}' got {value!r} ({type(value).__name__}): expected {_type_name(tp)}."
        )

    if _is_dataclass_type(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise bad()
        return _from_dict(inner, value, key + ".", root)
    if origin is Literal:
        if value not in typing.get_args(inner):
            raise bad()
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(inner):
            try:
                return _coerce(value, option, key, root)
            except ConfigError:
                continue
        raise bad()
    if inner is Any:
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if inner is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if origin in (list, tuple) or inner in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad()
        args = typing.get_args(inner)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", root) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or inner is tuple) else items
    if origin is dict or inner is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if isinstance(value, inner):
        return value
    raise bad()


def _is_integer_type(tp: Any) -> bool:
    inner, _ = _unwrap_optional(tp)
    if typing.get_origin(inner) in (list, tuple):
        args = typing.get_args(inner)
        return bool(args) and args[0] is int
    return inner is int


def describe_rule(field: dataclasses.Field, tp: Any) -> str:
    """What a field accepts, in words ("an integer >= 1"), or "" when it declares nothing."""
    rule, _ = rule_of(field)
    return rule.describe(_is_integer_type(tp)) if rule is not None else ""


def _check_value(field: dataclasses.Field, tp: Any, value: Any, key: str) -> None:
    """The field's declared rule (ssl_vit/accepts.py): a value outside it is a ConfigError naming the fix."""
    rule, meaning = rule_of(field)
    if rule is None or value is None or rule.accepts(value):
        return
    what = f" ({meaning})" if meaning else ""
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    example = f" (e.g. {key}={default!r}, the default)" if default is not None else ""
    raise ConfigError(
        f"{key}={value!r}: must be {rule.describe(_is_integer_type(tp))}{what}. Set {key} to such a value"
        f"{example} on the command line or in the YAML; --help lists what every key accepts."
    )


def _from_dict(schema: type, data: dict, prefix: str, root: type) -> Any:
    hints = _hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            while isinstance(value, dict) and value:  # report the full dotted key the user wrote
                sub, value = next(iter(value.items()))
                key = f"{key}.{sub}"
            raise _unknown_key_error(key, root)
        kwargs[name] = _coerce(value, hints[name], key, root)
        _check_value(fields[name], hints[name], kwargs[name], key)
    # Nested groups not named in the data still get their defaults merged with nothing.
    return schema(**kwargs)


def resolved_schema(schema: type, data: dict) -> type:
    """The schema that reads `data`: a schema whose groups depend on a value (the pretraining
    objective's own groups) says so with a `resolve_schema(data)` classmethod."""
    resolve = getattr(schema, "resolve_schema", None)
    return resolve(data) if resolve is not None else schema


def config_from_dict(schema: type, data: dict) -> Any:
    """Build `schema` from a nested dict, checking every key and type."""
    data = data or {}
    schema = resolved_schema(schema, data)
    return _from_dict(schema, data, "", schema)


def config_to_dict(cfg: Any) -> dict:
    """A plain nested dict (tuples as lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


# ---------------------------------------------------------------------------------------------------
# Files and command lines


def _expand_dotted(data: dict, where: str) -> dict:
    """`{'train.epochs': 3}` -> `{'train': {'epochs': 3}}`, recursively; nested dicts merge."""
    out: dict = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: config keys must be strings, got {key!r}.")
        if isinstance(value, dict):
            value = _expand_dotted(value, where)
        _set_dotted(out, key, value)
    return out


def _set_dotted(target: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = target
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        _deep_merge(node[last], value)
    else:
        node[last] = value


def _deep_merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def read_yaml(path: str | Path) -> dict:
    """Read a YAML config with the safe loader (no Python objects are ever constructed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found: check the path given to --config.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values.")
    return _expand_dotted(data, str(path))


def parse_override(arg: str) -> tuple[str, Any]:
    """`train.epochs=3` -> ('train.epochs', 3); values are read as YAML scalars or lists."""
    key, sep, raw = arg.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(
            f"cannot read argument '{arg}': overrides are written key=value (e.g. train.epochs=3)."
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def parse_args(argv: list[str]) -> tuple[str | None, dict, bool]:
    """Split argv into (config file, overrides as a nested dict, help requested)."""
    config_file = None
    overrides: dict = {}
    want_help = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            want_help = True
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file: --config recipes/configs/mae_default.yaml")
            config_file = argv[i + 1]
            i += 1
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        else:
            key, value = parse_override(arg)
            _set_dotted(overrides, key, value)
        i += 1
    return config_file, overrides, want_help


def format_help(schema: type, defaults: Any) -> str:
    lines = ["usage: [--config FILE] [key=value ...]", "", "keys (current value) (type; what it accepts; meaning):"]
    flat = _flatten(config_to_dict(defaults))
    hints = {}

    def walk(s: type, prefix: str) -> None:
        fields = {f.name: f for f in dataclasses.fields(s)}
        for name, tp in _hints(s).items():
            inner, _ = _unwrap_optional(tp)
            if _is_dataclass_type(inner):
                walk(inner, f"{prefix}{name}.")
            else:
                _, meaning = rule_of(fields[name])
                parts = [_type_name(tp), describe_rule(fields[name], tp), meaning]
                hints[f"{prefix}{name}"] = "; ".join(p for p in parts if p)

    walk(schema, "")
    for key, tp in hints.items():
        lines.append(f"  {key} = {flat.get(key)!r}  ({tp})")
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            nested = _flatten(v, f"{prefix}{k}.")
            out.update(nested)
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(schema: type, argv: list[str] | None = None, default_file: str | Path | None = None) -> Any:
    """Defaults <- YAML (`--config FILE`, else `default_file`) <- `key=value` overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file, overrides, want_help = parse_args(argv)
    data: dict = {}
    source = config_file or default_file
    if source is not None:
        data = read_yaml(source)
    _deep_merge(data, overrides)
    cfg = config_from_dict(schema, data)
    if want_help:
        print(format_help(type(cfg), cfg))
        raise SystemExit(0)
    return cfg


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (what the run actually used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------
# Recipe schemas. Each group lives with the code that reads it; this module composes them.

from ssl_vit.data.config import DataConfig  # noqa: E402
from ssl_vit.engine.config import OptimConfig, TrainConfig  # noqa: E402
from ssl_vit.models.config import ModelConfig  # noqa: E402
from ssl_vit.objectives.config import ObjectiveConfig  # noqa: E402


@dataclasses.dataclass
class PretrainConfig:
    """Everything a pretraining run reads: `recipes/pretrain.py` and its per-method presets.

    The chosen objective's own groups (`mae.*`, `supervised.*` + `distill.*`, ...) join these when a
    config is read: `load_config(PretrainConfig, ...)` returns an instance of `PretrainConfig.for_objective(cls)`.
    """

    output_dir: str = "outputs/pretrain"
    seed: int = setting(0, non_negative(), "seeds init, data order, augmentations and masks")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)

    @classmethod
    def resolve_schema(cls, data: dict) -> type:
        """This schema plus the config groups of the objective that `data` names (objective.name / .module)."""
        from ssl_vit.objectives import UnknownObjectiveError, get_objective, import_objective_module

        chosen = data.get("objective") if isinstance(data.get("objective"), dict) else {}
        name = chosen.get("name", ObjectiveConfig.name)
        module = chosen.get("module")
        if not isinstance(name, str) or (module is not None and not isinstance(module, str)):
            return cls  # the type check of objective.* reports it
        try:
            if module:
                import_objective_module(module)
            objective = get_objective(name)
        except UnknownObjectiveError as err:
            raise ConfigError(f"objective.name={name}: {err}") from None
        return cls.for_objective(objective)

    @classmethod
    def for_objective(cls, objective: type) -> type:
        """This schema with `objective`'s config groups as fields (`mae: MAEConfig`, ...)."""
        from ssl_vit.objectives.base import config_groups

        return _with_groups(cls, tuple(config_groups(objective).items()))


@functools.lru_cache(maxsize=None)
def _with_groups(base: type, groups: tuple[tuple[str, type], ...]) -> type:
    if not groups:
        return base
    taken = {f.name for f in dataclasses.fields(base)} & {name for name, _ in groups}
    if taken:
        raise ConfigError(f"an objective's config group may not be named {sorted(taken)}: those keys belong to the run.")
    fields = [(name, schema, dataclasses.field(default_factory=schema)) for name, schema in groups]
    schema = dataclasses.make_dataclass(base.__name__, fields, bases=(base,))
    schema.__module__ = base.__module__
    schema.__doc__ = f"{base.__doc__}\n    With the groups {', '.join(name for name, _ in groups)}."
    return schema
