"""Checkpoints: the full training state (atomic, resumable) and the exported backbone.

Layout of `output_dir`:
    checkpoint-last/            full state of the last save (complete once trainer_state.json exists)
        model.safetensors       the unwrapped objective's state_dict (backbone.*, decoder*, ...)
        optimizer.pt            optimizer state (torch.save; loaded with weights_only=True)
        scaler.pt               fp16 loss-scaler state (fp16 only)
        ema.safetensors         EMA of the objective's weights (train.ema only)
        rng/rank{r}.pt          each process's random states (torch, cuda, python, numpy)
        trainer_state.json      step, epoch, batch in epoch, images seen, ... (written last)
    backbone.safetensors + backbone.json     the backbone alone, timm keys (+ backbone_ema.* with EMA)

A save writes `checkpoint-last.tmp/`, then renames the old `checkpoint-last` to `checkpoint-prev`, the
new one into place, and deletes `checkpoint-prev`: a crash at any point leaves one complete checkpoint,
which `recover()` puts back in place before a resume; a half-written folder is never read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

__all__ = [
    "CHECKPOINT",
    "CheckpointError",
    "is_complete",
    "load_backbone",
    "read_trainer_state",
    "recover",
    "save_backbone",
    "save_tensors",
    "write_checkpoint_files",
    "swap_in",
]

CHECKPOINT = "checkpoint-last"
_TMP = "checkpoint-last.tmp"
_PREV = "checkpoint-prev"
STATE_FILE = "trainer_state.json"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message says which file and what to do."""


# ---------------------------------------------------------------------------------------------------
# Durable writes


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file on disk and fsynced; tensors sharing memory (tied weights) are copied apart."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()  # safetensors refuses aliases and views into larger storages
        seen.add((v.untyped_storage().data_ptr(), v.storage_offset()))
        out[k] = v
    save_file(out, str(path), metadata=metadata or {"format": "pt"})
    _fsync_file(path)


def _torch_save(obj: Any, path: Path) -> None:
    torch.save(obj, str(path))
    _fsync_file(path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    _fsync_file(tmp)
    os.replace(tmp, path)


def _torch_load(path: Path) -> Any:
    import pickle

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message suggests weights_only=False: the wrong advice for a file we never write so.
        found = str(err).partition("Unsupported global: ")[2].split(" was not")[0]
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors ({found or 'unsupported'}), "
            f"and unpickling them could run arbitrary code; ssl_vit never writes such files. Replace the "
            f"checkpoint with one you trust, or set train.resume=never to start afresh."
        ) from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a truncated or foreign file is a CheckpointError naming it (not a bare header error)."""
    from ssl_vit.interop.safe_load import load_tensor_file

    try:
        return load_tensor_file(path)  # the one reader of user-supplied weights files
    except ValueError as err:
        raise CheckpointError(str(err)) from None


# ---------------------------------------------------------------------------------------------------
# The full state


def is_complete(path: Path) -> bool:
    """A checkpoint folder whose last file (trainer_state.json) was written and parses."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("format") == FORMAT


def recover(output_dir: str | Path) -> Path | None:
    """Tidy after a crash (main process only) and return the complete checkpoint-last, if any.

    Deletes an unfinished `checkpoint-last.tmp`; if the crash came between the two renames of a swap,
    moves `checkpoint-prev` back to `checkpoint-last`.
    """
    out = Path(output_dir)
    last, tmp, prev = out / CHECKPOINT, out / _TMP, out / _PREV
    if tmp.exists():
        shutil.rmtree(tmp)
    if is_complete(last):
        if prev.exists():
            shutil.rmtree(prev)
        return last
    if is_complete(prev):
        if last.exists():
            shutil.rmtree(last)
        os.replace(prev, last)
        _fsync_dir(out)
        return last
    return None


def temp_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / _TMP


def write_checkpoint_files(
    folder: Path,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    scaler_state: dict[str, Any] | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
    rng_state: dict[str, Any] | None = None,
    rank: int = 0,
) -> None:
    """Write the given parts of a checkpoint into `folder` (each process writes its own rng file)."""
    folder.mkdir(parents=True, exist_ok=True)
    if model_state is not None:
        save_tensors(model_state, folder / "model.safetensors")
    if optimizer_state is not None:
        _torch_save(optimizer_state, folder / "optimizer.pt")
    if scaler_state is not None:
        _torch_save(scaler_state, folder / "scaler.pt")
    if ema_state is not None:
        save_tensors(ema_state, folder / "ema.safetensors")
    if rng_state is not None:
        (folder / "rng").mkdir(exist_ok=True)
        _torch_save(rng_state, folder / "rng" / f"rank{rank}.pt")


def swap_in(output_dir: str | Path, trainer_state: dict[str, Any]) -> Path:
    """Mark the temp checkpoint complete and make it checkpoint-last (main process, after all wrote)."""
    out = Path(output_dir)
    last, tmp, prev = out / CHECKPOINT, out / _TMP, out / _PREV
    _write_json(dict(trainer_state, format=FORMAT), tmp / STATE_FILE)
    _fsync_dir(tmp)
    if last.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(last, prev)
    os.replace(tmp, last)
    _fsync_dir(out)
    if prev.exists():
        shutil.rmtree(prev)
    return last


def read_trainer_state(folder: Path) -> dict[str, Any]:
    if not is_complete(folder):
        raise CheckpointError(
            f"{folder} is not a complete checkpoint (no valid {STATE_FILE}): point train.resume at a "
            f"checkpoint-last folder, or set train.resume=never to start afresh."
        )
    return json.loads((folder / STATE_FILE).read_text())


def read_model_state(folder: Path) -> dict[str, torch.Tensor]:
    return _load_safetensors(folder / "model.safetensors")


def read_optional(folder: Path, name: str) -> Any:
    path = folder / name
    if not path.is_file():
        return None
    return _load_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)


def read_rng(folder: Path, rank: int) -> dict[str, Any] | None:
    path = folder / "rng" / f"rank{rank}.pt"
    return _torch_load(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------
# The exported backbone


def _json_ready(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def save_backbone(
    backbone: nn.Module, path: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None, **meta: Any
) -> Path:
    """Write `backbone.state_dict()` (timm keys) as safetensors plus a JSON beside it (`<stem>.json`).

    The JSON holds `model` (the spec that rebuilds it with `create_backbone(**spec)`), `timm`
    ([timm name, kwargs] for `timm.create_model`) and `meta` (objective, step, epoch, images_seen,
    config, ...). `path` is a file or a folder (then `backbone.safetensors` inside it). `state_dict`
    replaces the module's own (e.g. gathered FSDP weights, EMA weights).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "backbone.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"model": dict(getattr(backbone, "spec", {}) or {})}
    if hasattr(backbone, "timm_spec"):
        try:
            name, kwargs = backbone.timm_spec()
            info["timm"] = [name, kwargs]
        except (KeyError, ValueError):  # a timm model built by name has no ssl_vit spec to translate
            info["timm"] = None
    info.update(meta)
    tmp = path.with_name(path.name + ".tmp")
    save_tensors(state_dict if state_dict is not None else backbone.state_dict(), tmp)
    os.replace(tmp, path)
    _write_json(_json_ready(info), path.with_suffix(".json"))
    return path


def run_backbone_file(path: Path) -> Path | None:
    """Our own export behind `path` (a run's output_dir, a backbone file), or None for other formats."""
    if path.is_dir():
        candidate = path / "backbone.safetensors"
        return candidate if candidate.is_file() and candidate.with_suffix(".json").is_file() else None
    if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        meta = json.loads(path.with_suffix(".json").read_text())
        return path if isinstance(meta, dict) and "model" in meta else None
    return None


def _model_overrides(model_cfg: Any) -> dict[str, Any]:
    """Settings of a model config that may differ from the saved architecture without new weights."""
    if model_cfg is None:
        return {}
    out = {}
    for key in ("img_size", "drop_path_rate", "global_pool", "dynamic_img_size"):
        value = getattr(model_cfg, key, None)
        if value is not None:
            out[key] = value
    return out


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], *, reset_head: bool, source: str) -> nn.Module:
    """Strict load, except: a reset head, and the final norm moving between `norm` and `fc_norm`
    when the pooling changed (MAE fine-tunes with global average pooling and a fresh fc_norm)."""
    from ssl_vit.models import load_weights

    own = set(model.state_dict())
    state = dict(state)
    allowed_missing: set[str] = set()
    for a, b in (("norm.", "fc_norm."), ("fc_norm.", "norm.")):
        if any(k.startswith(a) for k in state) and not any(k.startswith(a) for k in own):
            # The checkpoint's final norm has no place in this pooling; the new one starts fresh.
            state = {k: v for k, v in state.items() if not k.startswith(a)}
            allowed_missing |= {k for k in own if k.startswith(b)}
    if not allowed_missing:
        return load_weights(model, state, strict=True, skip_head=reset_head)
    load_weights(model, state, strict=False, skip_head=reset_head)
    head = ("head.", "head_dist.") if reset_head else ()
    missing = {k for k in own - set(state) - allowed_missing if not (head and k.startswith(head))}
    unexpected = {k for k in set(state) - own if not (head and k.startswith(head))}
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this backbone: missing {sorted(missing)[:8]}, unexpected "
            f"{sorted(unexpected)[:8]}. Build the architecture the checkpoint was trained with."
        )
    return model


def load_backbone(
    path_or_random: str | Path,
    model_cfg: Any = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """A backbone from `"random"`, a run folder, a `backbone.safetensors`, or another supported checkpoint.

    Args:
        path_or_random: "random" (build `model_cfg` fresh); a run's output_dir or a
            `*.safetensors` with its `*.json` beside it (rebuilt from the saved spec, loaded strictly);
            anything else (timm / MAE / DeiT / Hugging Face files) goes through
            `ssl_vit.interop.convert.to_backbone_state_dict`.
        model_cfg: a `ModelConfig`; for "random" the whole architecture, for checkpoints only
            `img_size` (position embeddings are resized), `drop_path_rate` and `global_pool`.
        num_classes: None keeps the saved head; another number builds a fresh head of that size.
        overrides: more keyword overrides of the saved spec (e.g. `img_size=64`).
    """
    from ssl_vit.models import create_model

    if str(path_or_random) == "random":
        if model_cfg is None:
            raise CheckpointError("load_backbone('random') needs model_cfg (a ModelConfig) to know what to build.")
        kwargs = dict(
            img_size=model_cfg.img_size,
            patch_size=model_cfg.patch_size,
            pos_embed=model_cfg.pos_embed,
            global_pool=model_cfg.global_pool,
            drop_path_rate=model_cfg.drop_path_rate,
            num_classes=num_classes if num_classes is not None else 0,
            **dict(model_cfg.args),
        )
        kwargs.update(overrides)
        return create_model(model_cfg.name, **kwargs)

    path = Path(path_or_random)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint '{path}' not found: give a run's output_dir, a backbone.safetensors, a timm/MAE/DeiT "
            f"checkpoint file, or 'random'."
        )
    own = run_backbone_file(path)
    if own is not None:
        meta = json.loads(own.with_suffix(".json").read_text())
        spec = dict(meta["model"])
        state = _load_safetensors(own)
        source = str(own)
    else:
        try:
            from ssl_vit.interop.convert import to_backbone_state_dict
        except ImportError:
            raise CheckpointError(
                f"'{path}' is not an ssl_vit export (backbone.safetensors + backbone.json) and the converter "
                f"(ssl_vit.interop.convert) is unavailable: convert it with tools/convert.py first."
            ) from None
        state, info = to_backbone_state_dict(path)
        spec = dict(info.spec)
        source = str(path)
    spec.update(_model_overrides(model_cfg))
    spec.update({k: v for k, v in overrides.items() if v is not None})
    if spec.get("global_pool") == "avg" and ("distilled" in spec["name"] or spec.get("distilled")):
        # DeiT's two heads read the class and distillation tokens: there is no average to pool into them.
        logging.getLogger("ssl_vit.engine").warning(
            "%s has a distillation token: keeping its token pooling (model.global_pool=avg ignored).", path
        )
        spec["global_pool"] = "token"
    # ViTs name their classifier `head`; other timm models (a ResNet teacher: `fc`) keep it in the spec.
    saved_classes = state["head.weight"].shape[0] if "head.weight" in state else int(spec.get("num_classes") or 0)
    reset_head = num_classes is not None and num_classes != saved_classes
    spec["num_classes"] = num_classes if num_classes is not None else saved_classes
    name = spec.pop("name")
    model = create_model(name, **spec)
    return _load_into(model, state, reset_head=reset_head, source=source)
