"""Backbone names (timm's, plus small-image sizes) and the builders behind them."""

from __future__ import annotations

import difflib
import re
from typing import Any

import torch.nn as nn

from ssl_vit.models.vit import ViT

__all__ = ["create_backbone", "create_model", "list_backbones", "timm_spec_for", "UnknownModelError"]


class UnknownModelError(ValueError):
    """A model name that neither ssl_vit nor timm knows."""


# Width, depth, heads of each size (ViT paper; nano is ours: ~1M parameters for CPU runs).
SIZES: dict[str, dict[str, int]] = {
    "nano": dict(embed_dim=128, depth=5, num_heads=4),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}

# timm's own names first (they load into timm.create_model(name) as they are), then small-image
# sizes, which load into timm's class built with the same arguments (see timm_spec_for).
_NAMES = [
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "vit_huge_patch14_224",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
    "vit_nano_patch4_32",
    "vit_nano_patch8_32",
    "vit_tiny_patch4_32",
    "vit_small_patch4_32",
    "vit_tiny_patch2_32",
    "deit_nano_distilled_patch4_32",
    "deit_nano_distilled_patch8_32",
    "deit_tiny_distilled_patch4_32",
]
_TIMM_NATIVE = {n for n in _NAMES if n.endswith("_224")}
_PATTERN = re.compile(r"^(vit|deit)_(nano|tiny|small|base|large|huge)(_distilled)?_patch(\d+)_(\d+)$")


def list_backbones() -> list[str]:
    return list(_NAMES)


def _parse(name: str) -> dict[str, Any]:
    m = _PATTERN.match(name)
    if m is None or name not in _NAMES:
        close = difflib.get_close_matches(name, _NAMES, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(
            f"unknown backbone '{name}'.{hint} Known backbones: {', '.join(_NAMES)}."
        )
    _, size, distilled, patch, img = m.groups()
    return dict(size=size, distilled=bool(distilled), patch_size=int(patch), img_size=int(img))


def _build_kwargs(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    parsed = _parse(name)
    kwargs: dict[str, Any] = dict(SIZES[parsed["size"]])
    kwargs.update(patch_size=parsed["patch_size"], img_size=parsed["img_size"], distilled=parsed["distilled"])
    if name in _TIMM_NATIVE:  # timm's default head for that name (ViT-H/14 ships without one)
        kwargs["num_classes"] = _timm_default_classes(name)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    img, patch = kwargs["img_size"], kwargs["patch_size"]
    if img % patch:
        raise ValueError(
            f"image size {img} is not divisible by patch size {patch}: choose model.img_size / "
            f"data.image_size as a multiple of {patch}, or another model.patch_size."
        )
    if img < patch:
        raise ValueError(f"image size {img} is smaller than the patch size {patch}: use larger images.")
    return kwargs


def _timm_default_classes(name: str) -> int:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.num_classes if cfg is not None and cfg.num_classes is not None else 1000


def create_backbone(name: str, **overrides: Any) -> ViT:
    """Build the shared ViT backbone by timm-style name; `overrides` are timm VisionTransformer kwargs.

    Extra kwargs: `pos_embed` ("learn" | "sincos"), `distilled` (bool). `None` values are ignored, so
    config fields left unset keep the size's defaults.
    """
    kwargs = _build_kwargs(name, overrides)
    model = ViT(**kwargs)
    model.spec = {"name": name, **{k: v for k, v in overrides.items() if v is not None}}
    return model


def timm_spec_for(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm name, kwargs) building timm's own class with the same architecture as `spec`."""
    name = spec["name"]
    kwargs = _build_kwargs(name, {k: v for k, v in spec.items() if k != "name"})
    distilled = kwargs.pop("distilled")
    kwargs.pop("pos_embed", None)  # timm stores sin-cos values as an ordinary (learnable) pos_embed
    if name in _TIMM_NATIVE:
        timm_name = name
        defaults = _build_kwargs(name, {})
    else:
        parsed = _parse(name)
        # The nearest timm-registered model of the same kind; kwargs override what differs.
        timm_name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
        defaults = dict(SIZES["tiny"], patch_size=16, img_size=224)
        del parsed
    defaults.pop("distilled", None)
    extra = {k: v for k, v in kwargs.items() if defaults.get(k, object()) != v}
    return timm_name, extra


def create_model(name: str, **overrides: Any) -> nn.Module:
    """A backbone for ssl_vit's names; any other timm model (e.g. a ResNet teacher) by timm's name."""
    if name in _NAMES:
        return create_backbone(name, **overrides)
    import timm

    if name not in timm.list_models():
        close = difflib.get_close_matches(name, _NAMES + timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown model '{name}': neither an ssl_vit backbone nor a timm model.{hint}")
    kwargs = {k: v for k, v in overrides.items() if v is not None and k not in ("pos_embed", "distilled")}
    if kwargs.get("global_pool") == "token":  # the ViT default of ModelConfig; convnets have no class token
        del kwargs["global_pool"]
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:  # a convnet (e.g. a ResNet teacher) takes no image or patch size
        if "unexpected keyword argument" not in str(err) or not {"img_size", "patch_size"} & set(kwargs):
            raise
        kwargs = {k: v for k, v in kwargs.items() if k not in ("img_size", "patch_size")}
        model = timm.create_model(name, pretrained=False, **kwargs)
    model.spec = {"name": name, **kwargs}
    return model
