"""make_loader: batch format, seeded order, corrupt images both ways, streaming, repeated-aug sampler,
and sharding under Accelerate (simulated in-process, and a real 2-process launch marked slow)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader

from ssl_vit.data import DataConfig, DataError, ShuffleSampler, load_data, make_loader


def _with(cfg: DataConfig, **changes) -> DataConfig:
    return dataclasses.replace(cfg, **changes)


@pytest.fixture
def indexed_bundle(cfg, tmp_path, make_dataset):
    """48 train rows whose label is the row index (so batches show which rows they hold), 12 eval rows."""
    ds = datasets.DatasetDict({"train": make_dataset(48, num_classes=48), "test": make_dataset(12, num_classes=48)})
    ds.save_to_disk(str(tmp_path / "indexed"))
    return load_data(_with(cfg, name=str(tmp_path / "indexed")), need_labels=True)


def _labels(loader) -> list[list[int]]:
    return [batch["labels"].tolist() for batch in loader]


# --- batch format ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mae", "supervised", "eval"])
def test_make_loader__yields_float_pixels_and_int64_labels(cfg, kind):
    bundle = load_data(_with(cfg, synthetic_train_size=40, synthetic_eval_size=10), need_labels=True)
    batch = next(iter(make_loader(bundle, "train", kind, 8, train=True)))
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64 and 0 <= batch["labels"].min() and batch["labels"].max() < 10


def test_make_loader__no_labels_key_when_the_data_has_none(cfg, tmp_path, make_dataset):
    make_dataset(10).remove_columns("label").save_to_disk(str(tmp_path / "unlabelled"))
    bundle = load_data(_with(cfg, name=str(tmp_path / "unlabelled")), need_labels=False)
    batch = next(iter(make_loader(bundle, "train", "mae", 4, train=True)))
    assert set(batch) == {"pixel_values"}


def test_make_loader__grayscale_and_rgba_files_give_rgb_batches(cfg, image_folder):
    bundle = load_data(_with(cfg, name=str(image_folder), val_fraction=0.0), need_labels=True)
    batches = list(make_loader(bundle, "train", "eval", 6, train=False))
    assert sum(len(b["labels"]) for b in batches) == 18
    assert all(b["pixel_values"].shape[1:] == (3, 16, 16) for b in batches)


def test_make_loader__train_drops_last_and_eval_keeps_every_row_in_order(indexed_bundle):
    train = _labels(make_loader(indexed_bundle, "train", "mae", 10, train=True))
    assert [len(b) for b in train] == [10, 10, 10, 10] and len(set(sum(train, []))) == 40
    assert sum(_labels(make_loader(indexed_bundle, "eval", "eval", 5, train=False)), []) == list(range(12))


def test_make_loader__string_labels_become_class_indices(cfg, tmp_path, make_dataset):
    ds = make_dataset(6).remove_columns("label").add_column("species", ["zebra", "ant", "moth"] * 2)
    ds.save_to_disk(str(tmp_path / "strings"))
    bundle = load_data(_with(cfg, name=str(tmp_path / "strings"), label_column="species", val_fraction=0.0), True)
    assert _labels(make_loader(bundle, "train", "eval", 6, train=False)) == [[2, 0, 1, 2, 0, 1]]


def test_make_loader__fewer_rows_than_a_batch_is_a_clear_error(indexed_bundle):
    with pytest.raises(DataError, match="fewer than one batch"):
        make_loader(indexed_bundle, "train", "mae", 64, train=True)


# --- seeded, repeatable order -----------------------------------------------------------------------


def test_make_loader__same_seed_same_order_other_seed_or_epoch_other_order(indexed_bundle):
    first = _labels(make_loader(indexed_bundle, "train", "mae", 8, train=True, seed=3))
    again = _labels(make_loader(indexed_bundle, "train", "mae", 8, train=True, seed=3))
    other = _labels(make_loader(indexed_bundle, "train", "mae", 8, train=True, seed=4))
    loader = make_loader(indexed_bundle, "train", "mae", 8, train=True, seed=3)
    epoch0, epoch1 = _labels(loader), _labels(loader)
    assert first == again == epoch0
    assert first != other and epoch1 != epoch0 and sorted(sum(epoch1, [])) == sorted(sum(epoch0, []))


def test_make_loader__augmentations_repeat_with_a_seeded_worker(indexed_bundle):
    def pixels():
        loader = make_loader(indexed_bundle, "train", "supervised", 8, train=True, seed=5, num_workers=1)
        return next(iter(loader))["pixel_values"]

    assert torch.equal(pixels(), pixels())


# --- corrupt and empty images ----------------------------------------------------------------------


@pytest.fixture
def corrupt_bundle(cfg, tmp_path, make_png):
    cells = [{"bytes": make_png((i * 20, 0, 0)), "path": None} for i in range(10)]
    cells[4] = {"bytes": b"this is not an image", "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"image": cells, "label": list(range(10))}, features=features)
    ds.save_to_disk(str(tmp_path / "corrupt"))

    def bundle(skip: bool):
        return load_data(_with(cfg, name=str(tmp_path / "corrupt"), val_fraction=0.0, skip_corrupt=skip), True)

    return bundle


def test_corrupt_image__stops_with_the_dataset_and_row(corrupt_bundle):
    loader = make_loader(corrupt_bundle(False), "train", "eval", 5, train=False)
    with pytest.raises(DataError, match=r"dataset '.*corrupt'.*row 4 .*data.skip_corrupt=true"):
        list(loader)


def test_corrupt_image__skipped_and_counted_when_asked(corrupt_bundle, caplog):
    loader = make_loader(corrupt_bundle(True), "train", "eval", 5, train=False)
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data"):
        batches = _labels(loader)
    assert [len(b) for b in batches] == [5, 5]  # batches keep their size
    assert 4 not in sum(batches, []) and batches[0][4] == 5  # row 4 replaced by the next readable row
    assert loader.dataset.skipped == 1
    assert any("row 4" in r.getMessage() and "1 skipped so far" in r.getMessage() for r in caplog.records)


def test_corrupt_image__in_a_carved_split_names_the_row_of_the_source_file(cfg, tmp_path, make_png):
    cells = [{"bytes": make_png((i * 10, 0, 0)), "path": None} for i in range(20)]
    cells[13] = {"bytes": b"", "path": None}
    datasets.Dataset.from_dict({"image": cells}).cast_column("image", datasets.Image()).to_parquet(
        str(tmp_path / "c.parquet")
    )
    bundle = load_data(_with(cfg, name=str(tmp_path / "c.parquet"), val_fraction=0.5), need_labels=False)
    split = "eval" if 13 in bundle.eval_rows else "train"
    with pytest.raises(DataError, match=r"split 'train' of dataset .*row 13 \(the cell holds 0 bytes\)"):
        list(make_loader(bundle, split, "eval", 2, train=False))


def test_empty_image__is_a_clear_error(cfg, tmp_path):
    pixels = [np.zeros((4, 4, 3), dtype=np.uint8).tolist()] * 3 + [[]]
    datasets.Dataset.from_dict({"pixel_values": pixels, "label": [0, 1, 0, 1]}).save_to_disk(str(tmp_path / "arr"))
    bundle = load_data(_with(cfg, name=str(tmp_path / "arr"), val_fraction=0.0), need_labels=True)
    assert bundle.image_column == "pixel_values"
    with pytest.raises(DataError, match=r"row 3 .*empty"):
        list(make_loader(bundle, "train", "eval", 4, train=False))


# --- streaming ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_shutdown_sleep(monkeypatch):
    # datasets sleeps 5 s after each shuffled stream (an Arrow thread-shutdown guard): not in tests.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


def test_make_loader__streams_local_parquet_with_labels(cfg, parquet_file):
    bundle = load_data(_with(cfg, name=str(parquet_file), streaming=True), need_labels=True)
    train = list(make_loader(bundle, "train", "mae", 4, train=True))
    evals = list(make_loader(bundle, "eval", "eval", 4, train=False))
    n_train, n_eval = sum(len(b["labels"]) for b in train), sum(len(b["labels"]) for b in evals)
    assert all(len(b["labels"]) == 4 for b in train) and n_train >= 40 and n_train + n_eval <= 60
    assert train[0]["pixel_values"].shape == (4, 3, 16, 16)


def test_make_loader__stream_repeated_aug_yields_each_image_r_times(cfg):
    small = _with(cfg, streaming=True, synthetic_train_size=30, synthetic_eval_size=10)
    bundle = load_data(small, need_labels=True)
    batch = next(iter(make_loader(bundle, "train", "mae", 9, train=True, repeated_aug=3)))
    labels = batch["labels"].tolist()
    assert labels[0::3] == labels[1::3] == labels[2::3]
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])  # different views


# --- the sampler, and sharding under Accelerate ------------------------------------------------------


def test_shuffle_sampler__permutes_every_epoch_and_set_epoch_replays_it():
    sampler = ShuffleSampler(20, seed=1)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and epoch0 != epoch1
    sampler.set_epoch(1)
    assert list(sampler) == epoch1


def test_shuffle_sampler__repeated_aug_puts_each_index_r_times_in_a_row():
    order = list(ShuffleSampler(30, seed=0, repeats=3))
    assert len(order) == 30
    assert all(order[i] == order[i + 1] == order[i + 2] for i in range(0, 30, 3))
    assert set(Counter(order).values()) == {3} and len(set(order)) == 10


@pytest.mark.parametrize("repeats", [1, 3])
def test_make_loader__accelerate_shards_are_disjoint_and_cover_the_epoch(indexed_bundle, repeats):
    def shard(num_processes: int, index: int) -> list[list[int]]:
        loader = make_loader(indexed_bundle, "train", "mae", 4, train=True, seed=7, repeated_aug=repeats)
        sharded = prepare_data_loader(loader, num_processes=num_processes, process_index=index, put_on_device=False)
        return _labels(sharded)

    single = shard(1, 0)
    first, second = shard(2, 0), shard(2, 1)
    assert len(first) == len(second) == len(single) // 2
    # Batch k of the epoch goes to process k % 2: the same global batches, split between processes.
    assert first == single[0::2] and second == single[1::2]
    seen = Counter(sum(first + second, []))
    assert set(seen.values()) == {repeats} and len(seen) == 48 // repeats


@pytest.mark.slow
def test_make_loader__two_real_processes_get_disjoint_shards(tmp_path, indexed_bundle):
    """Two CPU processes (torchrun; Accelerate reads its env): each records the rows of its batches."""
    script = tmp_path / "shard.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            from accelerate import Accelerator
            from ssl_vit.data import DataConfig, load_data, make_loader

            acc = Accelerator(cpu=True)
            cfg = DataConfig(name={str(tmp_path / "indexed")!r}, image_size=16, num_workers=0,
                             cache_dir={str(tmp_path / "hf_cache")!r})
            bundle = load_data(cfg, need_labels=True)
            loader = acc.prepare(make_loader(bundle, "train", "mae", 4, train=True, seed=7, repeated_aug=3))
            rows = [b["labels"].tolist() for epoch in range(2) for b in loader]
            with open(sys.argv[1] + f"/rank{{acc.process_index}}.json", "w") as f:
                json.dump(rows, f)
            """
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    subprocess.run(cmd, check=True, env=env, timeout=120, capture_output=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # The same two epochs in one process: the real shards are its batches dealt alternately.
    loader = make_loader(indexed_bundle, "train", "mae", 4, train=True, seed=7, repeated_aug=3)
    single = _labels(loader) + _labels(loader)
    assert len(rank0) == len(rank1) == 12  # 48 rows / 4 per batch / 2 processes, two epochs
    assert rank0 == single[0::2] and rank1 == single[1::2]
    assert set(Counter(sum(rank0[:6] + rank1[:6], [])).values()) == {3}  # every image 3x per epoch
    assert rank0[:6] != rank0[6:]  # a new permutation each epoch
