"""The built-in synthetic dataset: deterministic, balanced, shape-labelled, colour not a shortcut."""

from __future__ import annotations

import io

import datasets
import numpy as np
from PIL import Image

from ssl_vit.data import SHAPES, make_synthetic
from ssl_vit.data.synthetic import render_shapes


def _pixels(ds) -> np.ndarray:
    cells = ds.cast_column("image", datasets.Image(decode=False))["image"]
    return np.stack([np.asarray(Image.open(io.BytesIO(c["bytes"]))) for c in cells])


def test_make_synthetic__is_a_classlabel_image_dataset_with_balanced_shape_classes():
    splits = make_synthetic(train_size=50, eval_size=20, image_size=32, seed=0)
    train = splits["train"]
    assert isinstance(train.features["image"], datasets.Image)
    assert train.features["label"].names == list(SHAPES) and len(SHAPES) >= 10
    assert np.bincount(train["label"], minlength=10).tolist() == [5] * 10
    assert len(splits["test"]) == 20 and train[0]["image"].size == (32, 32) and train[0]["image"].mode == "RGB"


def test_make_synthetic__same_seed_same_images_other_seed_or_split_other_images():
    a = make_synthetic(20, 20, 16, seed=3)
    b = make_synthetic(20, 20, 16, seed=3)
    c = make_synthetic(20, 20, 16, seed=4)
    assert np.array_equal(_pixels(a["train"]), _pixels(b["train"]))
    assert not np.array_equal(_pixels(a["train"]), _pixels(c["train"]))
    assert not np.array_equal(_pixels(a["train"]), _pixels(a["test"]))


def test_render_shapes__follows_image_size():
    images = render_shapes(np.arange(10), 48, np.random.default_rng(0))
    assert images.shape == (10, 48, 48, 3) and images.dtype == np.uint8


def test_render_shapes__mean_colour_does_not_predict_the_shape():
    # Nearest class-mean on the average RGB of each image: close to chance (10%) on fresh images.
    rng = np.random.default_rng(0)
    labels = np.arange(2000) % 10
    feats = render_shapes(labels, 32, rng).reshape(2000, -1, 3).mean(axis=1)
    test_labels = np.arange(1000) % 10
    test = render_shapes(test_labels, 32, rng).reshape(1000, -1, 3).mean(axis=1)
    centroids = np.stack([feats[labels == k].mean(axis=0) for k in range(10)])
    pred = np.argmin(((test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == test_labels).mean() < 0.2


def test_render_shapes__shape_stands_out_from_its_background():
    labels = np.arange(500) % 10
    images, coverage = render_shapes(labels, 32, np.random.default_rng(1), return_coverage=True)
    lum = images.astype(float) @ np.array([0.299, 0.587, 0.114])  # (n, S, S) in 0..255
    inside = np.array([lum[i][coverage[i] > 0.99].mean() for i in range(500)])
    outside = np.array([lum[i][coverage[i] < 0.01].mean() for i in range(500)])
    assert (coverage > 0.99).sum(axis=(1, 2)).min() >= 12  # at least a dozen full pixels of shape
    assert np.quantile(np.abs(inside - outside), 0.02) > 40  # 98% of shapes differ by > 40/255
    assert 0.3 < (inside > outside).mean() < 0.7  # brighter or darker than the background at random


def test_shape_grid__one_column_per_shape_with_the_images_render_shapes_draws():
    from ssl_vit.data.synthetic import shape_grid

    grid = shape_grid(rows=2, size=16, seed=5, zoom=2)
    assert grid.shape == (2 * 16 * 2, len(SHAPES) * 16 * 2, 3) and grid.dtype == np.uint8
    images = render_shapes(np.tile(np.arange(len(SHAPES)), 2), 16, np.random.default_rng(5))
    # row 1, column 3 (zoomed x2) is the 14th image drawn: the second image of class 3
    cell = grid[32:64, 96:128][::2, ::2]
    assert np.array_equal(cell, images[len(SHAPES) + 3])
