"""Read checkpoint files without running code from them: safetensors, or `torch.load(weights_only=True)`."""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "load_tensor_file", "load_tensors"]

# argparse.Namespace is the one non-tensor object the official MAE, DeiT and timm training scripts put
# in their checkpoints (`"args"`); rebuilding it only sets attributes, so it is allowed by name.
_ALLOWED_GLOBALS = [argparse.Namespace]


class UnsafeCheckpointError(ValueError):
    """A checkpoint that can only be read by unpickling arbitrary Python objects (which may run code)."""


def load_tensor_file(path: str | Path) -> dict[str, Any]:
    """One weights file -> its top-level dict; never unpickles anything but tensors and plain containers.

    `.safetensors` is read with safetensors; anything else with `torch.load(weights_only=True)`.
    Raises `UnsafeCheckpointError` for files holding other Python objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    what = _not_a_checkpoint(path)
    if what is not None:
        raise ValueError(
            f"{path} is {what}, not a checkpoint: give a run's output_dir, a backbone.safetensors, or a "
            f"weights file (safetensors, or a torch.save .pth/.bin/.pt), e.g. from timm, facebookresearch/mae "
            f"or deit, or Hugging Face."
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise ValueError(
                f"{path} is not a readable safetensors file ({err}): it is truncated (an interrupted copy or "
                f"download) or not safetensors at all. Copy it again, or point to another checkpoint."
            ) from None
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+|[Uu]nsupported [^\n.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors{what}, and unpickling "
            f"them could run arbitrary code. If you trust the file, re-save its weights alone, e.g. "
            f"python -c \"import torch; sd = torch.load('{path}', weights_only=False); "
            f"torch.save(sd.get('model', sd), 'weights.pth')\" and convert weights.pth instead."
        ) from None
    except RuntimeError as e:  # not a torch/pickle file at all
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    return obj


# The first bytes of files people pass by mistake, and of the formats we read.
_IMAGE_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"BM": "a BMP image"}
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a legacy pickle (protocol >= 2)


def _not_a_checkpoint(path: Path) -> str | None:
    """What `path` is when it clearly is no weights file (empty, an image, text), else None."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file (0 bytes)"
    for magic, what in _IMAGE_MAGIC.items():
        if head.startswith(magic):
            return what
    if head.startswith(_CHECKPOINT_MAGIC):
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None  # binary of some other kind: the reader below says why it cannot read it
    if text.isprintable() or all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"a text file (it starts {first!r})"
    return None


def load_tensors(path: str | Path) -> dict[str, Any]:
    """A weights file, or a sharded set described by `*.index.json`, as one dict."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{path} lists no weight shards under 'weight_map'")
        merged: dict[str, Any] = {}
        for shard in shards:
            merged.update(load_tensor_file(path.parent / shard))
        return merged
    return load_tensor_file(path)
