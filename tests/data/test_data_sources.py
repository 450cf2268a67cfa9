"""load_data: every source kind, column detection, classes, splits and the errors users can fix."""

from __future__ import annotations

import dataclasses
import logging

import datasets
import numpy as np
import pytest

from ssl_vit.data import DataConfig, DataError, detect_image_column, detect_label_column, load_data


def _with(cfg: DataConfig, **changes) -> DataConfig:
    return dataclasses.replace(cfg, **changes)


def _labels(ds) -> np.ndarray:
    return np.asarray(ds.with_format("numpy", columns=["label"])["label"])


# --- source kinds ------------------------------------------------------------------------------------


def test_load_data__synthetic_default_has_ten_shape_classes_and_its_own_eval_split(cfg):
    bundle = load_data(_with(cfg, synthetic_train_size=40, synthetic_eval_size=20), need_labels=True)
    assert (len(bundle.train), len(bundle.eval)) == (40, 20)
    assert bundle.num_classes == 10 and "disk" in bundle.class_names
    assert (bundle.image_column, bundle.label_column) == ("image", "label")
    assert not bundle.eval_carved


def test_load_data__single_parquet_file_carves_eval_and_detects_img_column(cfg, parquet_file):
    bundle = load_data(_with(cfg, name=str(parquet_file)), need_labels=True)
    assert bundle.image_column == "img" and bundle.label_column == "label"
    assert bundle.num_classes == 3 and bundle.class_names == ["cat", "dog", "frog"]
    assert bundle.eval_carved and len(bundle.train) + len(bundle.eval) == 60


def test_load_data__parquet_folder_uses_split_names_from_file_names(cfg, parquet_folder):
    bundle = load_data(_with(cfg, name=str(parquet_folder)), need_labels=True)
    assert (len(bundle.train), len(bundle.eval)) == (60, 12)
    assert not bundle.eval_carved


def test_load_data__image_folder_takes_classes_from_folder_names(cfg, image_folder):
    bundle = load_data(_with(cfg, name=str(image_folder), val_fraction=0.34), need_labels=True)
    assert bundle.class_names == ["cat", "dog", "frog"]
    assert len(bundle.train) + len(bundle.eval) == 18
    assert sorted(set(_labels(bundle.eval).tolist())) == [0, 1, 2]  # stratified: every class held out


def test_load_data__save_to_disk_dict_uses_validation_and_fine_label(cfg, saved_dict):
    bundle = load_data(_with(cfg, name=str(saved_dict)), need_labels=True)
    assert (len(bundle.train), len(bundle.eval)) == (40, 9)
    assert (bundle.image_column, bundle.label_column) == ("image", "fine_label")


def test_load_data__save_to_disk_single_dataset_is_train(cfg, tmp_path, make_dataset):
    make_dataset(20).save_to_disk(str(tmp_path / "single"))
    bundle = load_data(_with(cfg, name=str(tmp_path / "single")), need_labels=True)
    assert bundle.eval_carved and len(bundle.train) + len(bundle.eval) == 20


def test_load_data__streaming_local_parquet_gives_streamed_splits(cfg, parquet_file):
    bundle = load_data(_with(cfg, name=str(parquet_file), streaming=True), need_labels=True)
    assert bundle.streaming and isinstance(bundle.train, datasets.IterableDataset)
    assert bundle.num_classes == 3
    train_bytes = {row["img"]["bytes"] for row in bundle.train.cast_column("img", datasets.Image(decode=False))}
    eval_bytes = {row["img"]["bytes"] for row in bundle.eval.cast_column("img", datasets.Image(decode=False))}
    assert train_bytes and eval_bytes and not train_bytes & eval_bytes  # hashed split: disjoint


def test_load_data__explicit_splits_are_used(cfg, parquet_folder):
    bundle = load_data(_with(cfg, name=str(parquet_folder), train_split="test", eval_split="train"), need_labels=True)
    assert (len(bundle.train), len(bundle.eval)) == (12, 60)


# --- hub ids and paths that do not exist ---------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def test_load_data__unknown_hub_id_offline_says_the_hub_is_off(cfg, offline):
    with pytest.raises(DataError) as err:
        load_data(_with(cfg, name="nobody-here/no-such-dataset-xyz"), need_labels=False)
    message = str(err.value)
    assert "nobody-here/no-such-dataset-xyz" in message and "offline" in message.lower()
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback soup


def test_load_data__missing_local_path_is_a_clear_error(cfg, tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_data(_with(cfg, name=str(tmp_path / "nope" / "data.parquet")), need_labels=False)


def test_load_data__folder_without_data_is_a_clear_error(cfg, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="holds no dataset"):
        load_data(_with(cfg, name=str(tmp_path / "empty_dir")), need_labels=False)


def test_load_data__unknown_split_lists_the_splits(cfg, parquet_folder):
    with pytest.raises(DataError, match=r"no split 'validation' \(it has: .*test"):
        load_data(_with(cfg, name=str(parquet_folder), eval_split="validation"), need_labels=True)


# --- columns ------------------------------------------------------------------------------------------


def test_detect_columns__known_names_then_feature_types():
    image, label = datasets.Image(), datasets.ClassLabel(names=["a", "b"])
    assert detect_image_column({"img": image, "label": label}) == "img"
    assert detect_image_column({"pixel_values": None, "x": None}) == "pixel_values"
    assert detect_image_column({"photo_raw": image, "y": label}) == "photo_raw"  # by type
    assert detect_label_column({"fine_label": label, "coarse_label": label}) == "fine_label"
    assert detect_label_column({"Label": None}) == "Label"  # case-insensitive name
    assert detect_label_column({"kind": label}) == "kind"  # by type
    assert detect_label_column({"img": image}) is None
    assert detect_label_column({"label": label, "other": label}, override="other") == "other"


def test_load_data__column_overrides_are_used(cfg, tmp_path, make_png):
    cells = [{"bytes": make_png((i, i, i)), "path": None} for i in range(20)]
    features = datasets.Features(
        {"picture_a": datasets.Image(), "picture_b": datasets.Image(), "tag": datasets.ClassLabel(names=["x", "y"])}
    )
    data = {"picture_a": cells, "picture_b": cells, "tag": [i % 2 for i in range(20)]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "two_images"))
    bundle = load_data(
        _with(cfg, name=str(tmp_path / "two_images"), image_column="picture_b", label_column="tag"), need_labels=True
    )
    assert (bundle.image_column, bundle.label_column) == ("picture_b", "tag")


def test_load_data__missing_label_column_lists_the_columns_when_labels_are_needed(cfg, tmp_path, make_dataset):
    make_dataset(10).remove_columns("label").save_to_disk(str(tmp_path / "unlabelled"))
    c = _with(cfg, name=str(tmp_path / "unlabelled"))
    with pytest.raises(DataError, match=r"no label column \(columns: img\)"):
        load_data(c, need_labels=True)
    bundle = load_data(c, need_labels=False)  # MAE needs no labels
    assert bundle.label_column is None and bundle.num_classes is None


def test_load_data__wrong_column_override_names_the_columns(cfg, parquet_file):
    with pytest.raises(DataError, match=r"no column 'pixels' \(columns: img, label\)"):
        load_data(_with(cfg, name=str(parquet_file), image_column="pixels"), need_labels=False)


# --- classes and labels -----------------------------------------------------------------------------


def test_load_data__string_labels_map_to_sorted_class_indices(cfg, tmp_path, make_dataset):
    ds = make_dataset(12)
    ds = ds.cast_column("label", datasets.Value("int64"))
    ds = ds.add_column("species", ["zebra", "ant", "moth"] * 4).remove_columns("label")
    ds.save_to_disk(str(tmp_path / "strings"))
    bundle = load_data(_with(cfg, name=str(tmp_path / "strings"), label_column="species"), need_labels=True)
    assert bundle.num_classes == 3 and bundle.class_names == ["ant", "moth", "zebra"]
    assert bundle.label_map == {"ant": 0, "moth": 1, "zebra": 2}


def test_load_data__plain_integer_labels_count_classes(cfg, tmp_path, make_dataset):
    make_dataset(12).cast_column("label", datasets.Value("int64")).save_to_disk(str(tmp_path / "ints"))
    bundle = load_data(_with(cfg, name=str(tmp_path / "ints")), need_labels=True)
    assert bundle.num_classes == 3 and bundle.label_map is None


def test_load_data__labels_out_of_range_name_the_row(cfg, tmp_path, make_dataset):
    ds = make_dataset(12).cast_column("label", datasets.Value("int64"))
    labels = [0, 1, 2] * 3 + [0, 7, 1]
    ds.remove_columns("label").add_column("label", labels).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"label 7 at row 10 is outside 0\.\.4"):
        load_data(_with(cfg, name=str(tmp_path / "bad"), num_classes=5, eval_split=None, val_fraction=0.0),
                  need_labels=True)


def test_load_data__unlabelled_minus_one_split_is_rejected_with_a_hint(cfg, tmp_path, make_dataset):
    train = make_dataset(12)
    test = make_dataset(6).cast_column("label", datasets.Value("int64"))
    test = test.remove_columns("label").add_column("label", [-1] * 6).cast_column("label", train.features["label"])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "minus"))
    with pytest.raises(DataError, match="unlabelled rows"):
        load_data(_with(cfg, name=str(tmp_path / "minus")), need_labels=True)


def test_load_data__empty_dataset_is_a_clear_error(cfg, tmp_path, make_dataset):
    make_dataset(3).select([]).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(DataError, match="is empty"):
        load_data(_with(cfg, name=str(tmp_path / "empty.parquet")), need_labels=False)


def test_load_data__empty_eval_split_is_a_clear_error(cfg, monkeypatch, make_dataset):
    # datasets cannot even save an empty split to disk; hand the splits over as a source would.
    import ssl_vit.data.sources as sources

    splits = {"train": make_dataset(6), "test": make_dataset(3).select([])}
    monkeypatch.setattr(sources, "_open_source", lambda _cfg: splits)
    with pytest.raises(DataError, match="eval split of dataset .* is empty"):
        load_data(_with(cfg, name="somewhere"), need_labels=False)


# --- the carved eval split --------------------------------------------------------------------------


def _carved(cfg, path, **changes):
    bundle = load_data(_with(cfg, name=str(path), **changes), need_labels=True)
    return bundle, set(bundle.train["__index"]), set(bundle.eval["__index"])


@pytest.fixture
def indexed(tmp_path, make_dataset):
    """300 rows, classes of unequal sizes (150/100/50), and a column with the row's index."""
    ds = make_dataset(300).cast_column("label", datasets.Value("int64"))
    labels = [0] * 150 + [1] * 100 + [2] * 50
    ds = ds.remove_columns("label").add_column("label", labels).add_column("__index", list(range(300)))
    ds = ds.cast_column("label", datasets.ClassLabel(names=["a", "b", "c"]))
    ds.save_to_disk(str(tmp_path / "indexed"))
    return tmp_path / "indexed"


def test_carved_split__is_disjoint_covering_and_stratified(cfg, indexed):
    bundle, train, held = _carved(cfg, indexed, val_fraction=0.2)
    assert not train & held and train | held == set(range(300))
    counts = np.bincount(_labels(bundle.eval), minlength=3)
    assert counts.tolist() == [30, 20, 10]  # 20% of every class


def test_carved_split__same_seed_same_split_other_seed_other_split(cfg, indexed):
    _, _, first = _carved(cfg, indexed, split_seed=0)
    _, _, again = _carved(cfg, indexed, split_seed=0)
    _, _, other = _carved(cfg, indexed, split_seed=1)
    assert first == again and first != other and len(first) == len(other)


def test_carved_split__is_logged(cfg, indexed, caplog):
    with caplog.at_level(logging.INFO, logger="ssl_vit.data"):
        _carved(cfg, indexed)
    assert any("carved a stratified 10% eval split" in r.getMessage() for r in caplog.records)
