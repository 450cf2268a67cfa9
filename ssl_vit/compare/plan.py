"""The comparison plan: what to pretrain, how to evaluate it, under which budget, with which launcher.

A plan is YAML (safe loader) validated like every other config here: an unknown key is an error that
names the closest valid key, a wrong type names the expected one. `load_plan` returns a `ComparePlan`;
`resolve_runs` turns it into the list of concrete runs (command lines, output folders, fingerprints).

Fairness by construction: `shared` settings (data, model size, ...) go to every run, each evaluation's
settings go to every method's evaluation of that protocol, the seeds are the same for every method,
and the budget gives each pretraining the same images seen (or wall-clock, or epochs). An entry that
overrides a shared key is allowed but reported in the results (a visible exception, not a silent one).

Pretraining seeds (`pretrain_seeds: [0, 1, 2]`): every pretraining entry runs once per seed (its
`seed=` key: init, data order, masks), in `pretrain/<name>` for the seed the entry runs without the
plan's list (its config's seed; so a single-seed comparison's runs are found again) and
`pretrain/<name>@seed<s>` for the others; `${name}` means the same seed's run of `name`. Each run is
evaluated with the plan's eval seeds under `eval/<name>[@seed<s>]/<column>`. A random init has no
pretraining: its init seed plays that part (see `resolve_runs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ssl_vit.accepts import at_least, each, non_negative, positive, setting
from ssl_vit.config import ConfigError, config_from_dict

__all__ = [
    "BudgetConfig",
    "ComparePlan",
    "EvalEntry",
    "LauncherConfig",
    "PretrainEntry",
    "Run",
    "RECIPES_DIR",
    "flatten_overrides",
    "format_value",
    "load_plan",
    "plan_from_dict",
    "resolve_runs",
]

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
PROTOCOLS = ("knn", "linear_probe", "finetune")


@dataclass
class BudgetConfig:
    """What every pretraining gets: equal images seen, equal wall-clock, equal epochs, or its own config."""

    # "images": train.max_steps = images // (batch_size * grad_accum_steps * num_processes).
    # "epochs": train.epochs = epochs. Both keep each config's schedule shares (train.schedule_epochs = its
    # epochs: a warm-up of 1 of 10 epochs stays 10% of the run).
    # "seconds": train.max_seconds = seconds: the run stops at the first step past the limit, its schedules
    # laid out over its config's epochs: a slow method stops mid-schedule (lr not decayed, EMA momentum not
    # at 1), a fast one may end its epochs before the limit. Read its rows as "what this time buys".
    # "none": each recipe's own config decides.
    kind: Literal["images", "seconds", "epochs", "none"] = "none"
    images: Optional[int] = setting(None, at_least(1), "images seen by each pretraining")
    seconds: Optional[float] = setting(None, positive(), "training seconds of each pretraining")
    epochs: Optional[int] = setting(None, at_least(1), "epochs of each pretraining")


@dataclass
class LauncherConfig:
    """How each run is started: `python recipes/X.py ...`, `accelerate launch ... recipes/X.py ...`, or as a
    job through submitit (SLURM, or `cluster: local` on this machine), one process per task."""

    kind: Literal["python", "accelerate", "submitit"] = "python"
    # accelerate only: `--config_file` (made by `accelerate config`) and `--num_processes`.
    config_file: Optional[str] = None
    num_processes: Optional[int] = setting(None, at_least(1))
    # More `accelerate launch` arguments, e.g. ["--mixed_precision", "bf16"].
    args: list[str] = field(default_factory=list)
    # python / accelerate: stop a run after this many seconds (it is then reported as failed); None: no limit.
    timeout_s: Optional[float] = setting(None, positive(), "seconds before a run is stopped")

    # submitit only (pip install -e ".[submitit]"): every run is a job of nodes x tasks_per_node processes,
    # each running the recipe with torch.distributed's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) set,
    # as torchrun would. Runs that do not depend on each other are submitted together; a run waits for the
    # jobs of the runs it needs. "local": jobs run on this machine (one node), to try a plan out.
    cluster: Literal["slurm", "local"] = "slurm"
    nodes: int = setting(1, at_least(1), "nodes per job")
    gpus_per_node: int = setting(0, non_negative(), "GPUs per node")
    # Processes per node; None: one per GPU (gpus_per_node), or 1 without GPUs.
    tasks_per_node: Optional[int] = setting(None, at_least(1), "processes per node")
    cpus_per_task: Optional[int] = setting(None, at_least(1), "CPU cores per process")
    mem_gb: Optional[float] = setting(None, positive(), "memory per node in GB")
    partition: Optional[str] = None
    # The job's time limit (SLURM's --time). A pretraining cut short by it resumes when the plan is rerun.
    timeout_min: int = setting(60, at_least(1), "each job's time limit in minutes")
    # More sbatch options, e.g. {account: my_account, qos: high, constraint: a100}.
    slurm_args: dict = field(default_factory=dict)
    # Shell lines run at the start of each job (module load ..., source venv/bin/activate).
    setup: list[str] = field(default_factory=list)
    # Seconds between checks of the submitted jobs' states.
    poll_s: float = setting(30.0, positive(), "seconds between job-state checks")

    @property
    def processes(self) -> int:
        """Processes of one run: 1 (python), nodes x tasks per node (submitit); accelerate: num_processes, else
        the config file's `num_processes` (what `accelerate launch` would start), else 1."""
        if self.kind == "accelerate":
            if self.num_processes is None and self.config_file and Path(self.config_file).is_file():
                return int((yaml.safe_load(Path(self.config_file).read_text()) or {}).get("num_processes") or 1)
            return self.num_processes or 1
        if self.kind == "submitit":
            return self.nodes * (self.tasks_per_node or max(self.gpus_per_node, 1))
        return 1


@dataclass
class PretrainEntry:
    """One row of the table: a pretraining run, an existing checkpoint, or `checkpoint: random`."""

    name: str = ""
    # A recipe under recipes/ ("mae_pretrain", "supervised_pretrain", "deit_pretrain", "pretrain") or a
    # path to a script taking the same arguments.
    recipe: Optional[str] = None
    # Shorthand for recipe "pretrain" with objective.name=<objective> (any registered objective).
    objective: Optional[str] = None
    # The recipe's YAML; None: the recipe's own default (recipes/configs/<method>_default.yaml).
    config: Optional[str] = None
    # key: value overrides (nested or dotted). In any string value of a plan's overrides, `${name}` is the
    # output folder of pretrain entry `name` (e.g. distill.teacher: ${supervised}) and `${out}` the
    # comparison's folder.
    overrides: dict = field(default_factory=dict)
    # Instead of pretraining: an existing run's output_dir / checkpoint file, or "random".
    checkpoint: Optional[str] = None
    # False: run it (e.g. a DeiT teacher other entries refer to as ${name}) but do not evaluate it.
    evaluate: bool = True
    # Per evaluation column, overrides for this entry's evaluations only (after the column's own), where
    # a method's paper reads its features another way, e.g. I-JEPA (no trained class token):
    # {knn: {features.pool: avg}, linear_probe: {features.pool: avg}}. The table lists them as exceptions.
    eval_overrides: dict = field(default_factory=dict)


@dataclass
class EvalEntry:
    """One column of the table: a protocol with its settings, the same for every method."""

    protocol: Literal["knn", "linear_probe", "finetune"] = "knn"
    # Column name; None: the protocol. Give names to run one protocol with two settings.
    name: Optional[str] = None
    # None: recipes/<protocol>.py.
    recipe: Optional[str] = None
    config: Optional[str] = None
    overrides: dict = field(default_factory=dict)
    # Seeds of this protocol (e.g. one for a costly fine-tune); None: the plan's. Every method gets the same.
    seeds: Optional[list[int]] = setting(None, each(non_negative()))


@dataclass
class ComparePlan:
    """A whole comparison (see recipes/configs/compare/*.yaml for examples)."""

    name: str = "compare"
    description: str = ""
    # Output folder; `tools/compare.py --out DIR` wins. None: outputs/compare/<name>.
    out: Optional[str] = None
    # Overrides given to every run, pretraining and evaluation alike (data.*, model.name, ...).
    shared: dict = field(default_factory=dict)
    # Overrides given to every pretraining run (after `shared`).
    pretrain_shared: dict = field(default_factory=dict)
    # Evaluation seeds, the same for every method (each eval recipe gets seeds=[...]).
    seeds: list[int] = setting([0], each(non_negative()), "evaluation seeds")
    # Pretraining seeds: each pretraining entry runs once per seed (seed=<s>) and the table gives the mean,
    # std and 95% t-interval over them. None: one run per entry with its config's seed (no interval).
    pretrain_seeds: Optional[list[int]] = setting(None, each(non_negative()), "pretraining seeds")
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    pretrain: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Loading and validation


def _check_keys(schema: type, data: Any, where: str) -> None:
    """Unknown keys of a plan mapping -> ConfigError naming the closest valid key and where it is."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}.")
    known = [f.name for f in dataclasses.fields(schema)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f", did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(known)}."
            raise ConfigError(f"{where}: unknown plan key '{key}'{hint}")


def _typed(schema: type, data: dict, where: str) -> Any:
    _check_keys(schema, data, where)
    for name, tp in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(tp) and data.get(name) is not None:
            _check_keys(tp, data[name], f"{where}: {name}")
    try:
        return config_from_dict(schema, data)
    except ConfigError as err:
        # config_from_dict names the key relative to this mapping; say which mapping it is.
        raise ConfigError(f"{where}: {str(err).split(' Run the recipe')[0]}") from None


def plan_from_dict(data: dict, source: str = "plan") -> ComparePlan:
    """Validate a plan mapping (as read from YAML) into a `ComparePlan` with typed entries."""
    plan = _typed(ComparePlan, data, source)
    if not plan.pretrain:
        raise ConfigError(f"{source}: 'pretrain' lists no entries: add at least one (e.g. '- name: random').")
    if not plan.evaluations:
        raise ConfigError(f"{source}: 'evaluations' lists no entries: add e.g. '- protocol: knn'.")
    if not plan.seeds or len(set(plan.seeds)) != len(plan.seeds):
        raise ConfigError(f"{source}: 'seeds' must be distinct integers, e.g. [0, 1, 2]; got {plan.seeds}.")
    seeds = plan.pretrain_seeds
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{source}: 'pretrain_seeds' must be distinct integers, e.g. [0, 1, 2] "
                          f"(or leave it out for one run per entry); got {seeds}.")
    plan.pretrain = [_pretrain_entry(e, f"{source}: pretrain[{i}]") for i, e in enumerate(plan.pretrain)]
    plan.evaluations = [_eval_entry(e, f"{source}: evaluations[{i}]") for i, e in enumerate(plan.evaluations)]
    _check_names([e.name for e in plan.pretrain], "pretrain", source)
    _check_names([e.name or e.protocol for e in plan.evaluations], "evaluations", source)
    columns = [e.name or e.protocol for e in plan.evaluations]  # type: ignore[union-attr]
    for e in plan.pretrain:
        for column, overrides in e.eval_overrides.items():  # type: ignore[union-attr]
            where = f"{source}: pretrain entry '{e.name}'.eval_overrides"  # type: ignore[union-attr]
            if column not in columns:
                raise ConfigError(f"{where}: '{column}' is not an evaluation column; the plan's are "
                                  f"{', '.join(columns)}.")
            if not isinstance(overrides, dict):
                raise ConfigError(f"{where}.{column} must be a mapping of keys to values, e.g. "
                                  f"{{features.pool: avg}}; got {overrides!r}.")
            _check_overrides(overrides, f"{where}.{column}")
    _check_budget(plan.budget, source)
    _check_launcher(plan.launcher, source)
    for key in ("shared", "pretrain_shared"):
        _check_overrides(getattr(plan, key), f"{source}: {key}")
    if seeds is not None:
        pinned = ["pretrain_shared"] if "seed" in flatten_overrides(plan.pretrain_shared) else []
        pinned += [f"pretrain entry '{e.name}'" for e in plan.pretrain  # type: ignore[union-attr]
                   if "seed" in flatten_overrides(e.overrides)]  # type: ignore[union-attr]
        if pinned:
            raise ConfigError(
                f"{source}: {', '.join(pinned)} sets 'seed', which pretrain_seeds {seeds} sets for every "
                f"pretraining run; remove it (or drop pretrain_seeds)."
            )
    return plan


_SUBMITIT_KEYS = ("cluster", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "partition",
                  "timeout_min", "slurm_args", "setup", "poll_s")


def _check_launcher(launcher: LauncherConfig, source: str) -> None:
    """Keys of one launcher kind given with another are errors, not silently ignored settings."""
    given = [k for k in _SUBMITIT_KEYS if getattr(launcher, k) != getattr(LauncherConfig(), k)]
    if launcher.kind != "submitit" and given:
        raise ConfigError(f"{source}: launcher.{', launcher.'.join(given)} need(s) launcher.kind: submitit.")
    if launcher.kind != "accelerate" and (launcher.config_file or launcher.num_processes):
        processes = "python runs one process" if launcher.kind == "python" else "submitit: nodes x tasks_per_node"
        raise ConfigError(f"{source}: launcher.config_file/num_processes need launcher.kind: accelerate ({processes}).")
    if launcher.kind == "submitit":
        if launcher.timeout_s is not None:
            raise ConfigError(f"{source}: launcher.timeout_s is for python/accelerate runs; a job's limit is "
                              f"launcher.timeout_min.")
        if launcher.args:
            raise ConfigError(f"{source}: launcher.args are `accelerate launch` arguments; a submitit job runs the "
                              f"recipe with python in each of its processes.")
        if launcher.cluster == "local" and launcher.nodes > 1:
            raise ConfigError(f"{source}: launcher.cluster: local runs jobs on this machine, one node: set nodes: 1.")


def _pretrain_entry(data: Any, where: str) -> PretrainEntry:
    if isinstance(data, dict) and data.get("name"):
        where = f"{where} ('{data['name']}')"
    entry = _typed(PretrainEntry, data, where)
    if not entry.name or not re.fullmatch(r"[A-Za-z0-9_.+-]+", entry.name) or entry.name == "out":
        raise ConfigError(f"{where}: 'name' is required (letters, digits, _ . + -; not 'out', which ${{out}} "
                          f"means), e.g. name: mae.")
    sources = [k for k in ("recipe", "objective", "checkpoint") if getattr(entry, k) is not None]
    if len(sources) != 1:
        raise ConfigError(
            f"{where}: give exactly one of 'recipe' (e.g. mae_pretrain), 'objective' (e.g. mae) or "
            f"'checkpoint' (a run folder, a checkpoint file, or random); got {sources or 'none'}."
        )
    if entry.checkpoint is not None and (entry.config or entry.overrides):
        raise ConfigError(f"{where}: a 'checkpoint' entry trains nothing: remove its 'config'/'overrides'.")
    _check_overrides(entry.overrides, f"{where}.overrides")
    return entry


def _eval_entry(data: Any, where: str) -> EvalEntry:
    if isinstance(data, dict) and data.get("protocol"):
        where = f"{where} ('{data.get('name') or data['protocol']}')"
    entry = _typed(EvalEntry, data, where)
    if entry.name is not None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", entry.name):
        raise ConfigError(f"{where}: 'name' may hold letters, digits, _ . + - only; got '{entry.name}'.")
    _check_overrides(entry.overrides, f"{where}.overrides")
    if entry.seeds is not None and (not entry.seeds or len(set(entry.seeds)) != len(entry.seeds)):
        raise ConfigError(f"{where}: 'seeds' must be distinct integers, e.g. [0]; got {entry.seeds}.")
    return entry


def _check_names(names: list[str], what: str, source: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{source}: two {what} entries are named '{name}': names must be unique.")
        seen.add(name)


def _check_budget(budget: BudgetConfig, source: str) -> None:
    need = {"images": budget.images, "seconds": budget.seconds, "epochs": budget.epochs}
    if budget.kind != "none":
        value = need[budget.kind]
        if value is None or value <= 0:
            raise ConfigError(f"{source}: budget.kind {budget.kind} needs a positive budget.{budget.kind}.")


_MANAGED = ("output_dir", "checkpoint", "seeds")


def _check_overrides(overrides: dict, where: str) -> None:
    for key in flatten_overrides(overrides):
        if key in _MANAGED:
            raise ConfigError(
                f"{where}: '{key}' is set by the comparison for every run; remove it from the plan."
            )


def load_plan(path: str | Path) -> ComparePlan:
    """Read and validate a plan YAML file (safe loader)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plan file '{path}' not found: give --plan recipes/configs/compare/compare_default.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"plan file '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"plan file '{path}' must hold a mapping (name, shared, pretrain, evaluations, ...).")
    return plan_from_dict(data, source=str(path))


# ---------------------------------------------------------------------------------------------------
# Overrides


def flatten_overrides(overrides: dict, prefix: str = "") -> dict[str, Any]:
    """`{'train': {'epochs': 3}, 'data.name': 'x'}` -> `{'train.epochs': 3, 'data.name': 'x'}`."""
    out: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_overrides(value, full + "."))
        else:
            out[full] = value
    return out


def format_value(value: Any) -> str:
    """A value as the recipes' `key=value` parser (YAML) reads it back unchanged."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and value == value.strip() and value:
                return value
        except yaml.YAMLError:
            pass
        return json.dumps(value)
    return json.dumps(value)  # JSON is YAML: null, true, 3, 0.5, [0, 1], {"a": 1}


_REF = re.compile(r"\$\{([A-Za-z0-9_.+-]+)\}")


# ---------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    """One subprocess to run (or a checkpoint to take as it is), with what it depends on."""

    id: str  # "pretrain/mae", "eval/mae/knn", "pretrain/mae@seed1", "eval/mae@seed1/knn"
    kind: Literal["pretrain", "eval", "checkpoint"]
    method: str  # the pretrain entry's name (the table's row)
    column: Optional[str]  # the eval entry's name (the table's column); None for pretraining
    protocol: Optional[str]
    output_dir: Path
    script: Optional[Path]
    args: list[str]  # recipe arguments: --config FILE key=value ...
    depends: list[str]  # run ids that must be complete first
    fingerprint: str
    checkpoint: Optional[str] = None  # eval runs: what they judge; checkpoint entries: the path
    budget: dict = field(default_factory=dict)  # pretraining: what the budget resolved to
    exceptions: list[str] = field(default_factory=list)  # shared keys this entry overrides
    evaluate: bool = True
    # The pretraining seed (of this run, or of the run an eval judges); None: the config's own (not varied).
    seed: Optional[int] = None
    # The method's run it belongs to: "mae" (its config's seed) or "mae@seed1".
    label: str = ""
    # Eval of a random init under pretrain_seeds: each of its eval seeds draws another init, so each is a run.
    seeds_are_inits: bool = False

    def command(self, launcher: LauncherConfig, python: str) -> list[str]:
        """The full command line (launcher + script + args)."""
        if self.script is None:
            return []
        if launcher.kind == "accelerate":  # (submitit: each of a job's processes runs python script args)
            cmd = [python, "-m", "accelerate.commands.launch"]
            if launcher.config_file:
                cmd += ["--config_file", str(launcher.config_file)]
            if launcher.num_processes:
                cmd += ["--num_processes", str(launcher.num_processes)]
            cmd += list(launcher.args)
            return cmd + [str(self.script), *self.args]
        return [python, str(self.script), *self.args]


def _find_recipe(recipe: str, where: str) -> Path:
    path = Path(recipe)
    if path.suffix == ".py":
        if path.is_file():
            return path.resolve()
        raise ConfigError(f"{where}: recipe script '{recipe}' not found.")
    candidate = RECIPES_DIR / f"{recipe}.py"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.py")) if RECIPES_DIR.is_dir() else []
    close = difflib.get_close_matches(recipe, known, n=1, cutoff=0.5)
    hint = f", did you mean '{close[0]}'?" if close else f" (recipes here: {', '.join(known) or 'none'})."
    raise ConfigError(f"{where}: no recipe '{recipe}' in {RECIPES_DIR}{hint}")


def _find_config(config: Optional[str], script: Path, where: str) -> Optional[Path]:
    """The YAML a run reads: the plan's, else the recipe's own default (passed explicitly, so the
    budget computed here from its batch size is the one the run uses)."""
    if config is not None:
        for path in (Path(config), RECIPES_DIR.parent / config):
            if path.is_file():
                return path.resolve()
        raise ConfigError(f"{where}: config file '{config}' not found (paths are relative to the working folder).")
    stem = script.stem.removesuffix("_pretrain")
    default = script.parent / "configs" / f"{stem}_default.yaml"
    return default.resolve() if default.is_file() else None


def _schema_for(script: Path) -> Optional[type]:
    """The config schema of one of our recipes (to validate a run before launching it), else None."""
    if script.parent.resolve() != RECIPES_DIR.resolve():
        return None
    # Every pretraining recipe reads a PretrainConfig, the tokenizer recipe too (a preset of pretrain.py).
    if script.stem in ("pretrain", "beit_tokenizer") or script.stem.endswith("_pretrain"):
        from ssl_vit.config import PretrainConfig

        return PretrainConfig
    try:
        from ssl_vit.eval import config as eval_config
    except ImportError:  # pragma: no cover - the eval package is part of the suite
        return None
    return {
        "knn": eval_config.KNNEvalConfig,
        "linear_probe": eval_config.LinearProbeEvalConfig,
        "finetune": eval_config.FinetuneEvalConfig,
    }.get(script.stem)


def _resolve_config(script: Path, config: Optional[Path], preset: list[str], overrides: dict[str, Any], where: str):
    """Load the run's config in-process exactly as the recipe will (None for scripts we do not know)."""
    schema = _schema_for(script)
    if schema is None:
        return None
    from ssl_vit.config import load_config

    argv = [*preset, *(["--config", str(config)] if config else []), *_kv(overrides)]
    try:
        return load_config(schema, argv)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _kv(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={format_value(v)}" for k, v in overrides.items()]


def _fingerprint(script: Optional[Path], config: Optional[Path], args: list[str], extra: list[str]) -> str:
    h = hashlib.sha256()
    h.update(str(script).encode())
    if config is not None:
        # The parsed settings, not the bytes: editing a config's comments (its expected-result line)
        # must not make every run of it stale.
        try:
            settings = yaml.safe_load(config.read_text())
        except yaml.YAMLError:
            settings = config.read_text()
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps([args, extra]).encode())
    return h.hexdigest()[:16]


def _substitute(value: Any, dirs: dict[str, Path], where: str, refs: set[str]) -> Any:
    """`${name}` in a string value -> the output folder of pretrain entry `name`."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name = m.group(1)
            if name not in dirs:
                close = difflib.get_close_matches(name, list(dirs), n=1, cutoff=0.5)
                hint = f", did you mean '${{{close[0]}}}'?" if close else f" (entries: {', '.join(dirs)})."
                raise ConfigError(f"{where}: '${{{name}}}' names no pretrain entry{hint}")
            if name != "out":
                refs.add(name)
            return str(dirs[name])

        return _REF.sub(sub, value)
    if isinstance(value, list):
        return [_substitute(v, dirs, where, refs) for v in value]
    return value


def resolve_runs(plan: ComparePlan, out: Path) -> list[Run]:
    """Every run of the plan, in an order that respects dependencies.

    Seed by seed (so an interrupted comparison has whole seeds done): that seed's pretraining runs, then
    their evaluations. A random init is evaluated once, with the pretraining seeds as its eval seeds (the
    eval recipes draw the random backbone from the eval seed): each eval seed is then one init.
    """
    out = Path(out).resolve()
    nproc = plan.launcher.processes
    entries: list[PretrainEntry] = plan.pretrain  # type: ignore[assignment]
    only_out = {"out": out}  # shared settings reach every run: they may name the folder, not an entry
    shared = {k: _substitute(v, only_out, "shared", set()) for k, v in flatten_overrides(plan.shared).items()}
    pre_shared = {**shared, **{k: _substitute(v, only_out, "pretrain_shared", set())
                               for k, v in flatten_overrides(plan.pretrain_shared).items()}}
    seeds: list[Optional[int]] = list(plan.pretrain_seeds) if plan.pretrain_seeds is not None else [None]
    base_seeds: dict[str, Optional[int]] = {}
    if plan.pretrain_seeds is not None:
        plain = {**{e.name: out / "pretrain" / e.name for e in entries}, "out": out}
        base_seeds = {e.name: _base_seed(e, i, plain, pre_shared) for i, e in enumerate(entries)}

    def labels(seed: Optional[int]) -> dict[str, str]:
        """Entry name -> its run's folder name for this seed (checkpoint entries have one run)."""
        return {e.name: e.name if seed is None or e.checkpoint is not None or seed == base_seeds[e.name]
                else f"{e.name}@seed{seed}" for e in entries}

    pretrain_runs: dict[str, Run] = {}  # by run id
    per_seed: list[tuple[dict[str, str], list[Run]]] = []
    for seed in seeds:
        names = labels(seed)
        runs = [_pretrain_run(plan, i, entry, seed, names, out, pre_shared, nproc)
                for i, entry in enumerate(entries) if entry.checkpoint is None or seed == seeds[0]]
        pretrain_runs.update((r.id, r) for r in runs)
        per_seed.append((names, runs))
    for run in pretrain_runs.values():
        _check_cycle(run, pretrain_runs)
    # A pretraining made from another (DeiT from its teacher, BEiT from its tokenizer) is stale when that one
    # changed, whichever invocation re-made it (`--only teacher`, an interrupted plan, a SLURM job that ended
    # between invocations): the fingerprints of what it depends on are part of its own, in dependency order.
    for run in _ordered(list(pretrain_runs.values())):
        if run.depends:
            run.fingerprint = _fingerprint(None, None, [run.fingerprint], [pretrain_runs[d].fingerprint for d in run.depends])

    ordered: list[Run] = []
    for names, runs in per_seed:
        ordered += _ordered(runs)
        ordered += _eval_runs(plan, entries, {r.method: r for r in runs}, pretrain_runs, names, shared, out)
    return ordered


def _base_seed(entry: PretrainEntry, i: int, dirs: dict[str, Path], pre_shared: dict[str, Any]) -> Optional[int]:
    """The seed an entry's pretraining runs with when the plan sets none: the one its `pretrain/<name>`
    folder holds (None: a checkpoint, or a script whose config we cannot read that sets no seed)."""
    if entry.checkpoint is not None:
        return None
    where = f"pretrain[{i}] ('{entry.name}')"
    script = _find_recipe(entry.recipe or "pretrain", where)
    preset = [f"objective.name={format_value(entry.objective)}"] if entry.objective else []
    own = {k: _substitute(v, dirs, where, set()) for k, v in flatten_overrides(entry.overrides).items()}
    merged = {**pre_shared, **own}
    cfg = _resolve_config(script, _find_config(entry.config, script, where), preset, merged, where)
    seed = cfg.seed if cfg is not None else merged.get("seed")
    return seed if isinstance(seed, int) else None


def _pretrain_run(
    plan: ComparePlan,
    i: int,
    entry: PretrainEntry,
    seed: Optional[int],
    labels: dict[str, str],
    out: Path,
    pre_shared: dict[str, Any],
    nproc: int,
) -> Run:
    """The run of one pretrain entry (for one seed), or the checkpoint it names."""
    where = f"pretrain[{i}] ('{entry.name}')"
    dirs = {**{name: out / "pretrain" / label for name, label in labels.items()}, "out": out}
    label = labels[entry.name]
    if entry.checkpoint is not None:
        ckpt = entry.checkpoint
        if ckpt != "random" and not Path(ckpt).expanduser().exists():
            raise ConfigError(f"{where}: checkpoint '{ckpt}' not found: give a run folder, a file, or random.")
        path = ckpt if ckpt == "random" else str(Path(ckpt).expanduser().resolve())
        return Run(
            id=f"pretrain/{entry.name}", kind="checkpoint", method=entry.name, column=None, protocol=None,
            output_dir=dirs[entry.name], script=None, args=[], depends=[], checkpoint=path,
            fingerprint=_fingerprint(None, None, [path], []), evaluate=entry.evaluate, label=entry.name,
            exceptions=_eval_exceptions(entry),
        )
    recipe = entry.recipe or "pretrain"
    script = _find_recipe(recipe, where)
    config = _find_config(entry.config, script, where)
    preset = [f"objective.name={format_value(entry.objective)}"] if entry.objective else []
    refs: set[str] = set()
    own = {k: _substitute(v, dirs, where, refs) for k, v in flatten_overrides(entry.overrides).items()}
    merged = {**pre_shared, **own}
    if label != entry.name:
        # Only where the run's seed would otherwise differ: a run of its config's seed keeps the arguments
        # (and so the fingerprint and folder) of a plan without pretrain_seeds, and is reused.
        merged["seed"] = seed
    budget_keys, budget_info = _budget_overrides(plan.budget, script, config, preset, merged, nproc, where)
    # A key the budget sets, given another value by the entry or by shared / pretrain_shared (which the budget
    # would overwrite without a word). train.schedule_epochs is read from the run's settings: it agrees.
    clash = sorted(k for k in set(merged) & set(budget_keys) if merged[k] != budget_keys[k])
    if clash:
        whose = "overrides" if set(clash) & set(own) else "shared settings (shared / pretrain_shared)"
        raise ConfigError(
            f"{where}: {', '.join(clash)} in its {whose} is set by the plan's budget ({plan.budget.kind}) so that "
            f"every method gets the same; remove it there (or change the budget)."
        )
    exceptions = sorted(k for k in own if k in pre_shared and own[k] != pre_shared[k]) + _eval_exceptions(entry)
    # resume=auto: a run cut short (crash, timeout) continues from checkpoint-last when rerun.
    resume = {"train.resume": "auto"} if _schema_for(script) is not None else {}
    overrides = {**resume, **merged, **budget_keys, "output_dir": str(dirs[entry.name])}
    _resolve_config(script, config, preset, overrides, where)  # fail now, not after an hour
    args = [*preset, *(["--config", str(config)] if config else []), *_kv(overrides)]
    return Run(
        id=f"pretrain/{label}", kind="pretrain", method=entry.name, column=None, protocol=None,
        output_dir=dirs[entry.name], script=script, args=args,
        depends=[f"pretrain/{labels[r]}" for r in sorted(refs)],
        fingerprint=_fingerprint(script, config, args, []), checkpoint=str(dirs[entry.name]),
        budget=budget_info, exceptions=exceptions, evaluate=entry.evaluate, seed=seed, label=label,
    )


def _eval_runs(
    plan: ComparePlan,
    entries: list[PretrainEntry],
    of_seed: dict[str, Run],
    pretrain_runs: dict[str, Run],
    labels: dict[str, str],
    shared: dict[str, Any],
    out: Path,
) -> list[Run]:
    """The evaluations of one pretraining seed's runs (checkpoint entries: with the first seed only)."""
    dirs = {**{name: out / "pretrain" / label for name, label in labels.items()}, "out": out}
    eval_runs: list[Run] = []
    for j, ev in enumerate(plan.evaluations):  # type: ignore[assignment]
        column = ev.name or ev.protocol
        script = _find_recipe(ev.recipe or ev.protocol, f"evaluations[{j}] ('{column}')")
        config = _find_config(ev.config, script, f"evaluations[{j}] ('{column}')")
        for entry in entries:
            pre = of_seed.get(entry.name)
            if not entry.evaluate or pre is None:
                continue
            where = f"evaluations[{j}] ('{column}') of '{entry.name}'"
            refs: set[str] = set()
            mine = {**flatten_overrides(ev.overrides), **flatten_overrides(entry.eval_overrides.get(column, {}))}
            own = {k: _substitute(v, dirs, where, refs) for k, v in mine.items()}
            eval_seeds = list(ev.seeds or plan.seeds)
            # With 2+ pretraining seeds a random init gets as many init seeds (with one, it is the plan's).
            inits = pre.checkpoint == "random" and len(plan.pretrain_seeds or []) > 1
            if inits:
                eval_seeds = list(plan.pretrain_seeds)  # type: ignore[arg-type]
            run_dir = out / "eval" / pre.label / column
            overrides = {**shared, **own, "checkpoint": pre.checkpoint, "seeds": eval_seeds,
                         "output_dir": str(run_dir)}
            _resolve_config(script, config, [], overrides, where)
            args = [*(["--config", str(config)] if config else []), *_kv(overrides)]
            depends = [pre.id] if pre.kind == "pretrain" else []
            depends += [f"pretrain/{labels[r]}" for r in sorted(refs) if f"pretrain/{labels[r]}" not in depends]
            eval_runs.append(Run(
                id=f"eval/{pre.label}/{column}", kind="eval", method=entry.name, column=column,
                protocol=ev.protocol, output_dir=run_dir, script=script, args=args,
                depends=depends, checkpoint=pre.checkpoint, seed=pre.seed, label=pre.label,
                seeds_are_inits=inits,
                # An eval is stale when what it judges changed: its checkpoint's fingerprint is part of its own.
                fingerprint=_fingerprint(script, config, args, [pretrain_runs[d].fingerprint for d in depends]),
            ))
    return eval_runs


def _eval_exceptions(entry: PretrainEntry) -> list[str]:
    """An entry's own evaluation settings, as the table names them: '<column>: <key>'."""
    return [f"{column}: {key}" for column, overrides in entry.eval_overrides.items()
            for key in flatten_overrides(overrides)]


def _check_cycle(run: Run, runs: dict[str, Run], seen: tuple[str, ...] = ()) -> None:
    if run.id in seen:
        raise ConfigError(f"pretrain entries refer to each other in a cycle: {' -> '.join(seen + (run.id,))}.")
    for dep in run.depends:
        _check_cycle(runs[dep], runs, seen + (run.id,))


def _ordered(runs: list[Run]) -> list[Run]:
    """Plan order, except that a run comes after the runs it depends on (those of `runs`: an earlier
    seed's checkpoint entries are ordered already)."""
    done: list[Run] = []
    by_id = {r.id: r for r in runs}

    def visit(run: Run) -> None:
        if run in done:
            return
        for dep in run.depends:
            if dep in by_id:
                visit(by_id[dep])
        done.append(run)

    for run in runs:
        visit(run)
    return done


def _budget_overrides(
    budget: BudgetConfig,
    script: Path,
    config: Optional[Path],
    preset: list[str],
    merged: dict[str, Any],
    nproc: int,
    where: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(overrides the budget adds, a description of what this run gets) for one pretraining run."""
    if budget.kind == "none":
        return {}, {"kind": "none"}
    if budget.kind == "seconds":
        return {"train.max_seconds": budget.seconds}, {"kind": "seconds", "seconds": budget.seconds}
    cfg = _resolve_config(script, config, preset, merged, where)
    if cfg is not None:
        batch, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
        epochs = cfg.train.schedule_epochs or cfg.train.epochs
    else:  # a script we cannot introspect: the plan's keys, else its config file's, else the engine's defaults
        from ssl_vit.engine.config import TrainConfig

        train = flatten_overrides(yaml.safe_load(Path(config).read_text()) or {}) if config and Path(config).is_file() else {}
        train.update(merged)

        def key(name: str) -> Any:
            value = train.get(f"train.{name}")
            return getattr(TrainConfig, name) if value is None else value

        batch, accum = int(key("batch_size")), int(key("grad_accum_steps"))
        epochs = key("schedule_epochs") or int(key("epochs"))
    if budget.kind == "epochs":  # each run's schedules keep its config's shares of the budget's epochs
        return ({"train.epochs": budget.epochs, "train.schedule_epochs": epochs},
                {"kind": "epochs", "epochs": budget.epochs, "schedule_epochs": epochs})
    per_step = batch * accum * nproc
    steps = max(1, int(budget.images) // per_step)
    info = {
        "kind": "images",
        "images": budget.images,
        "steps": steps,
        "images_per_step": per_step,
        "images_given": steps * per_step,
    }
    # max_steps alone ends the run only if the epochs do not end it first: lift the epoch limit so the
    # step budget decides. The schedules span max_steps and keep the config's shares: their epochs are
    # the config's (a warm-up of 1 of 10 epochs is 10% of the steps), not the lifted limit's.
    info["schedule_epochs"] = epochs
    return {"train.max_steps": steps, "train.epochs": _EPOCHS_UNBOUNDED, "train.schedule_epochs": epochs}, info


# The engine ends a run at the first of train.epochs / train.max_steps; under an images budget the
# steps must decide, so the epoch limit is set out of reach.
_EPOCHS_UNBOUNDED = 1_000_000
