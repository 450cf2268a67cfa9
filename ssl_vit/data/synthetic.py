"""The built-in `synthetic` dataset: procedurally drawn shapes, the default data of every recipe.

The label is the kind of shape (10 kinds). Everything a shortcut could use varies independently of
it: the shape's colour, position and size, the background's colour, gradient, stripes and blotches,
and pixel noise. So a representation that separates the classes must encode shape, and a linear
probe on it tells whether pretraining learned something. Deterministic by seed, made in memory in
about a second for a few thousand 32x32 images (numpy, vectorised over images).

Difficulty (changed 2026-12-05, issue 22): shapes are upright, 30-45% of the side in radius, on a
background whose gradient / stripes / blotches are a third as strong as before. With any rotation,
radius 22-42% and the stronger texture, a nano ViT trained from scratch reached 16.5% (patch 4, 390
steps) to 52% (patch 8, 1,200 steps) and a small convnet 56% after 390 steps: minutes-long runs
could not show learning. Upright shapes were the main change (patch 8, 600 steps: 47% -> 75%); the
three together give 98%, while a random init still sits near chance (linear probe on its averaged
patch tokens 15%, kNN 11%), so what pretraining adds stays visible.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image as PILImage

__all__ = ["SHAPES", "make_synthetic", "render_shapes", "shape_grid"]

# Each shape fits in the unit circle of its local frame; the renderer scales and places it. Pairs
# that a rotation makes equal (square/diamond, plus/x) are not both here (shapes were rotated once).
SHAPES: tuple[str, ...] = (
    "disk",
    "ring",
    "triangle",
    "square",
    "frame",
    "star",
    "cross",
    "crescent",
    "half_disk",
    "bar",
)


# --- signed distance functions in the shape's local frame (negative inside), arrays (B, H, W) ----


def _box(u: np.ndarray, v: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    qx, qy = np.abs(u) - half_w, np.abs(v) - half_h
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, radius: float = 1.0) -> np.ndarray:
    # Fold the angle into one edge's sector; exact inside, a close bound outside (enough for AA).
    sector = 2 * math.pi / sides
    phi = np.mod(np.arctan2(v, u) + sector / 2, sector) - sector / 2
    return np.hypot(u, v) * np.cos(phi) - radius * math.cos(math.pi / sides)


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    # Folded into half a point's sector, the boundary is the segment from the tip A to the notch B.
    half = math.pi / points
    phi = np.abs(np.mod(np.arctan2(v, u) + half, 2 * half) - half)
    r = np.hypot(u, v)
    px, py = r * np.cos(phi), r * np.sin(phi)
    ax, ay = 1.0, 0.0
    bx, by = inner * math.cos(half), inner * math.sin(half)
    ex, ey = bx - ax, by - ay
    norm = math.hypot(ex, ey)
    # Outward normal of AB (the origin lies on its negative side).
    return ((px - ax) * ey - (py - ay) * ex) / norm


def _sdf_disk(u, v):
    return np.hypot(u, v) - 1.0


def _sdf_ring(u, v):
    return np.abs(np.hypot(u, v) - 0.72) - 0.28


def _sdf_triangle(u, v):
    return _polygon(u, v, 3, radius=1.1)


def _sdf_square(u, v):
    return _polygon(u, v, 4)


def _sdf_frame(u, v):
    return np.abs(_polygon(u, v, 4) + 0.19) - 0.19


def _sdf_star(u, v):
    return _star(u, v)


def _sdf_cross(u, v):
    return np.minimum(_box(u, v, 0.95, 0.32), _box(u, v, 0.32, 0.95))


def _sdf_crescent(u, v):
    return np.maximum(np.hypot(u, v) - 1.0, -(np.hypot(u - 0.55, v) - 0.78))


def _sdf_half_disk(u, v):
    v = v + 0.4  # centre the half disk's area on the origin
    return np.maximum(np.hypot(u, v) - 1.0, -v)


def _sdf_bar(u, v):
    return _box(u, v, 1.0, 0.27)


_SDF: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    name: globals()[f"_sdf_{name}"] for name in SHAPES
}


# --- rendering ------------------------------------------------------------------------------------


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _background(rng: np.random.Generator, n: int, size: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Textured backgrounds (n, S, S, 3) in [0, 1]: colour + gradient + stripes + blotches."""
    base = rng.uniform(0.0, 1.0, (n, 1, 1, 3))
    # Linear gradient in a random direction.
    angle = rng.uniform(0, 2 * math.pi, (n, 1, 1))
    ramp = (xx * np.cos(angle) + yy * np.sin(angle)) / size - 0.5  # (n, S, S) in about [-0.7, 0.7]
    grad = ramp[..., None] * rng.uniform(-0.09, 0.09, (n, 1, 1, 3))
    # Sinusoidal stripes of a second colour, random frequency, direction and phase. Kept gentler
    # than the shape's contrast and wider than its edges, so that edges mostly come from the shape.
    freq = rng.uniform(0.5, 3.0, (n, 1, 1))
    s_angle = rng.uniform(0, math.pi, (n, 1, 1))
    phase = rng.uniform(0, 2 * math.pi, (n, 1, 1))
    wave = np.sin(2 * math.pi * freq * (xx * np.cos(s_angle) + yy * np.sin(s_angle)) / size + phase)
    stripes = wave[..., None] * rng.uniform(-0.03, 0.03, (n, 1, 1, 3))
    # Low-frequency blotches: a 4x4 random grid, bilinearly upsampled.
    coarse = rng.uniform(-0.024, 0.024, (n, 4, 4, 3))
    pos = np.linspace(0, 3, size)
    i0 = np.minimum(pos.astype(int), 2)
    t = (pos - i0)[None, :, None]
    rows = coarse[:, i0] * (1 - t[..., None]) + coarse[:, i0 + 1] * t[..., None]  # (n, S, 4, 3)
    t2 = (pos - i0)[None, None, :, None]
    blotch = rows[:, :, i0] * (1 - t2) + rows[:, :, i0 + 1] * t2  # (n, S, S, 3)
    return np.clip(base + grad + stripes + blotch, 0.0, 1.0)


def render_shapes(
    labels: np.ndarray, size: int, rng: np.random.Generator, return_coverage: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Draw one shape per label on a textured background.

    Args: labels (n,) ints indexing SHAPES; size: image side in pixels.
    Returns: uint8 images (n, size, size, 3); with return_coverage, also the shape's per-pixel
    coverage (n, size, size) in [0, 1].
    """
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres, (S, S)
    bg = _background(rng, n, size, xx, yy)

    # Pose: radius 30-45% of the side, fully inside the image, upright (see the module docstring).
    radius = rng.uniform(0.3, 0.45, n) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    r = radius[:, None, None]
    u = (xx[None] - cx[:, None, None]) / r  # (n, S, S) local frame, unit = radius
    v = (yy[None] - cy[:, None, None]) / r

    sdf = np.empty((n, size, size))
    for k, name in enumerate(SHAPES):
        idx = np.flatnonzero(labels == k)
        if idx.size:
            sdf[idx] = _SDF[name](u[idx], v[idx])
    # Anti-aliased coverage from the distance in pixels.
    alpha = np.clip(0.5 - sdf * r, 0.0, 1.0)[..., None]  # (n, S, S, 1)

    # Shape colour: any colour, pushed away from the background's mean brightness so that the
    # shape stays visible; which is brighter is random, so brightness says nothing of the class.
    fg = rng.uniform(0.0, 1.0, (n, 3))
    bg_lum = _luminance(bg.mean(axis=(1, 2)))
    gap = _luminance(fg) - bg_lum
    sign = np.where(gap == 0, 1.0, np.sign(gap))
    need = np.maximum(0.4 - np.abs(gap), 0.0)
    fg = np.clip(fg + (sign * need)[:, None], 0.0, 1.0)
    # Where clipping ate the shift, flip to the other side of the background instead.
    still_close = np.abs(_luminance(fg) - bg_lum) < 0.25
    fg[still_close] = np.clip(bg.mean(axis=(1, 2))[still_close] - sign[still_close, None] * 0.45, 0.0, 1.0)
    fg = fg[:, None, None, :] * rng.uniform(0.85, 1.0, (n, 1, 1, 1))  # slight shading variety

    img = bg * (1.0 - alpha) + fg * alpha
    img = img + rng.normal(0.0, 1.0, img.shape) * rng.uniform(0.0, 0.04, (n, 1, 1, 1))
    images = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return (images, alpha[..., 0]) if return_coverage else images


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_synthetic(
    train_size: int = 5000, eval_size: int = 1000, image_size: int = 32, seed: int = 0, chunk: int = 512
) -> dict:
    """The `synthetic` dataset as {"train": Dataset, "test": Dataset} with columns image, label.

    Classes are balanced in each split; the two splits come from independent seeded streams.
    """
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(SHAPES))})
    out = {}
    for split, n, stream in (("train", train_size, 0), ("test", eval_size, 1)):
        rng = np.random.default_rng([seed, stream])
        labels = rng.permutation(np.arange(n) % len(SHAPES))
        images = []
        for start in range(0, n, chunk):  # chunks bound the float64 working memory at large sizes
            for img in render_shapes(labels[start : start + chunk], image_size, rng):
                images.append({"bytes": _png_bytes(img), "path": None})
        out[split] = datasets.Dataset.from_dict(
            {"image": images, "label": labels.tolist()}, features=features, split=split
        )
    return out


def shape_grid(rows: int = 4, size: int = 32, seed: int = 0, zoom: int = 3) -> np.ndarray:
    """A picture of the dataset: `rows` fresh images of each shape, one column per class (uint8 RGB).

        python -m ssl_vit.data.synthetic docs/images/synthetic_shapes.png
    """
    labels = np.tile(np.arange(len(SHAPES)), rows)  # row-major: row r holds one image of every class
    images = render_shapes(labels, size, np.random.default_rng(seed))  # (rows * classes, S, S, 3)
    grid = images.reshape(rows, len(SHAPES), size, size, 3).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * size, len(SHAPES) * size, 3)
    return grid.repeat(zoom, axis=0).repeat(zoom, axis=1)


if __name__ == "__main__":
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "synthetic_shapes.png"
    PILImage.fromarray(shape_grid()).save(out)
    print(f"wrote {out}: columns {', '.join(SHAPES)}")
