"""Pieces several objectives share, each written once.

- The EMA teacher (DINO's teacher, I-JEPA's target encoder, MoCo v3's momentum encoder):
  `copy_params_` makes it the online encoder as training starts, `ema_update_` moves it after each
  optimizer step, `cosine_momentum` is the momentum that rises from `base` to 1 along a half cosine.
- `beit_init_`: the encoder init BEiT and SimMIM (which took it from BEiT) both use.
- `masked_image_crop`: the one view BEiT and SimMIM mask: RandomResizedCrop (ratio 3/4-4/3) + flip + normalise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import nn
from torchvision import transforms as T

__all__ = ["beit_init_", "copy_params_", "cosine_momentum", "ema_update_", "masked_image_crop"]


# -- the EMA teacher ----------------------------------------------------------------------------


def _paired(target: nn.Module, online: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(target's parameters, online's parameters, detached), in matching order."""
    target_params, online_params = list(target.parameters()), [p.detach() for p in online.parameters()]
    if len(target_params) != len(online_params):
        raise ValueError(
            f"the teacher has {len(target_params)} parameters and the online encoder {len(online_params)}: "
            f"the teacher must be a copy of it (copy.deepcopy)."
        )
    return target_params, online_params


@torch.no_grad()
def copy_params_(target: nn.Module, online: nn.Module, *, buffers: bool = False) -> None:
    """target <- online, parameter by parameter (the teacher's start); with `buffers`, the buffers too.

    Without `buffers` the teacher keeps its own buffers (MoCo v3's momentum projector keeps its
    BatchNorm statistics).
    """
    torch._foreach_copy_(*_paired(target, online))
    if buffers:
        for t, s in zip(target.buffers(), online.buffers(), strict=True):
            t.copy_(s)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for every parameter (buffers stay)."""
    target_params, online_params = _paired(target, online)
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)


def cosine_momentum(step: float, total_steps: int, base: float) -> float:
    """EMA momentum after `step` of `total_steps`: 1 - (1 - base)(cos(pi step / total_steps) + 1) / 2.

    `base` at step 0, 1 at the last step: DINO's utils.cosine_scheduler(base, 1, ...) and MoCo v3's
    adjust_moco_momentum, counted in optimizer steps. A run of 0 steps counts as 1.
    """
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0


# -- initialisation -----------------------------------------------------------------------------


def beit_init_(
    backbone: nn.Module,
    mask_token: nn.Parameter,
    heads: Sequence[nn.Module] = (),
    tokens: Sequence[str] = ("cls_token", "dist_token", "pos_embed"),
) -> None:
    """microsoft/unilm BEiT's pretraining init (SimMIM's too), in its order of random draws.

    N(0, 0.02) cut at +-0.02 for every linear / conv weight of the backbone, then of `heads`; LayerNorms
    1 / 0, biases 0; the same cut normal for the backbone's `tokens` that are learned parameters (fixed
    sin-cos positions stay); each block's attn.proj and mlp.fc2 weights divided by sqrt(2 * layer)
    (layer = 1..depth); last the mask token.
    """

    def cut_normal(t: torch.Tensor) -> None:
        trunc_normal_(t, std=0.02, a=-0.02, b=0.02)

    def init_module(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            cut_normal(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    backbone.apply(init_module)
    for head in heads:
        init_module(head)
    with torch.no_grad():
        for name in tokens:
            token = getattr(backbone, name, None)
            if isinstance(token, nn.Parameter) and token.requires_grad:
                cut_normal(token)
        for layer, block in enumerate(backbone.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
    cut_normal(mask_token)


# -- the masked-image view ------------------------------------------------------------------------


def masked_image_crop(data_cfg: Any, paper_scale_min: float, color_jitter: float = 0.0) -> T.Compose:
    """PIL image -> (3, S, S): [ColorJitter(c, c, c)] + RandomResizedCrop(scale_min-1, ratio 3/4-4/3) + flip +
    normalisation, BEiT's and SimMIM's view (microsoft/unilm beit2 datasets.py DataAugmentationForBEiT, which
    always jitters by 0.4 first; microsoft/SimMIM data_simmim.py, no jitter). `data.crop_scale_min` None: the
    paper's `paper_scale_min`; `data.image_size`, `.interpolation`, `.hflip`, `.mean`, `.std` apply."""
    scale_min = paper_scale_min if data_cfg.crop_scale_min is None else data_cfg.crop_scale_min
    jitter = [T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []
    return T.Compose([
        *jitter,
        T.RandomResizedCrop(data_cfg.image_size, scale=(scale_min, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=T.InterpolationMode(data_cfg.interpolation)),
        T.RandomHorizontalFlip(data_cfg.hflip),
        T.ToTensor(),
        T.Normalize(list(data_cfg.mean), list(data_cfg.std)),
    ])
