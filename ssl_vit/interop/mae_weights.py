"""Import official MAE weights: facebookresearch/mae checkpoints and Hugging Face ViTMAE.

Both functions return `(backbone_sd, decoder_sd)`: `backbone_sd` has timm's keys (it loads into the
shared backbone and into timm), `decoder_sd` has the keys of `ssl_vit.objectives.mae.MAE`'s decoder, so

    mae.load_state_dict({**{"backbone." + k: v for k, v in backbone_sd.items()}, **decoder_sd})

restores a full MAE objective (empty `decoder_sd` for encoder-only checkpoints).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from ssl_vit.interop import hf_vit

__all__ = [
    "MAEWeightsError",
    "check_decoder_layout",
    "hf_vitmae_to_ours",
    "mae_official_to_ours",
    "split_backbone_decoder",
]

# Our MAE objective's own (non-backbone) entries; facebookresearch/mae names them identically.
_DECODER_PREFIXES = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
_DECODER_KEYS = ("mask_token", "decoder_pos_embed")


class MAEWeightsError(ValueError):
    """A state dict that is not an MAE checkpoint of the expected layout."""


# Every decoder block is a timm `Block(qkv_bias=True)`, in models_mae.py as in our objective.
_BLOCK_PARAMS = tuple(
    f"{module}.{kind}"
    for module in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
)
_DECODER_FIXED = (
    *_DECODER_KEYS,
    *(f"{m}.{kind}" for m in ("decoder_embed", "decoder_norm", "decoder_pred") for kind in ("weight", "bias")),
)


def _is_decoder_key(key: str) -> bool:
    return key in _DECODER_KEYS or key.startswith(_DECODER_PREFIXES)


def _looks_like_decoder(key: str) -> bool:
    return key.startswith(("decoder", "mask"))


def check_decoder_layout(decoder: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise MAEWeightsError unless `decoder` is exactly facebookresearch/mae's decoder (our objective's keys).

    A renamed or missing key would otherwise leave a decoder that loads nowhere (or half-initialised).
    """
    depth = 1 + max((int(m.group(1)) for k in decoder if (m := re.match(r"decoder_blocks\.(\d+)\.", k))), default=-1)
    expected = set(_DECODER_FIXED) | {f"decoder_blocks.{i}.{p}" for i in range(depth) for p in _BLOCK_PARAMS}
    unknown, missing = sorted(set(decoder) - expected), sorted(expected - set(decoder))
    if unknown or missing:
        raise MAEWeightsError(
            f"{source}: the MAE decoder is not in the expected layout (facebookresearch/mae models_mae.py: "
            f"mask_token, decoder_pos_embed, decoder_embed, decoder_blocks.N.*, decoder_norm, decoder_pred): "
            f"unknown keys {unknown[:8]}, missing keys {missing[:8]}. Was the checkpoint written by another "
            f"MAE variant, or a key renamed?"
        )


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """`{"model": sd, ...}` (how facebookresearch/mae saves) or a bare state dict -> the state dict."""
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    sd = dict(checkpoint)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise MAEWeightsError(
            f"expected a state dict of tensors (or {{'model': state_dict}}), found non-tensor entries: {bad[:5]}."
        )
    return sd


def split_backbone_decoder(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split an MAE objective's own state dict (`backbone.*` + decoder keys) into the two parts."""
    backbone = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    decoder = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
    return backbone, decoder


def mae_official_to_ours(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """facebookresearch/mae checkpoint (`{"model": sd}` or sd; full or encoder-only) -> (backbone_sd, decoder_sd).

    Their encoder keys are timm's already. Pretraining checkpoints end in `norm.*` (fits a backbone
    with `global_pool="token"`); their fine-tuned checkpoints replace it by `fc_norm.*` + `head.*`
    (fits `global_pool="avg"`). Keys are returned as the checkpoint has them; to fine-tune a
    pretraining checkpoint with global pooling, load it with `strict=False` as MAE does (fc_norm starts fresh).
    """
    sd = _unwrap(state_dict)
    backbone = {k: v for k, v in sd.items() if not _is_decoder_key(k)}
    decoder = {k: v for k, v in sd.items() if _is_decoder_key(k)}
    if "patch_embed.proj.weight" not in backbone:
        raise MAEWeightsError(
            "not a facebookresearch/mae checkpoint: no 'patch_embed.proj.weight' key. For Hugging Face "
            "ViTMAE weights use hf_vitmae_to_ours; found keys like " + ", ".join(list(sd)[:5]) + "."
        )
    stray = {k: v for k, v in backbone.items() if _looks_like_decoder(k)}  # e.g. a renamed decoder_pred
    if decoder or stray:
        check_decoder_layout({**decoder, **stray}, "facebookresearch/mae checkpoint")
    return backbone, decoder


# Hugging Face layer entries (Hub layout and transformers >= 5's) -> our (timm) names: the same table the
# ViT/DeiT importer uses; "q"/"k"/"v" are fused into attn.qkv afterwards.
_HF_LAYER_PARTS = {**hf_vit.LAYER_MAP, **hf_vit.QKV_PARTS}
_HF_ENCODER_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
# `decoder_layers.N` in memory and on the Hub; transformers 5's save_pretrained writes `decoder_encoder.layer.N`.
_HF_DECODER_LAYER = re.compile(r"^(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_ENCODER_FIXED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_DECODER_FIXED = {
    "mask_token": "mask_token",
    "decoder_pos_embed": "decoder_pos_embed",
    "decoder_embed.weight": "decoder_embed.weight",
    "decoder_embed.bias": "decoder_embed.bias",
    "decoder_norm.weight": "decoder_norm.weight",
    "decoder_norm.bias": "decoder_norm.bias",
    "decoder_pred.weight": "decoder_pred.weight",
    "decoder_pred.bias": "decoder_pred.bias",
}


def _convert_hf_part(
    sd: dict[str, torch.Tensor], prefix: str, fixed: dict[str, str], layer_re: re.Pattern, block_prefix: str,
    unknown: list[str],
) -> dict[str, torch.Tensor]:
    """`sd` with `prefix` stripped from its keys -> our names; keys it cannot place go to `unknown`, in full."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block, weight|bias) -> {"q": .., "k": .., "v": ..}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        m = layer_re.match(key)
        part = _HF_LAYER_PARTS.get(m.group(2)) if m else None
        if part is None:
            unknown.append(prefix + key)
            continue
        block, kind = f"{block_prefix}.{m.group(1)}", m.group(3)
        if part in ("q", "k", "v"):
            qkv.setdefault((block, kind), {})[part] = value
        else:
            out[f"{block}.{part}.{kind}"] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            if unknown:  # the caller's error names the keys it could not place: more useful
                continue
            raise MAEWeightsError(f"{block}: found only {sorted(parts)} of the query/key/value {kind}s.")
        out[f"{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    # HF configs with qkv_bias=False have no biases; timm's blocks always have one: zeros are the same model.
    for (block, kind) in list(qkv):
        if kind == "weight" and f"{block}.attn.qkv.bias" not in out:
            w = out[f"{block}.attn.qkv.weight"]
            out[f"{block}.attn.qkv.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out


def hf_vitmae_to_ours(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Hugging Face `ViTMAEForPreTraining` (or encoder-only `ViTMAEModel`) weights -> (backbone_sd, decoder_sd).

    Accepts the Hub's safetensors layout (`vit.encoder.layer.N.attention.attention.query...`) and
    transformers >= 5's in-memory layout (`vit.layers.N.attention.q_proj...`). HF's position embeddings
    and noise-to-mask convention equal ours, so the same weights and noise give the same loss.
    """
    sd = _unwrap(state_dict)
    decoder = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
    vit = {k[len("vit.") :]: v for k, v in sd.items() if k.startswith("vit.")}
    bare = {k: v for k, v in sd.items() if not k.startswith(("decoder.", "vit."))}  # a bare ViTMAEModel
    unknown: list[str] = []
    backbone_sd = {
        **_convert_hf_part(vit, "vit.", _HF_ENCODER_FIXED, _HF_ENCODER_LAYER, "blocks", unknown),
        **_convert_hf_part(bare, "", _HF_ENCODER_FIXED, _HF_ENCODER_LAYER, "blocks", unknown),
    }
    decoder_sd = _convert_hf_part(decoder, "decoder.", _HF_DECODER_FIXED, _HF_DECODER_LAYER, "decoder_blocks", unknown)
    if unknown:
        raise MAEWeightsError(
            f"unrecognised keys for a Hugging Face ViTMAE checkpoint: {unknown[:8]}"
            + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
            + ". For facebookresearch/mae checkpoints use mae_official_to_ours."
        )
    if "patch_embed.proj.weight" not in backbone_sd:
        raise MAEWeightsError("no 'embeddings.patch_embeddings.projection.weight': not a ViTMAE checkpoint.")
    if decoder_sd:
        check_decoder_layout(decoder_sd, "Hugging Face ViTMAE checkpoint (decoder.* converted to MAE's names)")
    return backbone_sd, decoder_sd
