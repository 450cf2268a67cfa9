"""The one ViT backbone every objective trains: timm's VisionTransformer plus what pretraining needs.

Additions over timm, all key-compatible with timm's state dicts:
- `forward_features(x, ids_keep)`: only the kept patch tokens (plus class / distillation tokens) go
  through the blocks, which is how MAE encodes the visible patches alone;
- `forward_features(x, mask=mask, mask_token=token)`: the embeddings of masked patches are replaced by
  a token the caller owns (SimMIM, BEiT) before position embeddings are added; the backbone gains no
  parameter, so its keys stay timm's;
- an optional distillation token and head (DeiT), the same layout as timm's VisionTransformerDistilled;
- fixed 2-D sin-cos position embeddings (MAE) as an alternative to learned ones;
- `dynamic_img_size=True` as in timm: inputs of any size divisible by the patch size (DINO's local
  crops), position embeddings resampled to each input's patch grid;
- its linear layers take oneDNN's CPU path where that measures faster (`ssl_vit.ops.linear`);
- `block_queries(block, x, queries)`: a timm Block's output for some tokens only: the classifier reads
  the class (and distillation) token of the last block, MAE's decoder its masked tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer

from ssl_vit.ops.linear import use_onednn_linears

__all__ = [
    "ViT",
    "WeightsMismatchError",
    "adapt_state_dict",
    "block_queries",
    "dino_interpolate_pos_embed",
    "load_weights",
    "sincos_pos_embed_2d",
]


class WeightsMismatchError(ValueError):
    """A checkpoint that does not fit the backbone: the message lists the keys that differ."""


def sincos_pos_embed_2d(embed_dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE), zeros for prefix tokens: (1, prefix + H*W, D)."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need embed_dim divisible by 4, got {embed_dim}")
    gh, gw = grid_size
    # Half of the channels encode the row, half the column (as MAE's get_2d_sincos_pos_embed).
    grid_w, grid_h = torch.meshgrid(
        torch.arange(gw, dtype=torch.float64), torch.arange(gh, dtype=torch.float64), indexing="xy"
    )

    def one_axis(pos: torch.Tensor, dim: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (H*W, dim/2)
        return torch.cat([out.sin(), out.cos()], dim=1)

    # MAE builds the grid as meshgrid(w, h) and encodes grid[0] (w) first.
    emb = torch.cat([one_axis(grid_w, embed_dim // 2), one_axis(grid_h, embed_dim // 2)], dim=1)
    emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


def dino_interpolate_pos_embed(
    pos_embed: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """facebookresearch/dino's `interpolate_pos_encoding`: (1, P + H*W, D) -> (1, P + h*w, D).

    Bicubic without antialiasing, at scale factor (new + 0.1) / old per axis (the 0.1 keeps the output
    size exact despite rounding); prefix entries kept; unchanged on the native grid.
    """
    if tuple(new_size) == tuple(old_size):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    (h, w), (gh, gw), d = new_size, old_size, pos_embed.shape[-1]
    grid = patches.reshape(1, gh, gw, d).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = nn.functional.interpolate(grid, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic")
    patches = grid.permute(0, 2, 3, 1).reshape(1, h * w, d)  # (1, h*w, D)
    return torch.cat([prefix, patches], dim=1)


def block_queries(block: Block, x: torch.Tensor, queries: slice) -> torch.Tensor:
    """`block(x)[:, queries]` for a timm `Block`, computing only what those tokens need.

    Every token's keys and values still enter the attention; the queries, the output projection, the
    residuals and the MLP run for tokens `x[:, queries]` only. (B, N, C) -> (B, M, C). A block that must
    be called as a module takes the plain forward and slices: one with forward hooks (FSDP2's `fully_shard`
    gathers its weights in them; a user's feature hooks) or of another class (a gated attention).
    """
    attn = block.attn
    hooked = bool(block._forward_pre_hooks or block._forward_hooks)
    if hooked or type(block) is not Block or getattr(attn, "gate", None) is not None:
        return block(x)[:, queries]
    b, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, hd) each
    q, k = attn.q_norm(q[:, :, queries]), attn.k_norm(k)  # queries (B, H, M, hd)
    drop = attn.attn_drop.p if block.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (B, H, M, hd)
    out = out.transpose(1, 2).flatten(2)  # (B, M, H * hd)
    if getattr(attn, "norm", None) is not None:  # newer timm's optional norm before the projection
        out = attn.norm(out)
    out = attn.proj_drop(attn.proj(out))
    x = x[:, queries] + block.drop_path1(block.ls1(out))  # (B, M, C)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class ViT(VisionTransformer):
    """timm's VisionTransformer with MAE's visible-token encoding and DeiT's distillation token.

    Args beyond timm's: `distilled` adds `dist_token` and `head_dist` (timm's
    `deit_*_distilled_*` layout); `pos_embed="sincos"` stores fixed sin-cos values in the usual
    `pos_embed` parameter with `requires_grad=False`.

    `dynamic_img_size=True` (timm's argument, same numbers as timm's model with it): an input whose
    patch grid differs from `img_size`'s gets `pos_embed` resampled to its grid (class / distillation
    token entries kept). `pos_embed_resample` says how: "timm" (the default: timm's
    `resample_abs_pos_embed`, bicubic with antialiasing) or "dino" (facebookresearch/dino's
    `interpolate_pos_encoding`: bicubic without antialiasing at scale (new + 0.1) / old; the DINO
    objective sets it). A plain attribute, not a weight. Sin-cos embeddings are resampled
    too, not recomputed for the new grid: the weights then give timm's features, and a smaller crop
    keeps spanning the same range of positions as the full image. `ids_keep` indexes the input's own
    patch grid (row-major, h * w patches).
    """

    def __init__(self, *, distilled: bool = False, pos_embed: str = "learn", **kwargs: Any) -> None:
        if kwargs.get("reg_tokens", 0):
            raise ValueError("ssl_vit's backbone does not support register tokens (reg_tokens).")
        if pos_embed not in ("learn", "sincos"):
            raise ValueError(f"pos_embed must be 'learn' or 'sincos', got {pos_embed!r}")
        if distilled and kwargs.get("global_pool", "token") != "token":
            raise ValueError("a distilled backbone reads the class and distillation tokens: use global_pool='token'.")
        weight_init = kwargs.pop("weight_init", "")
        super().__init__(pos_embed="learn", weight_init="skip" if distilled else weight_init, **kwargs)
        self.distilled = distilled
        self.pos_embed_type = pos_embed
        if distilled:
            self.num_prefix_tokens = 2
            self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            self.pos_embed = nn.Parameter(
                torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, self.embed_dim)
            )
            self.head_dist = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
            trunc_normal_(self.dist_token, std=0.02)
            self.weight_init_mode = weight_init  # timm's deit initialises after adding the token
            if weight_init != "skip":
                self.init_weights(needs_reset=False)
        if pos_embed == "sincos":
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed_2d(self.embed_dim, self.patch_embed.grid_size, prefix))
            self.pos_embed.requires_grad_(False)
        for block in self.blocks:  # always the fused kernel (F.scaled_dot_product_attention)
            block.attn.fused_attn = True
        use_onednn_linears(self)
        self.spec: dict[str, Any] = {}  # name + overrides, filled by create_backbone
        self.pos_embed_resample = "timm"  # or "dino": how dynamic_img_size resamples pos_embed

    # -- description ---------------------------------------------------------------------------

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def timm_spec(self) -> tuple[str, dict[str, Any]]:
        """(timm model name, kwargs) that build timm's own class with this architecture."""
        from ssl_vit.models.registry import timm_spec_for

        return timm_spec_for(self.spec)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if self.distilled:
            self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        use_onednn_linears(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    # -- forward -------------------------------------------------------------------------------

    def _embed(
        self,
        x: torch.Tensor,
        ids_keep: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patch tokens (masked ones replaced) + positions, kept patches only, prefix tokens in front: (B, P + K, D)."""
        x = self.patch_embed(x)  # (B, N, D); (B, h, w, D) with dynamic_img_size
        pos_embed = self.pos_embed  # (1, [P +] N, D)
        if self.dynamic_img_size:
            b, h, w, d = x.shape
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            grid = self.patch_embed.grid_size
            if self.pos_embed_resample == "dino":
                pos_embed = dino_interpolate_pos_embed(pos_embed, (h, w), grid, prefix)
            else:  # timm's call: a no-op on the native grid
                pos_embed = resample_abs_pos_embed(pos_embed, new_size=(h, w), old_size=grid, num_prefix_tokens=prefix)
            x = x.view(b, h * w, d)
        if mask is not None:  # None-ness only: no data-dependent branch (torch.compile, FSDP)
            # SimMIM's VisionTransformerForSimMIM: x * (1 - w) + mask_token * w, before the positions;
            # `where` gives the same values and gradients, and exactly x where nothing is masked.
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)  # (B, N, D)
        prefix_pos = None
        if self.no_embed_class:
            x = x + pos_embed
        else:
            prefix_pos = pos_embed[:, : self.num_prefix_tokens]
            x = x + pos_embed[:, self.num_prefix_tokens :]
        if ids_keep is not None:  # gather once: (B, K, D)
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        prefix = [self.cls_token] if self.cls_token is not None else []
        if self.distilled:
            prefix.append(self.dist_token)
        if prefix:
            tokens = torch.cat(prefix, dim=1)  # (1, P, D)
            if prefix_pos is not None:
                tokens = tokens + prefix_pos
            x = torch.cat([tokens.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x)

    def forward_features(
        self,
        x: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens after the final norm: (B, P + N, D), or (B, P + K, D) for `ids_keep` of shape (B, K).

        `ids_keep` holds indices into the input's patch grid (N = h * w of this input's size).
        `mask` (B, N) bool, True = masked, with `mask_token` (1, 1, D): each masked patch's embedding
        (after patch_embed, before the position embedding) becomes the token, as SimMIM's and BEiT's
        encoders; every token still goes through the blocks. The token belongs to the caller (the
        objective), so the backbone's state dict stays timm's. An all-False mask gives the plain forward.
        """
        if (mask is None) != (mask_token is None):
            raise ValueError("forward_features needs both `mask` and `mask_token`, or neither.")
        if mask is not None:
            ph, pw = self.patch_embed.patch_size
            grid = (x.shape[-2] // ph) * (x.shape[-1] // pw)
            if mask.shape != (x.shape[0], grid) or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a bool tensor of shape (batch, patches) = ({x.shape[0]}, {grid}), got "
                    f"{mask.dtype} {tuple(mask.shape)}."
                )
            if mask_token.shape != (1, 1, self.embed_dim):
                raise ValueError(f"mask_token must have shape (1, 1, {self.embed_dim}), got {tuple(mask_token.shape)}.")
        x = self.norm_pre(self.patch_drop(self._embed(x, ids_keep, mask, mask_token)))
        return self.norm(self._run_blocks(self.blocks, x))

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The prefix tokens' features after the final norm: (B, 3, H, W) -> (B, P, D).

        `forward_features(x)[:, :P]`, with the last block computing queries, projection and MLP for the P
        class / distillation tokens only (`block_queries`): what a token-pooled classifier reads.
        """
        x = self.norm_pre(self.patch_drop(self._embed(x, None)))
        last = partial(block_queries, self.blocks[-1], queries=slice(0, self.num_prefix_tokens))
        return self.norm(self._run_blocks([*self.blocks[:-1], last], x))

    def _run_blocks(self, blocks: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
        """The blocks in turn; one checkpointed segment each under grad checkpointing (timm's `checkpoint_seq`)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x)
        for block in blocks:
            x = block(x)
        return x

    def forward_distill_heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class-head logits, distillation-head logits) of a distilled backbone."""
        if not self.distilled:
            raise RuntimeError("forward_distill_heads needs a backbone built with a distillation token.")
        cls_tok = self.head_drop(feats[:, 0])
        dist_tok = self.head_drop(feats[:, 1])
        return self.head(cls_tok), self.head_dist(dist_tok)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.distilled:
            return super().forward_head(feats, pre_logits=pre_logits)
        # As timm's deit: inference averages the two heads (and the two tokens for features).
        if pre_logits:
            return (self.head_drop(feats[:, 0]) + self.head_drop(feats[:, 1])) / 2
        logits, logits_dist = self.forward_distill_heads(feats)
        return (logits + logits_dist) / 2

    def _head_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """What `forward_head` reads: the prefix tokens alone for class-token pooling, else every token."""
        if self.global_pool == "token" and getattr(self, "attn_pool", None) is None and self.num_prefix_tokens:
            return self.forward_prefix(x)
        return self.forward_features(x)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """timm's `forward_head(forward_features(x), pre_logits=True)`: the pooled features (B, D)."""
        return self.forward_head(self._head_tokens(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C); a class-token classifier computes the last block for the prefix tokens only."""
        return self.forward_head(self._head_tokens(x))


# ---------------------------------------------------------------------------------------------------
# Loading weights


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: ViT) -> dict[str, torch.Tensor]:
    """Resize `pos_embed` (bicubic over the patch grid, prefix tokens kept) to the model's grid."""
    state_dict = dict(state_dict)
    pos = state_dict.get("pos_embed")
    if pos is None or pos.shape == model.pos_embed.shape:
        return state_dict
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    old_tokens = pos.shape[1] - prefix
    side = int(math.isqrt(old_tokens))
    if side * side != old_tokens:
        raise WeightsMismatchError(
            f"checkpoint pos_embed has {pos.shape[1]} tokens, which is not {prefix} prefix tokens plus a "
            f"square grid: was it saved by a backbone with another number of prefix tokens?"
        )
    state_dict["pos_embed"] = resample_abs_pos_embed(
        pos.float(),
        new_size=list(model.patch_embed.grid_size),
        old_size=[side, side],
        num_prefix_tokens=prefix,
        interpolation="bicubic",
        antialias=True,
    ).to(pos.dtype)
    return state_dict


def load_weights(
    model: ViT, state_dict: dict[str, torch.Tensor], *, strict: bool = True, skip_head: bool = False
) -> ViT:
    """Load timm-keyed weights, resizing position embeddings; a mismatch lists the keys that differ."""
    state_dict = adapt_state_dict(state_dict, model)
    own = model.state_dict()
    if skip_head:
        head_keys = {k for k in list(own) + list(state_dict) if k.startswith(("head.", "head_dist."))}
        state_dict = {k: v for k, v in state_dict.items() if k not in head_keys}
        own = {k: v for k, v in own.items() if k not in head_keys}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if state_dict[k].shape != own[k].shape
    )
    if wrong_shape or (strict and (missing or unexpected)):

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f" ... (+{len(keys) - 12})" if len(keys) > 12 else "") or "none"

        raise WeightsMismatchError(
            f"checkpoint does not fit backbone '{model.spec.get('name', type(model).__name__)}': "
            f"missing keys: {show(missing)}; unexpected keys: {show(unexpected)}; "
            f"wrong shapes: {show(wrong_shape)}. Build the backbone the checkpoint was trained with "
            f"(model.name and model.args), or convert the checkpoint with tools/convert.py."
        )
    model.load_state_dict(state_dict, strict=not skip_head and strict)
    return model
