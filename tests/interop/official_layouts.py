"""Key names and shapes of published ViT checkpoints, written from the code that saves them (not from ours).

Each function returns `{key: shape}` for one published layout, for any size of the same architecture
(ViT-B/16 by default; tests also build reduced ones with the same naming pattern). Sources read:

- facebookresearch/mae `models_mae.py` and `models_vit.py` at be47fef7a727943547afb0c670cf1b26034c3c89
  (MAE's README pins timm==0.3.2, whose `PatchEmbed.proj`, `Block.{norm1, attn.qkv, attn.proj, norm2,
  mlp.fc1, mlp.fc2}` and `VisionTransformer.{cls_token, pos_embed, norm, head}` both files build on).
  `main_pretrain.py` / `main_finetune.py` save `{"model": model.state_dict(), "optimizer", "epoch",
  "scaler", "args"}` (util/misc.py `save_model`). The released `mae_pretrain_vit_base.pth` holds the
  encoder alone; `..._full.pth` and `mae_visualize_vit_base.pth` the whole model (facebookresearch/mae
  issues #3, #8). The same names appear in transformers' `convert_vit_mae_to_pytorch.py`
  (15ea02a2add1672acbeee158a9448720d6093de1), which maps the released files to Hugging Face's.
- facebookresearch/deit `models.py` at 085308b928d862b2fd3306d4ac28125e0b27d939
  (`DistilledVisionTransformer`: timm's VisionTransformer + `dist_token`, `head_dist`, a 2-prefix `pos_embed`).
- huggingface/transformers `models/vit_mae/modeling_vit_mae.py` at 015e68769f9823df27f5f7372dc155277e6ff7e6
  and its "Copied from" source `models/vit/modeling_vit.py` (`ViTForImageClassification` = `ViTModel(
  add_pooling_layer=False)` + `classifier`): the names of transformers 4, which the Hub's files keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

Shape = tuple[int, ...]
Layout = dict[str, Shape]

__all__ = [
    "DEIT_TINY_16",
    "VIT_BASE_16",
    "OfficialMAE",
    "ViTDims",
    "deit_distilled",
    "hf_vit_for_image_classification",
    "hf_vitmae_for_pretraining",
    "mae_finetuned",
    "mae_pretrain",
    "mae_pretrain_encoder",
    "official_sincos",
    "random_tensors",
]


@dataclass(frozen=True)
class ViTDims:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    in_chans: int = 3
    mlp_ratio: int = 4

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


VIT_BASE_16 = ViTDims(embed_dim=768, depth=12, num_heads=12, patch_size=16, img_size=224)  # mae_vit_base_patch16
DEIT_TINY_16 = ViTDims(embed_dim=192, depth=12, num_heads=3, patch_size=16, img_size=224)  # deit_tiny_distilled
MAE_DECODER_512_8 = (512, 8, 16)  # mae_vit_base_patch16_dec512d8b: decoder_embed_dim, decoder_depth, heads


def _linear(name: str, out_features: int, in_features: int) -> Layout:
    return {f"{name}.weight": (out_features, in_features), f"{name}.bias": (out_features,)}


def _layer_norm(name: str, dim: int) -> Layout:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


# -- facebookresearch/mae and /deit: timm 0.3.2 modules ---------------------------------------------


def _timm_block(prefix: str, dim: int, mlp_ratio: int) -> Layout:
    """timm 0.3.2 `Block(dim, heads, mlp_ratio, qkv_bias=True)`: one fused qkv Linear, rows q, k, v."""
    hidden = dim * mlp_ratio
    return {
        **_layer_norm(f"{prefix}.norm1", dim),
        **_linear(f"{prefix}.attn.qkv", 3 * dim, dim),
        **_linear(f"{prefix}.attn.proj", dim, dim),
        **_layer_norm(f"{prefix}.norm2", dim),
        **_linear(f"{prefix}.mlp.fc1", hidden, dim),
        **_linear(f"{prefix}.mlp.fc2", dim, hidden),
    }


def _timm_patch_embed(d: ViTDims) -> Layout:
    """timm 0.3.2 `PatchEmbed`: a Conv2d with kernel and stride = patch size."""
    return {
        "patch_embed.proj.weight": (d.embed_dim, d.in_chans, d.patch_size, d.patch_size),
        "patch_embed.proj.bias": (d.embed_dim,),
    }


def _timm_blocks(prefix: str, d: ViTDims, dim: int | None = None, depth: int | None = None) -> Layout:
    out: Layout = {}
    for i in range(d.depth if depth is None else depth):
        out |= _timm_block(f"{prefix}.{i}", d.embed_dim if dim is None else dim, d.mlp_ratio)
    return out


def mae_pretrain(d: ViTDims = VIT_BASE_16, decoder: tuple[int, int, int] = MAE_DECODER_512_8) -> Layout:
    """`MaskedAutoencoderViT.state_dict()` (models_mae.py): what main_pretrain.py saves under "model".

    nn.Module.state_dict order: the module's own parameters in definition order, then its children.
    """
    dd, decoder_depth, _ = decoder
    n, dim = d.num_patches, d.embed_dim
    return {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, n + 1, dim),  # fixed sin-cos, a parameter with requires_grad=False: saved
        "mask_token": (1, 1, dd),
        "decoder_pos_embed": (1, n + 1, dd),
        **_timm_patch_embed(d),
        **_timm_blocks("blocks", d),
        **_layer_norm("norm", dim),
        **_linear("decoder_embed", dd, dim),
        **_timm_blocks("decoder_blocks", d, dim=dd, depth=decoder_depth),
        **_layer_norm("decoder_norm", dd),
        **_linear("decoder_pred", d.patch_size**2 * d.in_chans, dd),
    }


def mae_pretrain_encoder(d: ViTDims = VIT_BASE_16) -> Layout:
    """The released `mae_pretrain_vit_base.pth`: the encoder part of `mae_pretrain` (no decoder, no head)."""
    return {k: v for k, v in mae_pretrain(d).items() if not k.startswith(("decoder_", "mask_token"))}


def mae_finetuned(d: ViTDims = VIT_BASE_16, num_classes: int = 1000) -> Layout:
    """models_vit.py `vit_base_patch16(global_pool=True)` as fine-tuned: `norm` deleted, `fc_norm` added last."""
    dim = d.embed_dim
    return {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, d.num_patches + 1, dim),
        **_timm_patch_embed(d),
        **_timm_blocks("blocks", d),
        **_linear("head", num_classes, dim),
        **_layer_norm("fc_norm", dim),
    }


def deit_distilled(d: ViTDims = DEIT_TINY_16, num_classes: int = 1000) -> Layout:
    """deit `DistilledVisionTransformer` (deit_tiny_distilled_patch16_224): class + distillation token, two heads."""
    dim = d.embed_dim
    return {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, d.num_patches + 2, dim),  # re-created by the subclass for two prefix tokens
        "dist_token": (1, 1, dim),
        **_timm_patch_embed(d),
        **_timm_blocks("blocks", d),
        **_layer_norm("norm", dim),
        **_linear("head", num_classes, dim),
        **_linear("head_dist", num_classes, dim),
    }


# -- Hugging Face (transformers 4 names, as on the Hub) ---------------------------------------------


def _hf_layer(prefix: str, dim: int, intermediate: int) -> Layout:
    """`ViTLayer` / `ViTMAELayer`: separate query/key/value Linears under `attention.attention`."""
    return {
        **_linear(f"{prefix}.attention.attention.query", dim, dim),
        **_linear(f"{prefix}.attention.attention.key", dim, dim),
        **_linear(f"{prefix}.attention.attention.value", dim, dim),
        **_linear(f"{prefix}.attention.output.dense", dim, dim),
        **_linear(f"{prefix}.intermediate.dense", intermediate, dim),
        **_linear(f"{prefix}.output.dense", dim, intermediate),
        **_layer_norm(f"{prefix}.layernorm_before", dim),
        **_layer_norm(f"{prefix}.layernorm_after", dim),
    }


def _hf_encoder(prefix: str, d: ViTDims) -> Layout:
    dim = d.embed_dim
    out: Layout = {
        f"{prefix}embeddings.cls_token": (1, 1, dim),
        f"{prefix}embeddings.position_embeddings": (1, d.num_patches + 1, dim),
        f"{prefix}embeddings.patch_embeddings.projection.weight": (dim, d.in_chans, d.patch_size, d.patch_size),
        f"{prefix}embeddings.patch_embeddings.projection.bias": (dim,),
    }
    for i in range(d.depth):
        out |= _hf_layer(f"{prefix}encoder.layer.{i}", dim, dim * d.mlp_ratio)
    return out | _layer_norm(f"{prefix}layernorm", dim)


def hf_vit_for_image_classification(d: ViTDims = VIT_BASE_16, num_labels: int = 1000) -> Layout:
    """`ViTForImageClassification` (e.g. google/vit-base-patch16-224): no pooler, `classifier` on the class token."""
    return _hf_encoder("vit.", d) | _linear("classifier", num_labels, d.embed_dim)


def hf_vitmae_for_pretraining(
    d: ViTDims = VIT_BASE_16, decoder: tuple[int, int, int] = MAE_DECODER_512_8, decoder_intermediate: int = 2048
) -> Layout:
    """`ViTMAEForPreTraining` (e.g. facebook/vit-mae-base): `vit.*` encoder + `decoder.*` (ViTMAEDecoder)."""
    dd, decoder_depth, _ = decoder
    out = _hf_encoder("vit.", d) | {
        "decoder.mask_token": (1, 1, dd),
        "decoder.decoder_pos_embed": (1, d.num_patches + 1, dd),
        **_linear("decoder.decoder_embed", dd, d.embed_dim),
    }
    for i in range(decoder_depth):
        out |= _hf_layer(f"decoder.decoder_layers.{i}", dd, decoder_intermediate)
    out |= _layer_norm("decoder.decoder_norm", dd)
    return out | _linear("decoder.decoder_pred", d.patch_size**2 * d.in_chans, dd)


def official_sincos(dim: int, grid: int) -> torch.Tensor:
    """models_mae.py's fixed `pos_embed` / `decoder_pos_embed`, (1, 1 + grid * grid, dim).

    util/pos_embed.py `get_2d_sincos_pos_embed(dim, grid, cls_token=True)`: a zero row for the class
    token; the first half encodes `grid[0]` of `np.meshgrid(grid_w, grid_h)`, the column index.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    axis = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:  # (G*G,) -> (G*G, D/2): [sin | cos]
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    table = torch.cat([one_axis(cols), one_axis(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()[None]


# -- filling a layout --------------------------------------------------------------------------------


def random_tensors(layout: Layout, seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct random values for every key (zeros or ones would hide a swapped key); norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        is_norm_scale = key.endswith(".weight") and ("norm" in key.split(".")[-2] or "layernorm" in key)
        out[key] = torch.randn(shape, generator=g) * 0.2 + float(is_norm_scale)
    return out


# -- facebookresearch/mae's pretraining forward, transcribed -----------------------------------------


class OfficialMAE(nn.Module):
    """`MaskedAutoencoderViT` of models_mae.py, re-expressed on today's timm `PatchEmbed`/`Block` (same names).

    Only what the loss needs; `forward(imgs, noise)` takes the masking noise the original draws inside
    `random_masking` (ascending noise order: the first `int(L * (1 - mask_ratio))` patches are kept).
    """

    def __init__(self, d: ViTDims, decoder: tuple[int, int, int], norm_pix_loss: bool, mask_ratio: float = 0.75):
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        super().__init__()
        dd, decoder_depth, decoder_heads = decoder
        norm = partial(nn.LayerNorm, eps=1e-6)  # mae_vit_base_patch16_dec512d8b's norm_layer
        n = d.num_patches
        self.patch_embed = PatchEmbed(d.img_size, d.patch_size, d.in_chans, d.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(d.embed_dim, d.num_heads, d.mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(d.depth)
        )
        self.norm = norm(d.embed_dim)
        self.decoder_embed = nn.Linear(d.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, decoder_heads, d.mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(dd)
        self.decoder_pred = nn.Linear(dd, d.patch_size**2 * d.in_chans)
        self.p, self.mask_ratio, self.norm_pix_loss = d.patch_size, mask_ratio, norm_pix_loss

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # (B, L, D)
        B, L, D = x.shape
        keep = int(L * (1 - self.mask_ratio))
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        x = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        mask = torch.ones(B, L)
        mask[:, :keep] = 0
        mask = mask.gather(1, ids_restore)  # (B, L), 1 = removed
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(B, L - keep, -1)], dim=1)
        tokens = tokens.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, L, p*p*3)
        h = imgs.shape[2] // self.p  # patchify: (B, 3, h*p, w*p) -> (B, h*w, p*p*3), channels last
        target = imgs.reshape(B, 3, h, self.p, h, self.p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * h, -1)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()
