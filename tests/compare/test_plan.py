"""Plan validation: every mistake is caught before anything runs, with a message that names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ssl_vit.compare import load_plan, plan_from_dict, resolve_runs
from ssl_vit.compare.plan import flatten_overrides, format_value
from ssl_vit.config import ConfigError, parse_override

PRESETS = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "compare"


def _plan(**changes) -> dict:
    plan = {
        "name": "t",
        "pretrain": [{"name": "random", "checkpoint": "random"}],
        "evaluations": [{"protocol": "knn"}],
    }
    plan.update(changes)
    return plan


def _error(data: dict, tmp_path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        plan = plan_from_dict(data)
        if tmp_path is not None:
            resolve_runs(plan, tmp_path)
    return str(info.value)


def test_unknown_top_level_key__names_the_closest_key():
    assert "unknown plan key 'evaluation', did you mean 'evaluations'?" in _error(_plan(evaluation=[]))


def test_unknown_entry_key__names_the_entry_and_the_closest_key():
    msg = _error(_plan(pretrain=[{"name": "mae", "recipe": "mae_pretrain", "overides": {}}]))
    assert "pretrain[0] ('mae')" in msg and "did you mean 'overrides'?" in msg


def test_unknown_budget_key__names_the_closest_key():
    assert "did you mean 'images'?" in _error(_plan(budget={"kind": "images", "imgs": 10}))


def test_wrong_type__names_the_expected_type():
    assert "expected list of int" in _error(_plan(seeds="0,1"))


def test_entry_with_recipe_and_checkpoint__is_an_error():
    msg = _error(_plan(pretrain=[{"name": "x", "recipe": "mae_pretrain", "checkpoint": "random"}]))
    assert "exactly one of 'recipe'" in msg


def test_duplicate_names__are_an_error():
    msg = _error(_plan(pretrain=[{"name": "a", "checkpoint": "random"}, {"name": "a", "checkpoint": "random"}]))
    assert "two pretrain entries are named 'a'" in msg


def test_budget_without_its_amount__is_an_error():
    assert "budget.kind images needs a positive budget.images" in _error(_plan(budget={"kind": "images"}))


def test_override_of_a_key_the_comparison_sets__is_an_error():
    msg = _error(_plan(evaluations=[{"protocol": "knn", "overrides": {"seeds": [0]}}]))
    assert "'seeds' is set by the comparison" in msg


def test_override_typo__is_caught_against_the_recipe_schema(tmp_path: Path):
    plan = _plan(pretrain=[{"name": "mae", "recipe": "mae_pretrain", "overrides": {"trian.epochs": 1}}])
    assert "did you mean 'train.epochs'?" in _error(plan, tmp_path)


def test_unknown_recipe__names_the_closest_recipe(tmp_path: Path):
    assert "did you mean 'mae_pretrain'?" in _error(_plan(pretrain=[{"name": "m", "recipe": "mae_pretrian"}]), tmp_path)


def test_budget_key_in_an_entry__is_an_error(tmp_path: Path):
    plan = _plan(budget={"kind": "images", "images": 1000},
                 pretrain=[{"name": "mae", "recipe": "mae_pretrain", "overrides": {"train.max_steps": 5}}])
    assert "train.max_steps in its overrides is set by the plan's budget" in _error(plan, tmp_path)


def test_reference_to_a_missing_entry__names_the_closest(tmp_path: Path):
    plan = _plan(pretrain=[
        {"name": "teacher", "recipe": "mae_pretrain"},
        {"name": "mae", "recipe": "mae_pretrain", "overrides": {"model.checkpoint": "${teachr}/backbone.safetensors"}},
    ])
    assert "did you mean '${teacher}'?" in _error(plan, tmp_path)


def test_reference__becomes_the_output_folder_and_a_dependency(tmp_path: Path):
    plan = plan_from_dict(_plan(pretrain=[
        {"name": "b", "recipe": "mae_pretrain", "overrides": {"model.checkpoint": "${a}"}},
        {"name": "a", "recipe": "mae_pretrain", "evaluate": False},
    ]))
    runs = resolve_runs(plan, tmp_path)
    assert [r.id for r in runs if r.kind == "pretrain"] == ["pretrain/a", "pretrain/b"]  # dependency first
    b = next(r for r in runs if r.id == "pretrain/b")
    assert f"model.checkpoint={tmp_path.resolve() / 'pretrain' / 'a'}" in b.args and b.depends == ["pretrain/a"]
    assert not any(r.id.startswith("eval/a/") for r in runs)  # evaluate: false


def test_shared_settings__reach_every_run_and_entry_exceptions_are_recorded(tmp_path: Path):
    plan = plan_from_dict(_plan(
        shared={"data": {"name": "synthetic", "synthetic_train_size": 100}},
        pretrain=[{"name": "mae", "recipe": "mae_pretrain", "overrides": {"data.synthetic_train_size": 50}},
                  {"name": "random", "checkpoint": "random"}],
    ))
    runs = {r.id: r for r in resolve_runs(plan, tmp_path)}
    assert "data.synthetic_train_size=50" in runs["pretrain/mae"].args
    assert runs["pretrain/mae"].exceptions == ["data.synthetic_train_size"]
    for run_id in ("eval/mae/knn", "eval/random/knn"):
        assert "data.synthetic_train_size=100" in runs[run_id].args and "seeds=[0]" in runs[run_id].args
    assert "checkpoint=random" in runs["eval/random/knn"].args


def test_eval_overrides__reach_only_that_entrys_evaluations_of_that_column_and_are_listed(tmp_path: Path):
    plan = plan_from_dict(_plan(
        pretrain=[{"name": "ijepa", "recipe": "ijepa_pretrain",
                   "eval_overrides": {"knn": {"features.pool": "avg"}}},
                  {"name": "random", "checkpoint": "random"}],
        evaluations=[{"protocol": "knn", "overrides": {"features": {"batch_size": 64}}}, {"protocol": "linear_probe"}],
    ))
    runs = {r.id: r for r in resolve_runs(plan, tmp_path)}
    assert {"features.pool=avg", "features.batch_size=64"} <= set(runs["eval/ijepa/knn"].args)
    assert not any(a.startswith("features.pool") for a in runs["eval/ijepa/linear_probe"].args)
    assert not any(a.startswith("features.pool") for a in runs["eval/random/knn"].args)
    assert runs["pretrain/ijepa"].exceptions == ["knn: features.pool"]


def test_eval_overrides__of_an_unknown_column_or_key_are_errors(tmp_path: Path):
    entry = {"name": "random", "checkpoint": "random", "eval_overrides": {"knnn": {"features.pool": "avg"}}}
    assert "'knnn' is not an evaluation column; the plan's are knn" in _error(_plan(pretrain=[entry]))
    entry["eval_overrides"] = {"knn": {"features.pol": "avg"}}
    assert "features.pol" in _error(_plan(pretrain=[entry]), tmp_path)


def test_recipe_default_config__is_passed_explicitly(tmp_path: Path):
    runs = resolve_runs(plan_from_dict(_plan(pretrain=[{"name": "mae", "recipe": "mae_pretrain"}])), tmp_path)
    args = runs[0].args
    assert args[args.index("--config") + 1].endswith("recipes/configs/mae_default.yaml")


@pytest.mark.parametrize("value", ["abc", "1e-4", "true", "", "a b", "x: y", "[1]", 3, 0.5, True, None, [0, 1],
                                   "../shared/data/cifar10", "rand-m9-mstd0.5-inc1"])
def test_format_value__reads_back_unchanged_through_the_recipes_parser(value):
    assert parse_override(f"k={format_value(value)}")[1] == value


def test_flatten_overrides__mixes_nested_and_dotted_keys():
    assert flatten_overrides({"train": {"epochs": 3}, "data.name": "x", "model.args": {}}) == {
        "train.epochs": 3, "data.name": "x", "model.args": {}}


def test_plan_file_that_is_not_a_mapping__is_a_clear_error(tmp_path: Path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_plan(path)


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_presets__load_and_resolve(preset, tmp_path: Path):
    plan = load_plan(PRESETS / preset)
    runs = resolve_runs(plan, tmp_path)
    assert runs and (PRESETS / preset).read_text().startswith("# python tools/compare.py --plan")


def _tool():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli__plan_error_exits_2_with_the_message(tmp_path: Path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(_plan(budget={"kind": "images", "imags": 5})))
    assert _tool().main(["--plan", str(path), "--dry-run"]) == 2
    assert "plan error" in capsys.readouterr().err


def test_cli__only_with_an_unknown_name_names_the_closest(tmp_path: Path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(_plan()))
    assert _tool().main(["--plan", str(path), "--dry-run", "--only", "randm", "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'random'?" in capsys.readouterr().err


def test_images_budget__reads_the_batch_of_the_tokenizer_recipe_config(tmp_path: Path):
    # beit_tokenizer.py is a pretraining recipe too: its steps come from its config's batch size
    # (beit_tokenizer_default.yaml: 128), not from the engine's default batch.
    batch = yaml.safe_load((PRESETS.parent / "beit_tokenizer_default.yaml").read_text())["train"]["batch_size"]
    plan = plan_from_dict(_plan(budget={"kind": "images", "images": 1000},
                                pretrain=[{"name": "tok", "recipe": "beit_tokenizer", "evaluate": False}]))
    (run,) = [r for r in resolve_runs(plan, tmp_path) if r.id == "pretrain/tok"]
    assert run.budget["images_per_step"] == batch and run.budget["steps"] == 1000 // batch


def test_images_budget__keeps_each_config_s_epochs_for_its_schedules(tmp_path: Path):
    # The budget lifts train.epochs out of reach so that max_steps decides; the warm-up and an objective's
    # epoch settings must still count in the recipe config's epochs (supervised_default.yaml: 1 of 10).
    epochs = yaml.safe_load((PRESETS.parent / "supervised_default.yaml").read_text())["train"]["epochs"]
    plan = plan_from_dict(_plan(budget={"kind": "images", "images": 1000},
                                pretrain=[{"name": "sup", "recipe": "supervised_pretrain"}]))
    (run,) = [r for r in resolve_runs(plan, tmp_path) if r.id == "pretrain/sup"]
    assert f"train.schedule_epochs={epochs}" in run.args and run.budget["schedule_epochs"] == epochs
