"""Bad input through the real recipes: each is one clear paragraph naming the thing and the fix, and no
backbone.safetensors / checkpoint is left behind as if the run had produced something valid.

The recipes' `main(argv)` runs in this process (what `python recipes/x.py argv` does, minus the
interpreter start-up); one test runs a recipe as a command to see what the user's terminal shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from reliability_common import (
    CHILD_ENV,
    RECIPES,
    REPO,
    image_folder,
    load_recipe,
    one_paragraph,
    parquet,
    png_bytes,
)

from ssl_vit.config import ConfigError
from ssl_vit.data import DataError
from ssl_vit.engine.checkpoint import CheckpointError, save_backbone
from ssl_vit.models import WeightsMismatchError, create_backbone
from ssl_vit.engine.teacher import TeacherError

# Tiny shared settings; a run that got past its checks would train 2 steps.
TINY = [
    "data.image_size=16",
    "data.synthetic_train_size=16",
    "data.synthetic_eval_size=8",
    "model.args={depth: 1, embed_dim: 32, num_heads: 2}",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.vis_every=0",
]
MAE_TINY = [*TINY, "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"]
# One whole epoch over every row (no carved eval split), read by the recipe's loader worker process.
ONE_EPOCH = ["data.val_fraction=0", "data.num_workers=1", "train.max_steps=null", "train.epochs=1", "optim.warmup_epochs=0"]


@pytest.fixture(scope="module")
def recipes():
    return {name: load_recipe(name) for name in ("mae_pretrain", "supervised_pretrain", "deit_pretrain")}


def fails(recipe, out, args, error, *words):
    """Run the recipe, expect `error` whose message is one paragraph holding `words`; nothing valid written."""
    with pytest.raises(error) as caught:
        recipe.main([*args, f"output_dir={out}"])
    message = str(caught.value)
    assert one_paragraph(message), message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert not (out / "backbone.safetensors").exists(), "a failed run left a backbone.safetensors"
    assert not (out / "checkpoint-last").exists(), "a failed run left a checkpoint"
    return message


def image_rows(n: int) -> list[dict]:
    return [{"bytes": png_bytes((10 * i % 256, 0, 0)), "path": None} for i in range(n)]


def tiny_backbone(**overrides):
    spec = dict(depth=1, embed_dim=32, num_heads=2, img_size=16, num_classes=0) | overrides
    return create_backbone("vit_nano_patch4_32", **spec)


def test_corrupt_image__names_the_dataset_and_row_and_skip_corrupt(recipes, tmp_path):
    data = image_folder(tmp_path / "images", n=16, corrupt=9)
    args = [*MAE_TINY, f"data.name={data}", *ONE_EPOCH]
    message = fails(recipes["mae_pretrain"], tmp_path / "run", args, DataError, str(data), "data.skip_corrupt=true")
    assert "row " in message and "DataLoader worker" not in message


def test_empty_dataset__says_it_is_empty_and_which_key_to_check(recipes, tmp_path):
    data = parquet(tmp_path / "empty" / "data.parquet", {"img": [], "label": []})
    args = [*MAE_TINY, f"data.name={data}"]
    fails(recipes["mae_pretrain"], tmp_path / "run", args, DataError, "empty (0 rows)", "data.name")


def test_missing_label_column__lists_the_columns_and_data_label_column(recipes, tmp_path):
    data = parquet(tmp_path / "nolabel" / "data.parquet", {"img": image_rows(16), "caption": ["x"] * 16})
    fails(
        recipes["supervised_pretrain"], tmp_path / "run", [*TINY, f"data.name={data}"],
        DataError, "no label column", "img, caption", "data.label_column",
    )


def test_labels_out_of_range__name_the_label_the_row_and_data_num_classes(recipes, tmp_path):
    labels = [i % 3 for i in range(15)] + [7]
    data = parquet(tmp_path / "labels" / "data.parquet", {"img": image_rows(16), "label": labels})
    fails(
        recipes["supervised_pretrain"], tmp_path / "run", [*TINY, f"data.name={data}", "data.num_classes=3"],
        DataError, "label 7 at row 15", "outside 0..2", "data.num_classes",
    )


def test_images_smaller_than_the_patch__names_both_sizes_and_the_keys(recipes, tmp_path):
    fails(
        recipes["mae_pretrain"], tmp_path / "run", [*MAE_TINY, "data.image_size=2"],
        ValueError, "image size 2", "patch size 4", "data.image_size",
    )


def test_unknown_config_key__suggests_the_closest_key(recipes, tmp_path):
    args = [*MAE_TINY, "train.epoch=3"]
    fails(recipes["mae_pretrain"], tmp_path / "run", args, ConfigError, "'train.epoch'", "'train.epochs'", "--help")


def test_wrong_type__names_the_key_the_value_and_the_expected_type(recipes, tmp_path):
    args = [*MAE_TINY, "train.batch_size=abc"]
    fails(recipes["mae_pretrain"], tmp_path / "run", args, ConfigError, "train.batch_size", "'abc'", "int")


@pytest.mark.parametrize("ratio", ["0", "1.0", "1.5", "-0.25"])
def test_mask_ratio_outside_0_1__names_the_key_and_a_valid_value(recipes, tmp_path, ratio):
    args = [*MAE_TINY, f"mae.mask_ratio={ratio}"]
    fails(recipes["mae_pretrain"], tmp_path / "run", args, ValueError, "mae.mask_ratio", "0.75")


def test_teacher_with_another_class_count__names_both_counts(recipes, tmp_path):
    save_backbone(tiny_backbone(num_classes=5), tmp_path / "teacher")  # the synthetic data has 10 classes
    fails(
        recipes["deit_pretrain"], tmp_path / "run", [*TINY, f"distill.teacher={tmp_path / 'teacher'}"],
        TeacherError, "5 classes", "10", "same data",
    )


def test_resume_from_a_checkpoint_of_another_architecture__lists_missing_keys_and_keeps_the_old_run(recipes, tmp_path):
    out = tmp_path / "run"
    recipes["mae_pretrain"].main([*MAE_TINY, "train.max_steps=1", f"output_dir={out}"])
    before = {name: (out / name).read_bytes() for name in ("backbone.safetensors", "config.yaml")}
    with pytest.raises(CheckpointError) as caught:
        deeper = "model.args={depth: 2, embed_dim: 32, num_heads: 2}"
        recipes["mae_pretrain"].main([*MAE_TINY, deeper, f"output_dir={out}"])
    message = str(caught.value)
    assert one_paragraph(message), message
    assert "Missing key(s)" in message and "backbone.blocks.1." in message
    assert "another output_dir" in message and "train.resume=never" in message
    # The earlier run's outputs are untouched (its config.yaml is not replaced by the failed one's).
    assert {name: (out / name).read_bytes() for name in before} == before


def test_checkpoint_of_another_architecture__lists_the_unexpected_keys(recipes, tmp_path):
    save_backbone(tiny_backbone(depth=2), tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "backbone.json"  # its spec now says 1 block; the weights hold 2
    meta = json.loads(meta_path.read_text())
    meta["model"]["depth"] = 1
    meta_path.write_text(json.dumps(meta))
    fails(
        recipes["mae_pretrain"], tmp_path / "run", [*MAE_TINY, f"model.checkpoint={tmp_path / 'ckpt'}"],
        WeightsMismatchError, "unexpected keys: blocks.1.", "model.args", "tools/convert.py",
    )


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("where", ["run_folder", "foreign_file", "teacher"])
def test_truncated_safetensors__names_the_file(recipes, tmp_path, where):
    if where == "foreign_file":  # a bare .safetensors (no backbone.json): goes through the converter
        from safetensors.torch import save_file

        weights = tmp_path / "weights.safetensors"
        save_file(tiny_backbone().state_dict(), str(weights))
    else:
        save_backbone(tiny_backbone(num_classes=10 if where == "teacher" else 0), tmp_path / "ckpt")
        weights = tmp_path / "ckpt" / "backbone.safetensors"
    _truncate(weights)
    if where == "teacher":
        recipe, args, error = recipes["deit_pretrain"], [*TINY, f"distill.teacher={tmp_path / 'ckpt'}"], ValueError
    else:
        target = weights if where == "foreign_file" else tmp_path / "ckpt"
        recipe, args, error = recipes["mae_pretrain"], [*MAE_TINY, f"model.checkpoint={target}"], ValueError
    fails(recipe, tmp_path / "run", args, error, str(weights), "not a readable safetensors file", "truncated")


def test_truncated_checkpoint_on_resume__names_the_file_instead_of_training_on(recipes, tmp_path):
    out = tmp_path / "run"
    recipes["mae_pretrain"].main([*MAE_TINY, "train.max_steps=1", f"output_dir={out}"])
    model = _truncate(out / "checkpoint-last" / "model.safetensors")
    with pytest.raises(CheckpointError) as caught:
        recipes["mae_pretrain"].main([*MAE_TINY, f"output_dir={out}"])
    assert one_paragraph(str(caught.value)) and str(model) in str(caught.value)
    assert json.loads((out / "backbone.json").read_text())["step"] == 1  # nothing newer was exported


def test_nan_in_the_input_images__names_the_row_instead_of_training_on_it(recipes, tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.random((16, 16, 3), dtype=np.float32) for _ in range(16)]
    images[5][3, 3, 0] = np.nan  # float arrays in [0, 1], one NaN pixel
    data = parquet(tmp_path / "nan" / "data.parquet", {"image": images})
    args = [*MAE_TINY, f"data.name={data}", *ONE_EPOCH]
    fails(recipes["mae_pretrain"], tmp_path / "run", args, DataError, "row 5", "NaN", "data.skip_corrupt=true")


@pytest.mark.slow
def test_bad_key_on_the_command_line__exits_non_zero_with_the_message_last(tmp_path):
    """What the terminal shows: the one-paragraph message is the last line, after any traceback."""
    cmd = [sys.executable, str(RECIPES / "mae_pretrain.py"), "train.epoch=3", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    expected = "ssl_vit.config.ConfigError: unknown config key 'train.epoch', did you mean 'train.epochs'?"
    assert last.startswith(expected), last
    assert not (tmp_path / "run").exists()
