"""MoCo v3 (Chen, Xie, He 2021): a query encoder predicts a momentum encoder's keys of the other view.

Two views of each image (BYOL's augmentations). The query path is the shared backbone (class token)
-> projector -> predictor; the key path is a momentum copy of backbone + projector, updated after
every optimizer step with a momentum that rises from 0.99 to 1 along a half cosine. Loss: the
symmetric InfoNCE `ctr(q1, k2) + ctr(q2, k1)` of the paper's Algorithm 1, with every key of the
global batch (gathered from all processes) as a negative. The patch projection can stay at its
random init (`freeze_patch_embed`), which the paper found stabilises ViT training.

Processes: the official code converts every BatchNorm to SyncBatchNorm, so the projector's and
predictor's statistics span the global batch. torch's SyncBatchNorm runs on GPUs only; `GlobalBatchNorm1d`
does the same with plain all-reduces (CPU and GPU), so 2 processes x B train as 1 process x 2B.
Names follow facebookresearch/moco-v3 where they can (`momentum_*`, `predictor`).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision import transforms as T

from ssl_vit.accepts import Range, at_least, items, non_negative, positive, probability, setting
from ssl_vit.objectives import register_objective
from ssl_vit.objectives.shared import copy_params_, cosine_momentum, ema_update_

__all__ = [
    "GlobalBatchNorm1d",
    "MoCoV3",
    "MoCoV3Config",
    "TwoViews",
    "contrastive_loss",
    "gather_keys",
    "mlp",
    "momentum_at",
]


# Colour jitter strengths (brightness, contrast, saturation, hue): >= 0 each, the hue at most 0.5.
_COLOR_JITTER = items(non_negative(), non_negative(), non_negative(), Range(0, 0.5))


@dataclass
class MoCoV3Config:
    """`mocov3.*`: Chen, Xie, He 2021 / facebookresearch/moco-v3 ViT defaults (PROTOCOLS.md)."""

    temperature: float = setting(0.2, positive(), "the contrastive loss's temperature")
    # Momentum of the key encoder at the first step; rises to 1 along a half cosine (`--moco-m-cos`).
    momentum: float = setting(0.99, probability(), "the key encoder's EMA momentum at the first step")
    momentum_cosine: bool = True
    hidden_dim: int = setting(4096, at_least(1), "hidden width of the projector and predictor")
    out_dim: int = setting(256, at_least(1), "output dimension of the projector and predictor")
    # The paper's "random patch projection": patch_embed stays at its random init (`--stop-grad-conv1`).
    freeze_patch_embed: bool = True
    # BYOL's views: colour jitter (brightness, contrast, saturation, hue; applied with p 0.8), and the
    # asymmetric (first view, second view) Gaussian blur and solarisation probabilities.
    color_jitter: tuple[float, float, float, float] = setting(
        (0.4, 0.4, 0.2, 0.1), _COLOR_JITTER, "colour jitter [brightness, contrast, saturation, hue], applied with p 0.8"
    )
    blur_prob: tuple[float, float] = setting(
        (1.0, 0.1), items(probability(), probability()), "Gaussian blur probability [first view, second view]"
    )
    solarize_prob: tuple[float, float] = setting(
        (0.0, 0.2), items(probability(), probability()), "solarisation probability [first view, second view]"
    )


# -- processes --------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(world size, rank) of the torch.distributed group Accelerate started; (1, 0) in one process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of each process's input is the sum of all processes' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


@torch.no_grad()
def gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Keys of every process in rank order, and where this process's start: (B, C) -> (W*B, C), offset.

    The official `concat_all_gather`: keys come from the momentum encoder, so they carry no gradient.
    """
    world, rank = _world()
    if world == 1:
        return k, 0
    chunks = [torch.empty_like(k) for _ in range(world)]
    dist.all_gather(chunks, k.contiguous())
    return torch.cat(chunks), rank * k.shape[0]


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the batches of all processes (SyncBatchNorm, on any device).

    In one process, or in eval mode, it is exactly `nn.BatchNorm1d`. Gradients flow through the
    global mean and variance to every process's inputs, as SyncBatchNorm's do.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, C)
        if not self.training or _world()[0] == 1:
            return super().forward(x)
        xf = x.float()
        count = torch.full((1,), float(xf.shape[0]), device=x.device)
        total = _AllReduceSum.apply(torch.cat([xf.sum(0), count]))  # (C + 1,)
        n = total[-1].detach()
        mean = total[:-1] / n  # (C,)
        var = _AllReduceSum.apply((xf - mean).pow(2).sum(0)) / n  # (C,) biased, as BN normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


# -- the pieces ---------------------------------------------------------------------------------


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v3's MLP: [Linear (no bias) -> BN -> ReLU] x (num_layers - 1), Linear -> BN without affine.

    The projector is mlp(3, D, 4096, 256), the ViT predictor mlp(2, 256, 4096, 256) (official `_build_mlp`;
    the last BN follows SimCLR, with its scale and shift removed).
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [GlobalBatchNorm1d(d_out), nn.ReLU(inplace=True)]
        else:
            layers.append(GlobalBatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """The paper's ctr(q, k) = 2T * CE(q @ k.T / T, own key): q (B, C) local queries, k (W*B, C) all keys.

    Query i's positive is key `offset + i` (its own image, in this process's place among the gathered
    keys); every other key is a negative. Both are L2-normalised first; computed in float32.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = q @ k.T / temperature  # (B, W*B)
    labels = torch.arange(q.shape[0], device=q.device) + offset  # (B,)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def momentum_at(step: float, total_steps: int, base: float, cosine: bool = True) -> float:
    """The key encoder's momentum after `step` of `total_steps`: `cosine_momentum`, or `base` throughout.

    The official `adjust_moco_momentum(epoch + i / iters_per_epoch)`, counted in optimizer steps.
    """
    return cosine_momentum(step, total_steps, base) if cosine else base


def _init_moco_vit(backbone: nn.Module) -> None:
    """facebookresearch/moco-v3 vits.py's init: xavier-uniform linears (q, k, v as three), zero biases,
    xavier-uniform patch projection, class token N(0, 1e-6)."""
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith("qkv"):
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = backbone.patch_embed.proj  # a conv that acts as a linear layer on flattened patches
    fan_in = proj.weight[0].numel()
    bound = math.sqrt(6.0 / (fan_in + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    if isinstance(getattr(backbone, "cls_token", None), nn.Parameter):
        nn.init.normal_(backbone.cls_token, std=1e-6)


# -- views ------------------------------------------------------------------------------------


class _PILGaussianBlur:
    """SimCLR's blur as the official code: PIL GaussianBlur with radius ~ U(0.1, 2.0)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoViews:
    """PIL RGB image -> {"views": [v1, v2]}: BYOL's augmentations (facebookresearch/moco-v3 main_moco.py).

    Each view: RandomResizedCrop(scale_min-1), colour jitter (BYOL: 0.4, 0.4, 0.2, 0.1) with p 0.8,
    grayscale p 0.2, Gaussian blur (view 1: p 1.0, view 2: p 0.1), solarisation (view 1: p 0, view 2:
    p 0.2), horizontal flip, normalisation. Picklable, for loader workers.
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        scale_min: float = 0.08,
        interpolation: str = "bilinear",
        hflip: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        blur_prob: tuple[float, float] = (1.0, 0.1),
        solarize_prob: tuple[float, float] = (0.0, 0.2),
    ) -> None:
        if len(color_jitter) != 4 or min(color_jitter) < 0 or color_jitter[3] > 0.5:
            raise ValueError(
                f"mocov3.color_jitter={list(color_jitter)}: need brightness, contrast, saturation, hue >= 0 "
                f"(hue at most 0.5); BYOL's are [0.4, 0.4, 0.2, 0.1]."
            )
        if not 0.0 < scale_min <= 1.0:
            raise ValueError(f"data.crop_scale_min={scale_min} must be in (0, 1]: the smallest crop area fraction.")
        modes = {name: T.InterpolationMode(name) for name in ("bilinear", "bicubic", "nearest", "lanczos")}
        if interpolation not in modes:
            raise ValueError(f"data.interpolation='{interpolation}' is unknown: use one of {', '.join(modes)}.")
        probs = [*blur_prob, *solarize_prob]
        if len(probs) != 4 or not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(
                f"mocov3.blur_prob={list(blur_prob)} / mocov3.solarize_prob={list(solarize_prob)}: need two "
                f"probabilities in [0, 1] each (view 1, view 2); the paper's are [1.0, 0.1] and [0.0, 0.2]."
            )
        self.views = [
            T.Compose([
                T.RandomResizedCrop(size, scale=(scale_min, 1.0), interpolation=modes[interpolation]),
                T.RandomApply([T.ColorJitter(*color_jitter)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([_PILGaussianBlur()], p=blur),
                T.RandomSolarize(128, p=solarize),  # PIL's ImageOps.solarize threshold, as BYOL
                T.RandomHorizontalFlip(hflip),
                T.ToTensor(),
                T.Normalize(mean=list(mean), std=list(std)),
            ])
            for blur, solarize in zip(blur_prob, solarize_prob)
        ]

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor]]:
        return {"views": [view(image) for view in self.views]}  # 2 x (3, size, size)


# -- the objective ----------------------------------------------------------------------------


@register_objective("mocov3")
class MoCoV3(nn.Module):
    """MoCo v3 objective around a ViT backbone.

    Args:
        backbone: the shared `ssl_vit.models.ViT` (`num_classes=0`; fixed sin-cos positions, the paper's).
        temperature: InfoNCE temperature T (paper 0.2); the loss is scaled by 2T.
        momentum / momentum_cosine: key-encoder momentum at the first step, and whether it rises to 1
            along a half cosine over the run (paper: 0.99, True).
        hidden_dim / out_dim: the projector's and predictor's hidden and output widths (paper 4096 / 256).
        freeze_patch_embed: keep the random patch projection (no gradient, never updated).
        color_jitter / blur_prob / solarize_prob: the BYOL views' colour jitter, and the per-view
            probabilities of blur and solarisation.
    Batch: `views` [(B, 3, H, W), (B, 3, H, W)], two augmented views of the same images.
    """

    needs_labels: ClassVar[bool] = False
    config_groups: ClassVar[dict[str, type]] = {"mocov3": MoCoV3Config}
    # Unless model.pos_embed says otherwise: MoCo v3's ViT uses fixed 2-D sin-cos positions (vits.py).
    backbone_defaults: ClassVar[dict[str, object]] = {"pos_embed": "sincos"}

    def __init__(
        self,
        backbone: nn.Module,
        temperature: float = 0.2,
        momentum: float = 0.99,
        momentum_cosine: bool = True,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        freeze_patch_embed: bool = True,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        blur_prob: tuple[float, float] = (1.0, 0.1),
        solarize_prob: tuple[float, float] = (0.0, 0.2),
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"mocov3.temperature must be positive, got {temperature}: the paper uses 0.2.")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"mocov3.momentum must be in [0, 1], got {momentum}: the paper starts at 0.99.")
        self.temperature = float(temperature)
        self.base_momentum = float(momentum)
        self.momentum_cosine = bool(momentum_cosine)
        self.color_jitter = tuple(color_jitter)
        self.blur_prob = tuple(blur_prob)
        self.solarize_prob = tuple(solarize_prob)

        self.backbone = backbone
        _init_moco_vit(backbone)
        if freeze_patch_embed:
            backbone.patch_embed.proj.requires_grad_(False)
        self.projector = mlp(3, backbone.embed_dim, hidden_dim, out_dim)
        self.predictor = mlp(2, out_dim, hidden_dim, out_dim)
        # The key encoder starts as a copy and only ever moves by momentum: no gradient, not optimised,
        # yet saved with the objective, so a resumed run continues from the same keys.
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self._momentum_now = momentum_at(0, 1, self.base_momentum, self.momentum_cosine)

    # -- views and schedules ------------------------------------------------------------------

    def train_transform(self, data_cfg: Any) -> TwoViews:
        """BYOL's two views at data.image_size; crop scale from data.crop_scale_min (paper: 0.08)."""
        scale_min = 0.08 if data_cfg.crop_scale_min is None else data_cfg.crop_scale_min
        return TwoViews(
            data_cfg.image_size, tuple(data_cfg.mean), tuple(data_cfg.std), scale_min, data_cfg.interpolation,
            data_cfg.hflip, self.color_jitter, self.blur_prob, self.solarize_prob,
        )

    def on_step_start(self, step: int, total_steps: int) -> None:
        if step == 0:
            # The key encoder starts as a copy of the query encoder as training starts, that is after
            # the engine has loaded model.checkpoint's weights into the backbone (continued pretraining).
            self.copy_to_momentum_encoder()
        # The momentum that made this step's keys (the official code sets it, then updates, then encodes).
        self._momentum_now = momentum_at(step, total_steps, self.base_momentum, self.momentum_cosine)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        # What the official code does at the start of the next iteration, with that iteration's momentum.
        m = momentum_at(step + 1, total_steps, self.base_momentum, self.momentum_cosine)
        self.update_momentum_encoder(m)

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(key-encoder part, query-encoder part): backbone, projector."""
        return [(self.momentum_backbone, self.backbone), (self.momentum_projector, self.projector)]

    def copy_to_momentum_encoder(self) -> None:
        """key params = query params (backbone and projector; the key projector keeps its BN statistics)."""
        for key, query in self._pairs():
            copy_params_(key, query)

    def update_momentum_encoder(self, m: float) -> None:
        """key params = m * key params + (1 - m) * query params (backbone and projector; BN statistics stay).

        Frozen query parameters (patch projection, fixed positions) are included, as the official code
        does: their key copies stay within rounding of them.
        """
        for key, query in self._pairs():
            ema_update_(key, query, m)

    # -- the model ------------------------------------------------------------------------------

    @staticmethod
    def _encode(backbone: nn.Module, projector: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Projections of each view: the ViT sees both views in one batch (its norms are per sample),
        the projector each view alone (its BatchNorm statistics are per view, as the official code's)."""
        feats = backbone.forward_pooled(torch.cat(views))  # (2B, D)
        return [projector(f) for f in feats.chunk(len(views))]  # 2 x (B, out_dim)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss = ctr(q1, k2) + ctr(q2, k1); also the momentum in use and the positive pairs' cosine."""
        v1, v2 = batch["views"]  # (B, 3, H, W) each
        q1, q2 = (self.predictor(z) for z in self._encode(self.backbone, self.projector, [v1, v2]))  # (B, C)
        with torch.no_grad():
            k1, k2 = self._encode(self.momentum_backbone, self.momentum_projector, [v1, v2])  # (B, C)
            all_k1, offset = gather_keys(k1)  # (W*B, C)
            all_k2, _ = gather_keys(k2)
        t = self.temperature
        loss = contrastive_loss(q1, all_k2, t, offset) + contrastive_loss(q2, all_k1, t, offset)
        with torch.no_grad():
            pos = (F.cosine_similarity(q1.float(), k2.float()) + F.cosine_similarity(q2.float(), k1.float())).mean() / 2
        momentum = torch.tensor(self._momentum_now, device=loss.device)
        return {"loss": loss, "momentum": momentum, "positive_cosine": pos}
