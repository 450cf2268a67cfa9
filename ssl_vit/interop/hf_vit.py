"""Hugging Face ViT-family encoder weights (ViT, DeiT, ViTMAE) -> timm's VisionTransformer keys.

Both key styles are read: the one `save_pretrained` writes and the Hub holds
(`deit.encoder.layer.0.attention.attention.query.weight`) and the module names of transformers 5
(`deit.layers.0.attention.q_proj.weight`). HF keeps query, key and value as three Linear layers;
timm fuses them into one `qkv` Linear, rows ordered q, k, v.
"""

from __future__ import annotations

import re

import torch

__all__ = ["hf_encoder_prefix", "hf_encoder_to_timm", "is_hf_vit"]

_PATCH_KEY = "embeddings.patch_embeddings.projection.weight"
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
# Per-layer names (both styles) -> timm's, except q/k/v which are fused below.
LAYER_MAP = {
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
QKV_PARTS = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_EMBED_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Classification heads of the HF models -> timm's head names.
_HEADS = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}


def hf_encoder_prefix(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The HF encoder's key prefix (`"vit."`, `"deit."`, `""`), or None when this is not an HF ViT."""
    for key in state_dict:
        if key.endswith(_PATCH_KEY):
            return key[: -len(_PATCH_KEY)]
    return None


def is_hf_vit(state_dict: dict[str, torch.Tensor]) -> bool:
    return hf_encoder_prefix(state_dict) is not None


def hf_encoder_to_timm(
    state_dict: dict[str, torch.Tensor], *, keep_heads: bool = True
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Map an HF ViT/DeiT/ViTMAE state dict to timm keys.

    Returns (timm state dict, HF keys that were not used, notes). Keys outside the encoder (an MAE
    decoder, a pooler) come back unused for the caller to handle.
    """
    prefix = hf_encoder_prefix(state_dict)
    if prefix is None:
        raise ValueError("not a Hugging Face ViT state dict: no '*embeddings.patch_embeddings.projection.weight'")
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    notes: list[str] = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q,k,v: tensor}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if rest in _EMBED_MAP:
                out[_EMBED_MAP[rest]] = value
                continue
            m = _LAYER.match(rest)
            if m:
                i, sub = int(m.group(1)), m.group(2)
                module, _, param = sub.rpartition(".")
                if module in QKV_PARTS:
                    qkv.setdefault((i, param), {})[QKV_PARTS[module]] = value
                    continue
                if module in LAYER_MAP:
                    out[f"blocks.{i}.{LAYER_MAP[module]}.{param}"] = value
                    continue
        head, _, param = key.rpartition(".")
        if keep_heads and head in _HEADS and param in ("weight", "bias"):
            out[f"{_HEADS[head]}.{param}"] = value
            continue
        unused.append(key)
    for (i, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"layer {i}: found only {sorted(parts)} of its query/key/value ({param}), need all three; "
                f"keys not understood: {unused[:8]}"
            )
        out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if any(k.startswith(prefix + "pooler.") for k in unused):
        notes.append("dropped the HF pooler (dense + tanh over the class token): timm's ViT has none")
    if "dist_token" in out and "head_dist.weight" not in out and "head.weight" in out:
        # DeiTForImageClassification: one classifier on the class token, while timm's distilled model
        # averages two heads; keeping one head would change predictions, so the features alone come over.
        del out["head.weight"], out["head.bias"]
        notes.append("dropped the classifier of DeiTForImageClassification (class token only); features kept")
    return out, unused, notes
