"""VQ-KD (BEiT v2, Peng et al. 2022): a visual tokenizer distilled from a frozen teacher's patch features.

A ViT encoder (the run's backbone) maps each patch to a `codebook_dim` vector (the official
`encode_task_layer`: Linear, Tanh, Linear); the vector is l2-normalised and replaced by its nearest
code of an l2-normalised codebook (straight-through gradient); a small transformer decoder turns the
codes back into the teacher's patch features, scored by cosine similarity. The codebook is not trained
by gradients: its codes follow the mean of the vectors they win by an EMA, re-normalised after each
update (microsoft/unilm beit2 `norm_ema_quantizer.py` `NormEMAVectorQuantizer`), and start from a
k-means of the first batch (`kmeans_init`, the official tokenizer's setting). The counts and sums behind
the update are summed over processes, so 2 processes update it as 1 process with their whole batch.

The teacher is any checkpoint the suite reads (`ssl_vit.engine.teacher.load_teacher`: a supervised,
DeiT or DINO run, a converted timm model): its `forward_features` gives tokens (a ViT; prefix tokens
dropped) or a feature map (a convnet); either is resized to the encoder's patch grid. The official
teacher is CLIP-B/16; none can be downloaded here, so the suite's own runs serve.

What BEiT uses afterwards is `VQKDTokenizer` (encoder + encode_task_layer + codebook), written by
`save_tokenizer` as `tokenizer.safetensors` + `tokenizer.json` and read by `load_tokenizer`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ssl_vit.accepts import at_least, between, non_negative, setting
from ssl_vit.engine.checkpoint import CHECKPOINT, read_model_state, save_tensors
from ssl_vit.engine.teacher import TeacherError, load_teacher
from ssl_vit.objectives import register_objective

__all__ = [
    "VQKD",
    "NormEMAQuantizer",
    "TokenizerError",
    "VQKDConfig",
    "VQKDTokenizer",
    "load_tokenizer",
    "save_tokenizer",
    "teacher_patch_features",
]

TOKENIZER_FILE = "tokenizer.safetensors"


class TokenizerError(ValueError):
    """A tokenizer file that is missing or does not fit the run."""


@dataclass
class VQKDConfig:
    """`vqkd.*`: BEiT v2's tokenizer (official `vqkd_encoder_base_decoder_3x768x12_clip`: 8192 x 32 codes, decay 0.99)."""

    # A checkpoint the suite reads (run directory, backbone.safetensors, converted file) or a timm name.
    teacher: str | None = None
    # A supervised-recipe YAML: when `teacher` is unset or an empty directory, recipes/beit_tokenizer.py
    # first trains the teacher with it (into <output_dir>/teacher), on this run's data.
    train_teacher: str | None = None
    codebook_size: int = setting(8192, at_least(2), 'number of codes (visual words)')
    codebook_dim: int = setting(32, at_least(1), 'size of a code (l2-normalised)')
    decay: float = setting(0.99, between(0, 1, open=True), 'EMA decay of the codebook and of its usage counts')
    beta: float = setting(1.0, non_negative(), 'weight of the commitment loss (encoder output to its code)')
    decoder_depth: int = setting(3, at_least(1), 'transformer blocks of the decoder (official: 3, width of the encoder)')
    kmeans_init: bool = True
    usage_window: int = setting(100, at_least(1), 'optimizer steps over which codebook usage is counted')


def l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, p=2, dim=-1)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """Rows of every process, in rank order (the 1-process batch when batches are split by rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)
    return t


def cosine_kmeans(samples: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Spherical k-means of unit rows (M, d) -> (k, d) unit centres; the official `kmeans(use_cosine_sim=True)`."""
    m = samples.shape[0]
    pick = torch.randperm(m, generator=generator)[:k] if m >= k else torch.randint(0, m, (k,), generator=generator)
    means = samples[pick.to(samples.device)]
    for _ in range(iters):
        buckets = (samples @ means.t()).argmax(dim=-1)  # (M,)
        bins = torch.bincount(buckets, minlength=k)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        new = l2norm(sums / bins.clamp(min=1)[:, None])
        means = torch.where((bins == 0)[:, None], means, new)
    return means


class NormEMAQuantizer(nn.Module):
    """l2-normalised codebook with EMA updates; forward(z (B, N, d)) -> (straight-through codes, loss, ids (B, N))."""

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, beta: float = 1.0, kmeans_init: bool = True):
        super().__init__()
        self.num_codes, self.dim, self.decay, self.beta = num_codes, dim, decay, beta
        self.register_buffer("codebook", l2norm(torch.randn(num_codes, dim)))  # (K, d)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.zeros(num_codes))  # EMA of the counts (official statistic)
        self.register_buffer("window_counts", torch.zeros(num_codes))  # counts since the window started
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_window_usage", torch.tensor(-1.0))  # usage of the last full window; -1: none yet

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code of unit vectors (..., d) -> ids (...): on the sphere, the largest dot product."""
        return (z @ self.codebook.t()).argmax(dim=-1)

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """Codes from a k-means of the first batch (all processes' vectors; a fixed seed, the same everywhere)."""
        self.codebook.copy_(cosine_kmeans(_all_gather(flat), self.num_codes, generator=torch.Generator().manual_seed(0)))
        self.initted.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        bins = _all_reduce(torch.bincount(ids, minlength=self.num_codes).to(flat.dtype))  # (K,)
        sums = _all_reduce(torch.zeros_like(self.codebook).index_add_(0, ids, flat))  # (K, d)
        self.cluster_size.mul_(self.decay).add_(bins, alpha=1 - self.decay)
        self.window_counts.add_(bins)
        new = l2norm(sums / bins.clamp(min=1)[:, None])
        new = torch.where((bins == 0)[:, None], self.codebook, new)  # unused codes stay where they are
        self.codebook.mul_(self.decay).add_(new, alpha=1 - self.decay)
        self.codebook.copy_(l2norm(self.codebook))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = l2norm(z.float())  # (B, N, d)
        flat = z.reshape(-1, self.dim)
        if self.training and not bool(self.initted):
            self._kmeans_init(flat.detach())
        ids = self.codes(flat.detach())  # (B * N,)
        z_q = self.codebook[ids].view_as(z)  # a copy: the codes before this step's update, as the official
        if self.training:
            self._update(flat.detach(), ids)
        loss = self.beta * F.mse_loss(z_q, z)  # commitment: moves the encoder, not the (EMA) codebook
        z_q = z + (z_q - z).detach()  # straight-through
        return z_q, loss, ids.view(z.shape[:-1])

    def usage(self) -> torch.Tensor:
        """Fraction of codes used in the current window so far: a 0-dim tensor on the codebook's device."""
        return (self.window_counts > 0).float().mean()

    @torch.no_grad()
    def end_step(self, window: int) -> None:
        self.window_steps.add_(1)
        if int(self.window_steps) >= window:
            self.last_window_usage.fill_(self.usage())
            self.window_counts.zero_()
            self.window_steps.zero_()


def encode_task_layer(width: int, code_dim: int) -> nn.Sequential:
    """The official projection of encoder tokens to codebook space."""
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, code_dim))


def teacher_patch_features(teacher: nn.Module, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The teacher's features on the encoder's patch grid: (B, gh * gw, C).

    Tokens (B, P + n, C) lose their `num_prefix_tokens`; a feature map (B, C, h, w) stays one. A grid
    other than (gh, gw) is resized bilinearly (a convnet's coarser map, a ViT of another patch size).
    """
    feats = teacher.forward_features(images)
    if feats.ndim == 3:
        tokens = feats[:, int(getattr(teacher, "num_prefix_tokens", 0)) :]  # (B, n, C)
        side = round(math.sqrt(tokens.shape[1]))
        if side * side != tokens.shape[1]:
            raise TeacherError(f"the teacher gives {tokens.shape[1]} patch tokens, not a square grid.")
        feats = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)  # (B, C, h, w)
    elif feats.ndim != 4:
        raise TeacherError(f"the teacher's forward_features gives shape {tuple(feats.shape)}: need tokens or a map.")
    if tuple(feats.shape[-2:]) != tuple(grid):
        feats = F.interpolate(feats.float(), size=grid, mode="bilinear", align_corners=False)
    return feats.flatten(2).transpose(1, 2)  # (B, gh * gw, C)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class CodeDecoder(nn.Module):
    """The official decoder (a ViT with 1x1 patches over the code map), without its unused class token."""

    def __init__(self, code_dim: int, width: int, depth: int, num_heads: int, num_patches: int, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(code_dim, width)  # the 1x1 patch embedding
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, width))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(width, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(width)
        self.task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_linear)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, N, out_dim)
        x = self.embed(codes) + self.pos_embed
        return self.task_layer(self.norm(self.blocks(x)))


@register_objective("vqkd")
class VQKD(nn.Module):
    """BEiT v2's tokenizer training around a ViT encoder (the run's backbone).

    Args:
        backbone: the encoder (`num_classes=0`); its patch grid is the token grid.
        teacher: a module or anything `load_teacher` reads; frozen, eval mode.
        train_teacher: the supervised YAML the tokenizer recipe trains a missing teacher with.
        codebook_size, codebook_dim, decay, beta, decoder_depth, kmeans_init, usage_window: `vqkd.*`.
    forward(batch) -> {"loss", "loss_rec" (1 - cosine), "loss_commit", "codebook_usage" (fraction of codes
    used in the current window), "codebook_usage_last_window" (once a window is complete)}.
    """

    needs_labels: ClassVar[bool] = False
    transform: ClassVar[str] = "mae"  # the official tokenizer trains on random-resized crops + flip
    config_groups: ClassVar[dict[str, type]] = {"vqkd": VQKDConfig}

    def __init__(
        self,
        backbone: nn.Module,
        teacher: str | Path | nn.Module | None = None,
        train_teacher: str | None = None,
        codebook_size: int = 8192,
        codebook_dim: int = 32,
        decay: float = 0.99,
        beta: float = 1.0,
        decoder_depth: int = 3,
        kmeans_init: bool = True,
        usage_window: int = 100,
    ) -> None:
        super().__init__()
        if teacher is None:
            how = f" or let recipes/beit_tokenizer.py train one from {train_teacher}" if train_teacher else ""
            raise TeacherError(
                f"vqkd needs a teacher whose patch features the codes distil: set vqkd.teacher to a run directory "
                f"(supervised, DeiT, DINO, ...) or a checkpoint the suite reads{how}."
            )
        self.backbone = backbone
        self.num_prefix_tokens: int = backbone.num_prefix_tokens
        self.grid: tuple[int, int] = tuple(backbone.patch_embed.grid_size)
        width = backbone.embed_dim
        self.encode_task_layer = encode_task_layer(width, codebook_dim)
        self.encode_task_layer.apply(_init_linear)
        self.quantizer = NormEMAQuantizer(codebook_size, codebook_dim, decay, beta, kmeans_init)
        self.teacher = load_teacher(teacher)
        out_dim = int(getattr(self.teacher, "num_features", 0) or self.teacher.embed_dim)
        heads = backbone.blocks[0].attn.num_heads
        self.decoder = CodeDecoder(codebook_dim, width, decoder_depth, heads, self.grid[0] * self.grid[1], out_dim)
        self.usage_window = int(usage_window)

    def train(self, mode: bool = True) -> VQKD:
        """The teacher stays in eval mode (BatchNorm statistics, dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder tokens projected to codebook space, not yet normalised: (B, N, d)."""
        tokens = self.backbone.forward_features(images)[:, self.num_prefix_tokens :]  # (B, N, D)
        with torch.autocast(device_type=images.device.type, enabled=False):  # fp32, as the official encode()
            return self.encode_task_layer(tokens.float())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["pixel_values"]  # (B, 3, H, W)
        with torch.no_grad():
            target = teacher_patch_features(self.teacher, images, self.grid).float()  # (B, N, C)
        z_q, loss_commit, _ = self.quantizer(self.encode(images))
        rec = self.decoder(z_q).float()  # (B, N, C)
        loss_rec = (1 - (l2norm(rec) * l2norm(target)).sum(-1)).mean()
        out = {
            "loss": loss_rec + loss_commit,
            "loss_rec": loss_rec.detach(),
            "loss_commit": loss_commit.detach(),
            "codebook_usage": self.quantizer.usage(),  # on the loss's device, as every metric the engine stacks
        }
        if float(self.quantizer.last_window_usage) >= 0:
            out["codebook_usage_last_window"] = self.quantizer.last_window_usage.detach().clone()
        return out

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.quantizer.end_step(self.usage_window)


# ---------------------------------------------------------------------------------------------------
# The trained tokenizer, as BEiT reads it


class VQKDTokenizer(nn.Module):
    """Encoder + projection + codebook: images (B, 3, H, W) -> token ids (B, N), under no_grad."""

    def __init__(self, encoder: nn.Module, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.encode_task_layer = encode_task_layer(encoder.embed_dim, codebook_dim)
        self.register_buffer("codebook", torch.zeros(codebook_size, codebook_dim))
        self.codebook_size = codebook_size
        self.num_prefix_tokens: int = encoder.num_prefix_tokens

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)[:, self.num_prefix_tokens :]  # (B, N, D)
        with torch.autocast(device_type=images.device.type, enabled=False):  # codes picked in fp32
            z = l2norm(self.encode_task_layer(tokens.float()))  # (B, N, d)
            return (z @ self.codebook.float().t()).argmax(dim=-1)  # (B, N)


def tokenizer_state(objective_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VQKD objective's state dict -> the tokenizer's (encoder.*, encode_task_layer.*, codebook)."""
    out = {}
    for key, value in objective_state.items():
        if key.startswith("backbone."):
            out["encoder." + key[len("backbone.") :]] = value
        elif key.startswith("encode_task_layer."):
            out[key] = value
    out["codebook"] = objective_state["quantizer.codebook"]
    return out


def save_tokenizer(output_dir: str | Path, writer: int = 0) -> Path:
    """Write <output_dir>/tokenizer.safetensors + tokenizer.json from a finished VQKD run's last checkpoint.

    Each file goes to a temporary name (suffixed by `writer`, e.g. the process index) and is renamed into
    place, so every process of a run may write the same content without a barrier and no reader sees half
    a file; the JSON comes last, so `tokenizer_file` finds a tokenizer only once both are complete.
    """
    output_dir = Path(output_dir)
    state = read_model_state(output_dir / CHECKPOINT)
    meta = json.loads((output_dir / "backbone.json").read_text())
    window = state["quantizer.last_window_usage"].item()
    info = {
        "encoder": meta["model"],
        "codebook_size": int(state["quantizer.codebook"].shape[0]),
        "codebook_dim": int(state["quantizer.codebook"].shape[1]),
        "codebook_usage_last_window": None if window < 0 else window,
        "codebook_usage_current_window": float((state["quantizer.window_counts"] > 0).float().mean()),
        "trained_by": "recipes/beit_tokenizer.py (ssl_vit.objectives.vqkd)",
        "config": meta.get("config"),
    }
    path = output_dir / TOKENIZER_FILE
    tmp = path.with_name(f"{path.name}.tmp{writer}")
    save_tensors({k: v.contiguous() for k, v in tokenizer_state(state).items()}, tmp)
    os.replace(tmp, path)
    tmp_json = output_dir / f"tokenizer.json.tmp{writer}"
    tmp_json.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp_json, output_dir / "tokenizer.json")
    return path


def tokenizer_file(path: str | Path) -> Path | None:
    """The tokenizer.safetensors behind `path` (a run directory or the file), or None."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    return file if file.is_file() and file.with_suffix(".json").is_file() else None


def load_tokenizer(path: str | Path) -> VQKDTokenizer:
    """A tokenizer saved by `save_tokenizer`, frozen and in eval mode."""
    from safetensors.torch import load_file

    from ssl_vit.models import create_model

    file = tokenizer_file(path)
    if file is None:
        raise TokenizerError(
            f"no tokenizer at '{path}' (tokenizer.safetensors + tokenizer.json): train one with "
            f"python recipes/beit_tokenizer.py output_dir={path}, or leave beit.tokenizer unset so that "
            f"recipes/beit_pretrain.py trains one into <output_dir>/tokenizer."
        )
    info = json.loads(file.with_suffix(".json").read_text())
    spec = dict(info["encoder"])
    spec["num_classes"] = 0
    encoder = create_model(spec.pop("name"), **spec)
    tokenizer = VQKDTokenizer(encoder, int(info["codebook_size"]), int(info["codebook_dim"]))
    tokenizer.load_state_dict(load_file(str(file)), strict=True)
    tokenizer.requires_grad_(False)
    return tokenizer.eval()
