"""Where a ViT looks: the class token's attention per head, and attention rollout (Abnar & Zuidema 2020).

The backbone runs fused attention (`F.scaled_dot_product_attention`), which never materialises the
attention matrix. Hooks on each block's `attn.qkv` capture its output, and the matrix is recomputed
from it exactly as timm's unfused path does (`softmax(q k^T * scale)`, after any q/k norm): the
backbone itself is not changed.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_vit.viz.images import IMAGENET_MEAN, IMAGENET_STD, colorize, denormalize, image_grid, overlay

__all__ = [
    "attention_grid",
    "attention_images",
    "attention_maps",
    "attention_matrices",
    "rollout",
    "rollout_from",
    "upsample",
]


def _attention_from_qkv(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """timm Attention's softmax(q k^T * scale) from its qkv projection output (B, N, 3*D): (B, heads, N, N)."""
    B, N, _ = qkv.shape
    q, k, _v = qkv.float().reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def attention_matrices(backbone: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention, in eval mode: a list (one per block) of (B, heads, N, N), rows summing to 1.

    Args: images (B, 3, H, W), normalised as the model's inputs. N = prefix tokens + patches.
    """
    captured: list[torch.Tensor] = []
    hooks = [
        block.attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        for block in backbone.blocks
    ]
    was_training = backbone.training
    try:
        backbone.eval()
        param = next(backbone.parameters())
        backbone.forward_features(images.to(device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    return [_attention_from_qkv(block.attn, qkv) for block, qkv in zip(backbone.blocks, captured)]


def _cls_row_to_grid(rows: torch.Tensor, num_prefix: int, grid: Sequence[int]) -> torch.Tensor:
    """(..., N) attention from the class token -> (..., Hp, Wp) over the patches (prefix tokens dropped)."""
    return rows[..., num_prefix:].reshape(*rows.shape[:-1], *grid)


def attention_maps(backbone: nn.Module, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """The class token's attention to each patch, per head, in one block (default: the last).

    Returns (B, heads, Hp, Wp). The rows summed to 1 over all tokens before the prefix tokens (class,
    distillation) were dropped, so a map sums to 1 minus the attention the class token paid to them.
    """
    attn = attention_matrices(backbone, images)[block]  # (B, heads, N, N)
    return _cls_row_to_grid(attn[:, :, 0], backbone.num_prefix_tokens, backbone.patch_embed.grid_size)


def rollout_from(
    attentions: list[torch.Tensor], num_prefix: int, grid: Sequence[int], residual: float = 0.5
) -> torch.Tensor:
    """Attention rollout: (B, Hp, Wp), how much the final class token draws on each input patch.

    Abnar & Zuidema 2020: average the heads, add the residual connection as `residual * I`, renormalise
    the rows, and multiply the per-block matrices from the first block to the last.
    """
    result = None
    for attn in attentions:  # (B, heads, N, N)
        a = attn.mean(dim=1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = (1 - residual) * a + residual * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return _cls_row_to_grid(result[:, 0], num_prefix, grid)


def rollout(backbone: nn.Module, images: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout through all blocks of `backbone` for `images`: (B, Hp, Wp)."""
    return rollout_from(
        attention_matrices(backbone, images), backbone.num_prefix_tokens, backbone.patch_embed.grid_size, residual
    )


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, K, Hp, Wp) patch maps -> (B, K, H, W): each patch's value over its pixels (nearest, no smoothing)."""
    return F.interpolate(maps.float(), size=tuple(size), mode="nearest")


def attention_grid(
    backbone: nn.Module,
    images: torch.Tensor,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cell: int = 96,
) -> torch.Tensor:
    """One picture (3, H, W) in 0..1: per image a row [image | rollout | head 1 .. head h of the last block].

    Args: images (B, 3, H, W) normalised model inputs (mean/std undo that for display); cell: pixels
    per tile. What the trainer logs to TensorBoard; tools/attention_maps.py draws the same with labels.
    """
    attentions = attention_matrices(backbone, images)
    grid = backbone.patch_embed.grid_size
    size = images.shape[-2:]
    heads = upsample(_cls_row_to_grid(attentions[-1][:, :, 0], backbone.num_prefix_tokens, grid), size)
    rolled = upsample(rollout_from(attentions, backbone.num_prefix_tokens, grid)[:, None], size)
    pictures = denormalize(images.detach().float().cpu(), mean, std)
    rows = []
    for i, picture in enumerate(pictures):
        maps = torch.cat([rolled[i], heads[i]]).cpu()  # (1 + heads, H, W)
        rows.append([picture] + [overlay(picture, heat) for heat in colorize(maps)])
    return image_grid(rows, cell=cell)


def attention_images(
    objective: nn.Module, batch: dict[str, torch.Tensor], cfg: object = None, max_images: int = 4
) -> dict[str, torch.Tensor]:
    """`{"attention": grid}` of the objective's backbone on a batch, for the trainer's TensorBoard.

    Empty when the backbone is not a ViT (e.g. a convnet teacher being trained). `cfg.data.mean/std`
    (when given) undo the input normalisation for display.
    """
    backbone = getattr(objective, "backbone", None)
    if backbone is None or not hasattr(backbone, "blocks") or not hasattr(backbone, "patch_embed"):
        return {}
    if "pixel_values" not in batch:  # an objective whose own views replace the plain image
        return {}
    data = getattr(cfg, "data", None)
    mean = tuple(getattr(data, "mean", IMAGENET_MEAN))
    std = tuple(getattr(data, "std", IMAGENET_STD))
    return {"attention": attention_grid(backbone, batch["pixel_values"][:max_images], mean=mean, std=std)}
