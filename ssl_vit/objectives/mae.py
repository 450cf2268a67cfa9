"""Masked autoencoder pretraining (He et al. 2021): encode the visible patches, reconstruct the masked ones.

The encoder is the shared backbone (`backbone.forward_features(x, ids_keep)` runs the visible tokens
only); the light decoder, mask token and pixel head live here and are dropped after pretraining.
Module names follow facebookresearch/mae (`decoder_embed`, `decoder_blocks`, ...) so their checkpoints
load with `ssl_vit.interop.mae_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Sequence

from ssl_vit.accepts import at_least, between, setting

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from ssl_vit.models import block_queries, sincos_pos_embed_2d
from ssl_vit.ops.linear import use_onednn_linears
from ssl_vit.objectives import register_objective
from ssl_vit.objectives.masking import gather_tokens, num_visible, patchify, random_masking
from ssl_vit.viz.mae import reconstruction_grid

__all__ = ["MAE", "MAEConfig"]


@dataclass
class MAEConfig:
    """`mae.*`: He et al. 2021 defaults (PROTOCOLS.md); small-image configs shrink the decoder."""

    mask_ratio: float = setting(0.75, between(0, 1, open=True), 'the fraction of patches masked')
    decoder_dim: int = setting(512, at_least(4), 'decoder width (a multiple of 4 and of decoder_heads)')
    decoder_depth: int = setting(8, at_least(1), 'decoder blocks')
    decoder_heads: int = setting(16, at_least(1))
    norm_pix_loss: bool = True


@register_objective("mae")
class MAE(nn.Module):
    """MAE objective around a ViT backbone.

    Args:
        backbone: the shared `ssl_vit.models.ViT` (usually `pos_embed="sincos"`, `num_classes=0`).
        mask_ratio: fraction of patches masked per sample, strictly between 0 and 1.
        decoder_dim / decoder_depth / decoder_heads: the decoder's width, blocks and heads (paper: 512/8/16).
        norm_pix_loss: regress per-patch normalised pixels (mean 0, std 1 per patch), as the paper's results.
    The backbone is initialised as facebookresearch/mae does (a run from `model.checkpoint` loads its
    weights afterwards). Batch: `pixel_values` (B, 3, H, W); optional `noise` (B, N): same noise, same mask.
    """

    needs_labels: ClassVar[bool] = False
    transform: ClassVar[str] = "mae"  # RandomResizedCrop(0.2-1) + flip
    config_groups: ClassVar[dict[str, type]] = {"mae": MAEConfig}
    # Unless model.pos_embed says otherwise: MAE's encoder uses fixed 2-D sin-cos positions.
    backbone_defaults: ClassVar[dict[str, object]] = {"pos_embed": "sincos"}
    norm_pix_eps: ClassVar[float] = 1e-6  # MAE's and HF's epsilon under the per-patch std

    def __init__(
        self,
        backbone: nn.Module,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        *,
        decoder_mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(
                f"mae.mask_ratio must be strictly between 0 and 1, got {mask_ratio}: "
                f"use e.g. 0.75 (the paper's value)."
            )
        if decoder_dim % decoder_heads:
            raise ValueError(
                f"mae.decoder_dim ({decoder_dim}) must be divisible by mae.decoder_heads ({decoder_heads})."
            )
        if decoder_dim % 4:
            raise ValueError(f"mae.decoder_dim must be divisible by 4 for sin-cos positions, got {decoder_dim}.")
        self.backbone = backbone
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.patch_size: int = backbone.patch_embed.patch_size[0]
        self.grid_size: tuple[int, int] = tuple(backbone.patch_embed.grid_size)
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens: int = backbone.num_prefix_tokens
        self.num_keep: int = num_visible(self.num_patches, self.mask_ratio)
        embed_dim = backbone.embed_dim
        in_chans = backbone.patch_embed.proj.in_channels

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed, so a buffer: it never reaches the optimizer, yet is saved (official checkpoints carry it).
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, self.grid_size, self.num_prefix_tokens)
        )  # (1, P + N, Dd)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_dim, decoder_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        for block in self.decoder_blocks:
            block.attn.fused_attn = True  # F.scaled_dot_product_attention, like the backbone
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * in_chans)
        self._init_weights()
        # The decoder's linear layers take the backbone's oneDNN path too (fp32 CPU only; same weights,
        # same keys): 1.2x faster MAE step on AMD CPUs, where MKL's sgemm is slow (tools/benchmark.py).
        use_onednn_linears(self)

    # -- initialisation ------------------------------------------------------------------------

    def _init_weights(self) -> None:
        """facebookresearch/mae's init: xavier-uniform linears (and flattened patch_embed), N(0, 0.02) tokens."""

        def init_module(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        decoder = [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]
        for part in decoder + [self.backbone]:
            part.apply(init_module)
        nn.init.normal_(self.mask_token, std=0.02)
        bb = self.backbone
        w = bb.patch_embed.proj.weight
        with torch.no_grad():  # a conv that acts as a linear layer on flattened patches
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for name in ("cls_token", "dist_token"):
            token = getattr(bb, name, None)
            if isinstance(token, nn.Parameter):
                nn.init.normal_(token, std=0.02)

    # -- the model -----------------------------------------------------------------------------

    def make_noise(
        self, batch_size: int, device: torch.device | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform masking noise: (B, N)."""
        return torch.rand(batch_size, self.num_patches, device=device, generator=generator)

    def _noise(self, images: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The batch's masking noise on the images' device: fresh uniform noise when None, else checked (B, N)."""
        b = images.shape[0]
        if noise is None:
            return self.make_noise(b, images.device)
        if noise.shape != (b, self.num_patches):
            raise ValueError(
                f"batch['noise'] must have shape (batch, num_patches) = ({b}, {self.num_patches}), "
                f"got {tuple(noise.shape)}."
            )
        return noise.to(images.device)

    def encode(
        self, images: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask and encode the visible patches.

        Args: images (B, 3, H, W); noise (B, N) or None (fresh uniform noise).
        Returns: latent (B, P + K, D) after the backbone's final norm, ids_restore (B, N), mask (B, N) 1=masked.
        """
        ids_keep, ids_restore, mask = random_masking(self._noise(images, noise), self.num_keep)
        latent = self.backbone.forward_features(images, ids_keep)  # (B, P + K, D)
        return latent, ids_restore, mask

    def _decoder_tokens(self, latent: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
        """The decoder's input in shuffled order [prefix, visible, masked]: latent (B, P + K, D) -> (B, P + N, Dd).

        Each token carries its own patch's position embedding, so the blocks (which see positions only
        through them) give every patch the prediction they would give it in patch order.
        """
        p = self.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, P + K, Dd)
        b, k = x.shape[0], x.shape[1] - p
        pos = self.decoder_pos_embed  # (1, P + N, Dd)
        mask_tokens = self.mask_token.to(x.dtype).expand(b, self.num_patches - k, -1)  # (B, N - K, Dd)
        patches = torch.cat([x[:, p:], mask_tokens], dim=1)  # (B, N, Dd), shuffled order
        patches = patches + gather_tokens(pos[:, p:].expand(b, -1, -1), ids_shuffle)  # each its position
        return torch.cat([x[:, :p] + pos[:, :p], patches], dim=1)  # (B, P + N, Dd)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch's pixels: latent (B, P + K, D), ids_restore (B, N) -> (B, N, p*p*3), patch order."""
        ids_shuffle = torch.argsort(ids_restore, dim=1)  # (B, N): the inverse permutation
        x = self.decoder_norm(self.decoder_blocks(self._decoder_tokens(latent, ids_shuffle)))
        pred = self.decoder_pred(x)[:, self.num_prefix_tokens :]  # (B, N, p*p*3), shuffled order
        return gather_tokens(pred, ids_restore)  # prefix tokens predict nothing

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder regresses: (B, 3, H, W) -> (B, N, p*p*3), per-patch normalised if norm_pix_loss."""
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE and HF
            target = (target - mean) / (var + self.norm_pix_eps) ** 0.5
        return target

    def decode_masked(self, latent: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
        """Predict the masked patches only: latent (B, P + K, D), ids_shuffle (B, N) -> (B, N - K, p*p*3).

        `decode`'s predictions of the masked patches, in shuffled order: the last decoder block, the norm and
        the pixel head run for the masked tokens alone.
        """
        x = self._decoder_tokens(latent, ids_shuffle)  # (B, P + N, Dd)
        x = self.decoder_blocks[:-1](x)
        x = block_queries(self.decoder_blocks[-1], x, slice(latent.shape[1], None))  # (B, N - K, Dd): the masked
        return self.decoder_pred(self.decoder_norm(x))  # (B, N - K, p*p*3)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss = MSE on the masked patches (the mean over their pixels, then over the masked patches).

        The decoder predicts the masked patches only (`decode_masked`): MAE's and Hugging Face's loss, with
        the visible patches' predictions, which the loss ignores, not computed.
        """
        images = batch["pixel_values"]  # (B, 3, H, W)
        ids_shuffle = torch.argsort(self._noise(images, batch.get("noise")), dim=1)  # (B, N): random_masking's order
        ids_keep, ids_masked = ids_shuffle[:, : self.num_keep], ids_shuffle[:, self.num_keep :]
        latent = self.backbone.forward_features(images, ids_keep)  # (B, P + K, D)
        pred = self.decode_masked(latent, ids_shuffle).float()  # (B, N - K, p*p*3); fp32 loss under autocast
        target = gather_tokens(self.target(images), ids_masked)  # (B, N - K, p*p*3)
        loss = (pred - target).pow(2).mean()
        mask_ratio = torch.full((), (self.num_patches - self.num_keep) / self.num_patches, device=images.device)
        return {"loss": loss, "mask_ratio": mask_ratio}

    # -- pictures ------------------------------------------------------------------------------

    def visualize(self, batch: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float]) -> dict[str, torch.Tensor]:
        """The reconstruction grid (`ssl_vit.viz.mae`) of the batch, masks from `batch['noise']` or a fixed seed."""
        grid = reconstruction_grid(self, batch["pixel_values"], mean, std, noise=batch.get("noise"))
        return {"mae_reconstruction": grid}
