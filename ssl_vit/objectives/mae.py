"""Masked autoencoder pretraining (He et al. 2021): encode the visible patches, reconstruct the masked ones.

The encoder is the shared backbone (`backbone.forward_features(x, ids_keep)` runs the visible tokens
only); the light decoder, mask token and pixel head live here and are dropped after pretraining.
Module names follow facebookresearch/mae (`decoder_embed`, `decoder_blocks`, ...) so their checkpoints
load with `ssl_vit.interop.mae_weights`.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from ssl_vit.models import sincos_pos_embed_2d
from ssl_vit.models.vit import use_onednn_linears
from ssl_vit.objectives import register_objective
from ssl_vit.objectives.masking import gather_tokens, num_visible, patchify, random_masking, unpatchify

__all__ = ["MAE", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORM_PIX_EPS = 1e-6  # MAE's and HF's epsilon under the per-patch std


@register_objective("mae")
class MAE(nn.Module):
    """MAE objective around a ViT backbone.

    Args:
        backbone: the shared `ssl_vit.models.ViT` (usually `pos_embed="sincos"`, `num_classes=0`).
        mask_ratio: fraction of patches masked per sample, strictly between 0 and 1.
        decoder_dim / decoder_depth / decoder_heads: the decoder's width, blocks and heads (paper: 512/8/16).
        norm_pix_loss: regress per-patch normalised pixels (mean 0, std 1 per patch), as the paper's results.
        mean / std: the data normalisation, used only to turn images back into [0, 1] in `visualize`.
        init_backbone: re-initialise the backbone as facebookresearch/mae does; pass False to keep weights
            already loaded into it (continued pretraining from a checkpoint).
    Batch: `pixel_values` (B, 3, H, W); optional `noise` (B, N): same noise, same mask.
    """

    needs_labels = False
    transform = "mae"
    config_group = "mae"

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
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        init_backbone: bool = True,
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
        self.register_buffer("image_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._init_weights(init_backbone)
        # The decoder's linear layers take the backbone's oneDNN path too (fp32 CPU only; same weights,
        # same keys): 1.2x faster MAE step on AMD CPUs, where MKL's sgemm is slow (tools/benchmark.py).
        use_onednn_linears(self)

    # -- initialisation ------------------------------------------------------------------------

    def _init_weights(self, init_backbone: bool) -> None:
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
        for part in decoder + ([self.backbone] if init_backbone else []):
            part.apply(init_module)
        nn.init.normal_(self.mask_token, std=0.02)
        if init_backbone:
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

    def _check_noise(self, noise: torch.Tensor, batch_size: int) -> torch.Tensor:
        if noise.shape != (batch_size, self.num_patches):
            raise ValueError(
                f"batch['noise'] must have shape (batch, num_patches) = ({batch_size}, {self.num_patches}), "
                f"got {tuple(noise.shape)}."
            )
        return noise

    def encode(
        self, images: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask and encode the visible patches.

        Args: images (B, 3, H, W); noise (B, N) or None (fresh uniform noise).
        Returns: latent (B, P + K, D) after the backbone's final norm, ids_restore (B, N), mask (B, N) 1=masked.
        """
        b = images.shape[0]
        noise = self.make_noise(b, images.device) if noise is None else self._check_noise(noise, b)
        ids_keep, ids_restore, mask = random_masking(noise.to(images.device), self.num_keep)
        latent = self.backbone.forward_features(images, ids_keep)  # (B, P + K, D)
        return latent, ids_restore, mask

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch's pixels: latent (B, P + K, D), ids_restore (B, N) -> (B, N, p*p*3)."""
        p = self.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, P + K, Dd)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n - (x.shape[1] - p), -1)  # (B, N - K, Dd)
        patches = torch.cat([x[:, p:], mask_tokens], dim=1)  # (B, N, Dd), shuffled order
        patches = gather_tokens(patches, ids_restore)  # (B, N, Dd), patch order
        x = torch.cat([x[:, :p], patches], dim=1) + self.decoder_pos_embed  # (B, P + N, Dd)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, p:]  # (B, N, p*p*3): prefix tokens predict nothing

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder regresses: (B, 3, H, W) -> (B, N, p*p*3), per-patch normalised if norm_pix_loss."""
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE and HF
            target = (target - mean) / (var + _NORM_PIX_EPS) ** 0.5
        return target

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss = MSE on masked patches; also the (detached) loss on visible patches and the mask ratio."""
        images = batch["pixel_values"]  # (B, 3, H, W)
        latent, ids_restore, mask = self.encode(images, batch.get("noise"))
        pred = self.decode(latent, ids_restore).float()  # (B, N, p*p*3); loss in fp32 under autocast
        per_patch = (pred - self.target(images)).pow(2).mean(dim=-1)  # (B, N)
        mask = mask.float()
        loss = (per_patch * mask).sum() / mask.sum()
        visible = 1.0 - mask
        loss_visible = (per_patch.detach() * visible).sum() / visible.sum().clamp_min(1.0)
        return {"loss": loss, "loss_visible": loss_visible, "mask_ratio": mask.mean().detach()}

    # -- reconstructions -----------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(
        self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed images and the pixel mask, in the input's (normalised) space.

        With norm_pix_loss the prediction is per-patch normalised; it is mapped back with each true
        patch's mean and std (what MAE's own demos do), so only the patch's structure is predicted.
        Returns: reconstruction (B, 3, H, W); mask (B, 1, H, W) with 1 on masked pixels.
        """
        latent, ids_restore, mask = self.encode(pixel_values, noise)
        pred = self.decode(latent, ids_restore).float()  # (B, N, p*p*3)
        if self.norm_pix_loss:
            patches = patchify(pixel_values.float(), self.patch_size)
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True)
            pred = pred * (var + _NORM_PIX_EPS) ** 0.5 + mean
        channels = pixel_values.shape[1]
        recon = unpatchify(pred, self.patch_size, self.grid_size, channels)  # (B, 3, H, W)
        pix_mask = mask.float().unsqueeze(-1).expand(-1, -1, self.patch_size**2)  # (B, N, p*p)
        pix_mask = unpatchify(pix_mask, self.patch_size, self.grid_size, 1)  # (B, 1, H, W)
        return recon, pix_mask

    @torch.no_grad()
    def visualize(
        self, batch: dict[str, torch.Tensor], max_images: int = 8, seed: int = 0, min_tile: int = 64
    ) -> dict[str, torch.Tensor]:
        """A grid, one row per image: original | masked | reconstruction | reconstruction + visible patches.

        Masks come from `batch['noise']` or a fixed seed, so grids logged at different epochs compare.
        Tiles smaller than `min_tile` pixels are enlarged by an integer factor (nearest), so 32x32
        images stay legible in TensorBoard.
        Returns {"mae_reconstruction": (3, H', W') in [0, 1]}.
        """
        from torchvision.utils import make_grid

        images = batch["pixel_values"][:max_images]
        noise = batch.get("noise")
        if noise is None:
            noise = self.make_noise(images.shape[0], generator=torch.Generator().manual_seed(seed))
        else:
            noise = noise[:max_images]
        was_training = self.training
        self.eval()
        try:
            recon, pix_mask = self.reconstruct(images, noise.to(images.device))
        finally:
            self.train(was_training)
        original = self._to_unit(images)
        recon = self._to_unit(recon)
        masked = original * (1 - pix_mask) + 0.5 * pix_mask  # masked patches grey
        pasted = original * (1 - pix_mask) + recon * pix_mask
        tiles = torch.stack([original, masked, recon, pasted], dim=1).flatten(0, 1).cpu()  # (B*4, 3, H, W)
        scale = -(-min_tile // max(tiles.shape[-2:]))  # ceil
        if scale > 1:
            tiles = tiles.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        grid = make_grid(tiles, nrow=4, padding=1, pad_value=1.0)
        return {"mae_reconstruction": grid.clamp(0, 1)}

    def _to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the data normalisation: (B, 3, H, W) -> [0, 1]."""
        mean = self.image_mean.to(images.device)
        std = self.image_std.to(images.device)
        return (images.float() * std + mean).clamp(0, 1)
