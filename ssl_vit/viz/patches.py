"""How a ViT reads an image: the patch sequence, and how its position embeddings relate the patches.

`patch_sequence` cuts an image into the tokens the model sees, in order; `position_similarity` is the
cosine similarity of every patch's position embedding to every other's, the picture of the ViT paper's
Figure 7 (Dosovitskiy et al. 2020) that shows learned embeddings recovering the 2-D grid.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["patch_sequence", "patch_position_embeddings", "position_similarity", "similarity_mosaic"]


def patch_sequence(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(3, H, W) -> (N, 3, P, P): the patches in token order (row by row, left to right), as patch_embed reads them."""
    c, h, w = image.shape
    p = patch_size
    patches = image.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)  # (Hp, Wp, 3, P, P)
    return patches.reshape(-1, c, p, p)


def patch_position_embeddings(backbone: nn.Module) -> torch.Tensor:
    """The position embeddings of the patch tokens only (class/distillation tokens' dropped): (Hp*Wp, D)."""
    pos = backbone.pos_embed.detach()[0]  # (prefix + N, D), or (N, D) when prefix tokens have none
    if not getattr(backbone, "no_embed_class", False):
        pos = pos[backbone.num_prefix_tokens :]
    return pos.float().cpu()


def position_similarity(backbone: nn.Module) -> torch.Tensor:
    """Cosine similarity between patch position embeddings: (Hp, Wp, Hp, Wp); [r, c] is patch (r, c)'s map."""
    pos = F.normalize(patch_position_embeddings(backbone), dim=-1)
    gh, gw = backbone.patch_embed.grid_size
    return (pos @ pos.T).reshape(gh, gw, gh, gw)


def similarity_mosaic(similarity: torch.Tensor, gap: int = 1) -> torch.Tensor:
    """(Hp, Wp, Hp, Wp) -> one 2-D array of Hp x Wp tiles separated by `gap` NaN pixels (drawn blank)."""
    gh, gw, th, tw = similarity.shape
    out = torch.full((gh * (th + gap) - gap, gw * (tw + gap) - gap), float("nan"))
    for r in range(gh):
        for c in range(gw):
            y, x = r * (th + gap), c * (tw + gap)
            out[y : y + th, x : x + tw] = similarity[r, c]
    return out
