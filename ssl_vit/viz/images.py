"""Images for the visual tools: synthetic or from disk, normalisation, heat-map colouring, grids."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ssl_vit.data.config import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "colorize",
    "denormalize",
    "image_grid",
    "load_images",
    "normalize",
    "overlay",
    "synthetic_images",
]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """`n` images of the built-in synthetic dataset, a different shape each: (n, 3, S, S) in 0..1."""
    import numpy as np

    from ssl_vit.data.synthetic import SHAPES, render_shapes

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SHAPES)
    pixels = render_shapes(labels, size, rng)  # (n, S, S, 3) uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def _square_crop_resize(image, size: int):
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.convert("RGB").crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def load_images(source: str | Path, size: int, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Images from a file, a folder of images (first `n`, sorted), or "synthetic": ((n, 3, S, S) in 0..1, names).

    Each image is centre-cropped to a square and resized to `size` (the model's input size).
    """
    from PIL import Image

    if str(source) == "synthetic":
        return synthetic_images(n, size, seed), [f"synthetic {i}" for i in range(n)]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)[:n]
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{source}: neither an image, a folder of images, nor 'synthetic'")
    tensors = []
    for f in files:
        with Image.open(f) as im:
            rgb = _square_crop_resize(im, size)
        tensors.append(torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3))
    return torch.stack(tensors).permute(0, 3, 1, 2).float() / 255.0, [f.name for f in files]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """0..1 images -> model inputs: (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def denormalize(inputs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Model inputs -> 0..1 images (clamped)."""
    m = torch.tensor(mean, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
    return (inputs * s + m).clamp(0, 1)


def colorize(values: torch.Tensor, cmap: str = "inferno", per_map: bool = True) -> torch.Tensor:
    """Heat maps (..., H, W) -> RGB (..., 3, H, W) in 0..1; each map stretched to its own min..max."""
    import matplotlib

    v = values.detach().float().cpu()
    if per_map:
        lo = v.flatten(-2).min(-1).values[..., None, None]
        hi = v.flatten(-2).max(-1).values[..., None, None]
        v = (v - lo) / (hi - lo).clamp_min(1e-12)
    lut = torch.tensor(matplotlib.colormaps[cmap](torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32)
    rgb = lut[(v.clamp(0, 1) * 255).round().long()]  # (..., H, W, 3)
    return rgb.movedim(-1, -3)


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """Blend an RGB heat map (3, H, W) over a 0..1 image (3, H, W), the image dimmed to grey underneath."""
    grey = image.mean(0, keepdim=True).expand_as(image)
    return ((1 - alpha) * grey + alpha * heat).clamp(0, 1)


def image_grid(rows: list[list[torch.Tensor]], cell: int | None = None, pad: int = 2) -> torch.Tensor:
    """Cells (3, h, w) in rows -> one image (3, H, W) in 0..1 on a white background; cells resized to `cell`."""
    cell = cell or max(t.shape[-1] for row in rows for t in row)
    ncols = max(len(r) for r in rows)
    out = torch.ones(3, len(rows) * (cell + pad) + pad, ncols * (cell + pad) + pad)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            t = t.detach().float().cpu()
            if t.shape[-1] != cell or t.shape[-2] != cell:
                t = F.interpolate(t[None], size=(cell, cell), mode="nearest")[0]
            y, x = pad + i * (cell + pad), pad + j * (cell + pad)
            out[:, y : y + cell, x : x + cell] = t
    return out
