"""Tiny datasets written to tmp_path in every on-disk layout the pipeline reads."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from ssl_vit.data import DataConfig

CLASSES = ["cat", "dog", "frog"]


def png(color: tuple[int, int, int], size: int = 12, mode: str = "RGB") -> bytes:
    """PNG bytes of a solid image (converted to `mode`)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def rows(n: int, num_classes: int = 3, seed: int = 0) -> tuple[list[dict], list[int]]:
    """n image cells (undecoded Image dicts) of random colours and balanced labels 0..num_classes-1."""
    rng = np.random.default_rng(seed)
    labels = [i % num_classes for i in range(n)]
    images = [{"bytes": png(tuple(int(c) for c in rng.integers(0, 256, 3))), "path": None} for _ in range(n)]
    return images, labels


def hf_dataset(n: int, image_column: str = "img", label_column: str = "label", num_classes: int = 3, seed: int = 0):
    images, labels = rows(n, num_classes, seed)
    names = CLASSES if num_classes == len(CLASSES) else [f"c{i}" for i in range(num_classes)]
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({image_column: images, label_column: labels}, features=features)


@pytest.fixture
def cfg(tmp_path: Path) -> DataConfig:
    """Small, worker-less config whose datasets cache lives in tmp_path."""
    return DataConfig(image_size=16, num_workers=0, cache_dir=str(tmp_path / "hf_cache"))


@pytest.fixture
def parquet_file(tmp_path: Path) -> Path:
    """One parquet file (no splits inside), CIFAR-10 style columns `img` / `label`."""
    path = tmp_path / "one" / "data.parquet"
    path.parent.mkdir()
    hf_dataset(60).to_parquet(str(path))
    return path


@pytest.fixture
def parquet_folder(tmp_path: Path) -> Path:
    """A folder of parquet shards named by split: train-0000x-of-00002.parquet, test-00000-of-00001.parquet."""
    root = tmp_path / "pq"
    root.mkdir()
    hf_dataset(30, seed=1).to_parquet(str(root / "train-00000-of-00002.parquet"))
    hf_dataset(30, seed=2).to_parquet(str(root / "train-00001-of-00002.parquet"))
    hf_dataset(12, seed=3).to_parquet(str(root / "test-00000-of-00001.parquet"))
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """class_name/*.png, 6 images per class, one grayscale and one RGBA among them."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(6):
            mode = "L" if i == 0 else ("RGBA" if i == 1 else "RGB")
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (root / name / f"{i}.png").write_bytes(png(color, size=10 + i, mode=mode))
    return root


@pytest.fixture
def saved_dict(tmp_path: Path) -> Path:
    """Dataset.save_to_disk output of a DatasetDict with train and validation, columns image / fine_label."""
    path = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": hf_dataset(40, "image", "fine_label"),
            "validation": hf_dataset(9, "image", "fine_label", seed=5),
        }
    ).save_to_disk(str(path))
    return path


@pytest.fixture
def make_dataset():
    """The `hf_dataset(n, image_column, label_column, num_classes, seed)` builder, for tests' own layouts."""
    return hf_dataset


@pytest.fixture
def make_png():
    """The `png(color, size, mode)` encoder."""
    return png
