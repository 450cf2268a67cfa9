"""Tiny in-memory data and a toy objective for the engine tests (fast on 2 CPU cores)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ssl_vit.config import PretrainConfig
from ssl_vit.engine import Trainer
from ssl_vit.models import create_backbone

IMG = 8
CLASSES = 3


class ToyImages(Dataset):
    """`n` fixed 8x8 images with labels; `augment` adds a random flip and noise from the global RNGs."""

    def __init__(self, n: int = 32, augment: bool = True, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, IMG, IMG, generator=g)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.images[i]
        if self.augment:
            if torch.rand(()) < 0.5:  # torch RNG
                x = x.flip(-1)
            x = x + 0.1 * torch.randn_like(x) + 0.01 * random.random()  # torch + python RNG
        return {"pixel_values": x, "labels": self.labels[i]}


def toy_loader(n: int = 32, batch_size: int = 4, shuffle: bool = True, augment: bool = True, drop_last: bool = True) -> DataLoader:
    return DataLoader(ToyImages(n, augment), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)


def toy_backbone(num_classes: int = CLASSES, drop_path_rate: float = 0.0, **kw):
    kwargs = dict(depth=2, embed_dim=16, num_heads=2, img_size=IMG, num_classes=num_classes, drop_path_rate=drop_path_rate)
    kwargs.update(kw)
    return create_backbone("vit_nano_patch4_32", **kwargs)


class ToyObjective(nn.Module):
    """Cross-entropy of the backbone plus (when stochastic) a random token-masking term.

    `crash_at=k` raises `Crash` on the k-th forward call (1-based), as a kill mid-run would.
    """

    needs_labels = True
    transform = "supervised"

    def __init__(self, backbone: nn.Module, stochastic: bool = True, crash_at: int | None = None, nan_at: set[int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = nn.Linear(backbone.embed_dim, 3)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        self.stochastic = stochastic
        self.crash_at = crash_at
        self.nan_at = nan_at or set()
        self.calls = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            raise Crash(f"simulated kill at forward call {self.calls}")
        x, y = batch["pixel_values"], batch["labels"]
        feats = self.backbone.forward_features(x)  # (B, 1 + N, D)
        ce = F.cross_entropy(self.backbone.forward_head(feats), y)
        # Per-sample terms averaged over the batch: the loss of 4 micro-batches averages to that of one.
        recon = self.decoder(feats[:, 1:] + self.mask_token).pow(2).mean(dim=(1, 2)).mean()
        loss = ce + 0.1 * recon
        if self.stochastic:
            weight = torch.rand(feats.shape[0], device=x.device)  # (B,) model-side randomness
            loss = loss + 0.01 * (feats[:, 0].pow(2).mean(-1) * weight).mean()
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "ce": ce.detach(), "recon": recon.detach()}

    @torch.no_grad()
    def visualize(self, batch: dict[str, torch.Tensor], mean, std) -> dict[str, torch.Tensor]:
        x = batch["pixel_values"][:4]
        grid = torch.cat(list(x), dim=-1)  # (3, H, 4W)
        return {"toy_grid": (grid - grid.min()) / (grid.max() - grid.min() + 1e-6)}


class Crash(RuntimeError):
    pass


def weights(out) -> dict[str, torch.Tensor]:
    """The objective's weights in `out/checkpoint-last`."""
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "checkpoint-last" / "model.safetensors"))


def assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ: {differ[:5]}"


def toy_config(tmp_path, **train) -> PretrainConfig:
    cfg = PretrainConfig(output_dir=str(tmp_path), seed=0)
    cfg.objective.name = "toy"
    settings = dict(epochs=2, batch_size=4, save_every=3, log_every=1, eval_every=0)
    settings.update(train)
    cfg.train = dataclasses.replace(cfg.train, **settings)
    cfg.optim = dataclasses.replace(cfg.optim, blr=1e-2, warmup_steps=2, weight_decay=0.05)
    return cfg


def toy_objective(seed: int = 0, **kw) -> ToyObjective:
    torch.manual_seed(seed)
    return ToyObjective(toy_backbone(drop_path_rate=0.1 if kw.get("stochastic", True) else 0.0), **kw)


# A run that exercises every source of randomness and state: shuffling, random augmentations (torch
# and python RNGs), drop path and random terms in the objective, AdamW moments, EMA, layer decay,
# warmup + cosine, gradient accumulation x2 and an epoch boundary. 24 images, batch 2, accum 2:
# 6 steps per epoch, 12 steps, 24 forward calls; a checkpoint every 2 steps.
def resume_config(out, **train):
    cfg = toy_config(out, save_every=2, grad_accum_steps=2, batch_size=2, ema=True, ema_decay=0.9, **train)
    cfg.optim = dataclasses.replace(cfg.optim, layer_decay=0.75)
    return cfg


def resume_run(out, crash_at=None, **train):
    return Trainer(resume_config(out, **train), toy_objective(crash_at=crash_at), toy_loader(n=24, batch_size=2)).fit()
