"""DINO (Caron et al. 2021): a student matches an EMA teacher's centred, sharpened outputs across crops.

Self-distillation with no labels: the student (the shared backbone + a DINO head) sees 2 global crops
and `local_crops` smaller ones; the teacher (an EMA copy of both) sees the 2 global crops only; the
loss is the cross-entropy between the teacher's centred, sharpened softmax of one view and the
student's softmax of every other view. The teacher's backbone is exported and evaluated.
Follows facebookresearch/dino: `main_dino.py` (DINOLoss, DataAugmentationDINO, train_one_epoch),
`vision_transformer.py` (DINOHead), `utils.py` (cosine_scheduler, cancel_gradients_last_layer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from timm.layers import trunc_normal_
from torch.nn.utils.parametrizations import weight_norm
from torchvision import transforms as T

from ssl_vit.accepts import Range, at_least, items, non_negative, positive, probability, setting, span
from ssl_vit.objectives import register_objective
from ssl_vit.objectives.shared import copy_params_, cosine_momentum, ema_update_
from ssl_vit.ops.linear import use_onednn_linears
from ssl_vit.viz.attention import attention_grid
from ssl_vit.viz.images import denormalize, image_grid

__all__ = [
    "DINO",
    "DINOConfig",
    "DINOHead",
    "MultiCropTransform",
    "default_local_crop_size",
    "dino_loss",
    "teacher_temperature",
]


# An area fraction of the image: (0, 1]. Colour jitter strengths: >= 0 each, the hue at most 0.5.
_AREA = Range(0, 1, low_open=True)
_COLOR_JITTER = items(non_negative(), non_negative(), non_negative(), Range(0, 0.5))


@dataclass
class DINOConfig:
    """`dino.*`: main_dino.py's defaults (../shared/PROTOCOLS.md); epochs may be fractional."""

    out_dim: int = setting(65536, at_least(1), "the head's output (prototype) dimension")
    hidden_dim: int = setting(2048, at_least(1), "the head's hidden width")
    bottleneck_dim: int = setting(256, at_least(1), "the head's bottleneck width")
    # Weight-normalised last layer with its norm fixed at 1 (the authors set False for ViT-S's best runs).
    norm_last_layer: bool = True
    # main_dino.py's --use_bn_in_head: BatchNorm after the head's two hidden linears, student and teacher (the
    # teacher's with batch statistics, as the official teacher in train mode). Per process here (lightly's
    # DINOProjectionHead too); the official code syncs it across GPUs.
    use_bn_in_head: bool = False
    # EMA momentum at the first step, cosine to 1 at the last (0.9995 suggested for batch 256).
    momentum_teacher: float = setting(0.996, probability(), "the teacher's EMA momentum at the first step")
    # Teacher temperature: linear from warmup_teacher_temp to teacher_temp over the warm-up epochs.
    warmup_teacher_temp: float = setting(0.04, positive(), "the teacher's temperature at the start")
    teacher_temp: float = setting(0.04, positive(), "the teacher's temperature after the warm-up")
    warmup_teacher_temp_epochs: float = setting(0.0, non_negative(), "epochs of teacher temperature warm-up")
    student_temp: float = setting(0.1, positive(), "the student's temperature")
    center_momentum: float = setting(0.9, probability(), "EMA momentum of the teacher's centre")
    # The head's last layer gets no update during these first epochs.
    freeze_last_layer_epochs: float = setting(1.0, non_negative(), "epochs the head's last layer stays frozen")
    global_crops_scale: tuple[float, float] = setting((0.4, 1.0), span(_AREA), "area fraction range of global crops")
    local_crops: int = setting(8, non_negative(), "local crops per image; 0: global crops only")
    local_crops_scale: tuple[float, float] = setting((0.05, 0.4), span(_AREA), "area fraction range of local crops")
    # Colour jitter of every view (brightness, contrast, saturation, hue), applied with p 0.8, and the
    # probability of a grayscale view.
    color_jitter: tuple[float, float, float, float] = setting(
        (0.4, 0.4, 0.2, 0.1), _COLOR_JITTER, "colour jitter [brightness, contrast, saturation, hue], applied with p 0.8"
    )
    grayscale: float = setting(0.2, probability(), "probability of a grayscale view")
    # Side of the local crops in pixels; None: 3/7 of data.image_size (the paper's 96 of 224) rounded
    # to a multiple of the patch size (32 px, patch 4 -> 12; 224, patch 16 -> 96).
    local_crop_size: Optional[int] = setting(
        None, at_least(1), "side of the local crops in pixels, a multiple of the patch; null: 3/7 of data.image_size"
    )


# -- schedules and loss (pure) ------------------------------------------------------------------


def teacher_temperature(epoch: float, warmup_temp: float, temp: float, warmup_epochs: float) -> float:
    """DINOLoss's np.linspace(warmup_temp, temp, warmup_epochs)[epoch], then temp; linear between epochs.

    `epoch` is fractional (steps done / steps per epoch): at each epoch's first step the value is the
    official code's (which holds it for the whole epoch); in between it moves on linearly.
    """
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs <= 1:  # linspace of one point: the start value
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * min(epoch / (warmup_epochs - 1), 1.0)


def dino_loss(
    student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, student_temp: float, teacher_temp: float
) -> torch.Tensor:
    """Mean over (teacher view t, student view s != t) of the batch-mean cross-entropy H(P_t, P_s).

    Args: student_out (V, B, K), the 2 global views first; teacher_out (2, B, K) of the global views;
    center (1, K). Returns a scalar; no gradient flows into the teacher.
    """
    teacher = F.softmax((teacher_out.detach() - center) / teacher_temp, dim=-1)  # (2, B, K), centred + sharpened
    student = F.log_softmax(student_out / student_temp, dim=-1)  # (V, B, K)
    cross = -torch.einsum("tbk,sbk->ts", teacher, student) / student_out.shape[1]  # (2, V): mean CE per pair
    same_view = torch.eye(*cross.shape, dtype=torch.bool, device=cross.device)
    return cross[~same_view].mean()


def default_local_crop_size(image_size: int, patch_size: int) -> int:
    """3/7 of the image side (the paper's 96 px of 224), rounded to whole patches, at least one."""
    return max(1, round(image_size * 3 / 7 / patch_size)) * patch_size


# -- views --------------------------------------------------------------------------------------


class RandomGaussianBlur:
    """PIL's Gaussian blur with probability p, radius drawn uniformly (utils.GaussianBlur; torch RNG)."""

    def __init__(self, p: float, radius: tuple[float, float]) -> None:
        self.p, self.radius = p, radius

    def __call__(self, image: Image.Image) -> Image.Image:
        if float(torch.rand(())) >= self.p:
            return image
        low, high = self.radius
        return image.filter(ImageFilter.GaussianBlur(radius=low + (high - low) * float(torch.rand(()))))


class MultiCropTransform:
    """PIL RGB image -> {"global_crops": [g1, g2], "local_crops": [l1, ..., lk]} (DataAugmentationDINO).

    Every view: RandomResizedCrop, flip, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2;
    Gaussian blur p 1.0 (g1) / 0.1 (g2) / 0.5 (local); solarisation p 0.2 on g2. The blur radius
    (0.1-2 px at 224) scales with the global crop size, so small images are blurred alike.
    Tensors: (3, global_size, global_size) and (3, local_size, local_size), normalised.
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        local_crops: int,
        global_scale: tuple[float, float],
        local_scale: tuple[float, float],
        mean: Sequence[float],
        std: Sequence[float],
        hflip: float = 0.5,
        interpolation: str = "bicubic",
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        grayscale: float = 0.2,
    ) -> None:
        interp = T.InterpolationMode(interpolation)
        radius = (0.1 * global_size / 224, 2.0 * global_size / 224)
        brightness, contrast, saturation, hue = color_jitter
        flip_and_color = [
            T.RandomHorizontalFlip(hflip),
            T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=0.8),
            T.RandomGrayscale(p=grayscale),
        ]
        normalize = [T.ToTensor(), T.Normalize(list(mean), list(std))]

        def crop(size: int, scale: tuple[float, float]) -> T.RandomResizedCrop:
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp)

        self.local_crops = local_crops
        self.global1 = T.Compose(
            [crop(global_size, global_scale), *flip_and_color, RandomGaussianBlur(1.0, radius), *normalize]
        )
        self.global2 = T.Compose(
            [
                crop(global_size, global_scale),
                *flip_and_color,
                RandomGaussianBlur(0.1, radius),
                T.RandomSolarize(threshold=128, p=0.2),
                *normalize,
            ]
        )
        self.local = T.Compose([crop(local_size, local_scale), *flip_and_color, RandomGaussianBlur(0.5, radius), *normalize])

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor]]:
        views = {"global_crops": [self.global1(image), self.global2(image)]}
        if self.local_crops:
            views["local_crops"] = [self.local(image) for _ in range(self.local_crops)]
        return views


# -- head ---------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """3-layer MLP (GELU; with `use_bn` a BatchNorm1d after each hidden Linear) -> bottleneck -> L2
    normalisation -> weight-normalised linear to out_dim.

    Initialised as vision_transformer.py's DINOHead: trunc_normal(0.02) MLP weights, zero biases, the
    last layer's direction PyTorch's default and its norm (`weight_g`) 1, fixed when `norm_last_layer`.
    The last layer is `torch.nn.utils.parametrizations.weight_norm`: `original0` is the norm g (K, 1),
    `original1` the direction v (K, bottleneck); the classic `weight_norm` cannot be deep-copied.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        bn = (lambda: [nn.BatchNorm1d(hidden_dim)]) if use_bn else list  # the official layer order and indices
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), *bn(), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), *bn(), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )  # fmt: skip
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        norm = self.last_layer.parametrizations.weight.original0  # (K, 1)
        with torch.no_grad():
            norm.fill_(1.0)
        norm.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, out_dim)."""
        x = self.mlp(x)  # (N, bottleneck)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)  # (N, K)


# -- the objective ------------------------------------------------------------------------------


@register_objective("dino")
class DINO(nn.Module):
    """DINO around a ViT backbone (the student's); the teacher is an EMA copy of backbone + head.

    Args: see `DINOConfig`. The backbone must take other input sizes than its own (timm's
    `dynamic_img_size=True`) for local crops smaller than the global ones.
    Batch: `global_crops` 2 x (B, 3, H, W), `local_crops` k x (B, 3, h, w) (`MultiCropTransform`).
    Method state, all in the checkpoint: `teacher` (frozen parameters) and the `center` buffer (1, K).
    Schedules come from the step alone (`on_train_start` gives the epoch length), so a resumed run
    continues them exactly. Across processes: the centre is all-reduced; the teacher is the same
    everywhere (EMA of the DDP-synchronised student); there is no batch norm.
    """

    needs_labels: ClassVar[bool] = False
    config_groups: ClassVar[dict[str, type]] = {"dino": DINOConfig}
    # Local crops are smaller than the global ones: the backbone resamples its position embeddings.
    backbone_defaults: ClassVar[dict[str, Any]] = {"dynamic_img_size": True}

    def __init__(
        self,
        backbone: nn.Module,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        use_bn_in_head: bool = False,
        momentum_teacher: float = 0.996,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 0.0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        freeze_last_layer_epochs: float = 1.0,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops: int = 8,
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        grayscale: float = 0.2,
        local_crop_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        _check_config(locals())
        self.momentum_teacher = float(momentum_teacher)
        self.warmup_teacher_temp, self.teacher_temp = float(warmup_teacher_temp), float(teacher_temp)
        self.warmup_teacher_temp_epochs = float(warmup_teacher_temp_epochs)
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.freeze_last_layer_epochs = float(freeze_last_layer_epochs)
        self.global_crops_scale, self.local_crops_scale = tuple(global_crops_scale), tuple(local_crops_scale)
        self.local_crops, self.local_crop_size = int(local_crops), local_crop_size
        self.color_jitter, self.grayscale = tuple(color_jitter), float(grayscale)

        self.backbone = backbone
        if hasattr(backbone, "pos_embed_resample"):  # local crops: vision_transformer.py's interpolate_pos_encoding
            backbone.pos_embed_resample = "dino"
        if isinstance(getattr(backbone, "cls_token", None), nn.Parameter):
            trunc_normal_(backbone.cls_token, std=0.02)  # vision_transformer.py's init (timm: N(0, 1e-6))
        self.head = DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer, use_bn_in_head)
        use_onednn_linears(self.head)
        # Same architecture and weights; copied again from the student at step 0 (after a model.checkpoint loads).
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Set by the hooks from the step (not state): the epoch length and this step's temperature.
        self.steps_per_epoch = 1.0
        self.current_teacher_temp = teacher_temperature(0.0, *self._temperatures())
        # Teacher outputs of this step's micro-batches, summed (the centre moves once per optimizer step).
        self._center_sum: torch.Tensor | None = None
        self._center_count = 0

    def _temperatures(self) -> tuple[float, float, float]:
        return self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs

    def train(self, mode: bool = True) -> "DINO":
        super().train(mode)
        self.teacher.train(False)  # main_dino.py's teacher has no drop path: eval mode turns it off
        self.teacher["head"].train(mode)  # ... but runs in train mode: its head's BatchNorm uses batch statistics
        return self

    def export_backbone(self) -> nn.Module:
        return self.teacher["backbone"]

    # -- views ----------------------------------------------------------------------------------

    def train_transform(self, data_cfg: Any) -> MultiCropTransform:
        patch = self.backbone.patch_embed.patch_size[0]
        local = self.local_crop_size or default_local_crop_size(data_cfg.image_size, patch)
        if local % patch:
            raise ValueError(f"dino.local_crop_size={local} must be a multiple of the patch size ({patch}), e.g. {max(1, round(local / patch)) * patch}.")
        if self.local_crops and local != data_cfg.image_size and not getattr(self.backbone, "dynamic_img_size", False):
            raise ValueError(
                f"DINO's local crops ({local} px) are smaller than the global ones ({data_cfg.image_size} px): the "
                f"backbone must take both sizes. Set model.args={{dynamic_img_size: true}} (or dino.local_crops=0)."
            )
        return MultiCropTransform(
            data_cfg.image_size, local, self.local_crops, self.global_crops_scale, self.local_crops_scale,
            data_cfg.mean, data_cfg.std, hflip=data_cfg.hflip, interpolation=data_cfg.interpolation,
            color_jitter=self.color_jitter, grayscale=self.grayscale,
        )

    # -- the model ------------------------------------------------------------------------------

    def student(self, crops: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """Class tokens of each group of same-size crops through the backbone, then the head: (sum N, K)."""
        tokens = [self.backbone.forward_prefix(torch.cat(list(group)))[:, 0] for group in crops if len(group)]
        return self.head(torch.cat(tokens))  # MultiCropWrapper: one backbone pass per crop size, one head pass

    @torch.no_grad()
    def teacher_forward(self, global_crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """(2B, K) teacher outputs of the global crops."""
        return self.teacher["head"](self.teacher["backbone"].forward_prefix(torch.cat(list(global_crops)))[:, 0])

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss over every (global teacher view, other student view) pair; also the teacher's temperature and entropy."""
        global_crops, local_crops = batch["global_crops"], batch.get("local_crops", [])  # 2 x (B,3,H,W), k x (B,3,h,w)
        b = global_crops[0].shape[0]
        teacher_out = self.teacher_forward(global_crops).float().unflatten(0, (2, b))  # (2, B, K)
        student_out = self.student([global_crops, local_crops]).float()  # ((2 + k) B, K)
        student_out = student_out.unflatten(0, (student_out.shape[0] // b, b))  # (2 + k, B, K)
        loss = dino_loss(student_out, teacher_out, self.center, self.student_temp, self.current_teacher_temp)
        if self.training:
            self._add_to_center(teacher_out)
        with torch.no_grad():  # collapse monitor: 0 = one-hot teacher, log K = uniform teacher
            log_p = F.log_softmax((teacher_out - self.center) / self.current_teacher_temp, dim=-1)
            entropy = -(log_p.exp() * log_p).sum(dim=-1).mean()
        # On the loss's device, as every metric: the engine stacks them for its log line.
        return {"loss": loss, "teacher_temp": loss.new_tensor(self.current_teacher_temp), "teacher_entropy": entropy}

    # -- centre ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _add_to_center(self, teacher_out: torch.Tensor) -> None:
        flat = teacher_out.flatten(0, 1)  # (2B, K)
        total = flat.sum(dim=0)
        self._center_sum = total if self._center_sum is None else self._center_sum + total
        self._center_count += flat.shape[0]

    @torch.no_grad()
    def update_center(self) -> None:
        """center = m * center + (1 - m) * mean teacher output of this step over all processes (DINOLoss.update_center)."""
        if self._center_sum is None:
            return
        stats = torch.cat([self._center_sum, self._center_sum.new_tensor([self._center_count])])  # (K + 1,)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)  # (1, K)
        self.center.copy_(self.center * self.center_momentum + batch_center * (1 - self.center_momentum))
        self._center_sum, self._center_count = None, 0

    # -- hooks ----------------------------------------------------------------------------------

    def on_train_start(self, total_steps: int, steps_per_epoch: float) -> None:
        self.steps_per_epoch = float(steps_per_epoch)

    def on_step_start(self, step: int, total_steps: int) -> None:
        if step == 0:  # "teacher and student start with the same weights" (also after model.checkpoint)
            copy_params_(self.teacher["backbone"], self.backbone, buffers=True)
            copy_params_(self.teacher["head"], self.head, buffers=True)
        self.current_teacher_temp = teacher_temperature(step / self.steps_per_epoch, *self._temperatures())

    def last_layer_frozen(self, step: int) -> bool:
        return step < self.freeze_last_layer_epochs * self.steps_per_epoch

    def on_before_optimizer_step(self, step: int, total_steps: int) -> None:
        if self.last_layer_frozen(step):  # utils.cancel_gradients_last_layer: no update at all, not even decay
            for p in self.head.last_layer.parameters():
                p.grad = None

    def on_step_end(self, step: int, total_steps: int) -> None:
        m = cosine_momentum(step, total_steps, self.momentum_teacher)  # utils.cosine_scheduler(base, 1, ...)
        ema_update_(self.teacher["backbone"], self.backbone, m)
        ema_update_(self.teacher["head"], self.head, m)
        self.update_center()

    # -- pictures -------------------------------------------------------------------------------

    def visualize(self, batch: dict[str, Any], mean: Sequence[float], std: Sequence[float]) -> dict[str, torch.Tensor]:
        """The crops of 4 images (a row each: 2 global, then local) and the teacher's attention on the first global crop."""
        global_crops, local_crops = batch["global_crops"], batch.get("local_crops", [])
        n = min(4, global_crops[0].shape[0])
        views = [denormalize(v[:n].float().cpu(), mean, std) for v in [*global_crops, *local_crops]]
        rows = [[v[i] for v in views] for i in range(n)]
        attention = attention_grid(self.teacher["backbone"], global_crops[0][:n], mean=mean, std=std)
        return {"dino_views": image_grid(rows, cell=global_crops[0].shape[-1]), "dino_attention": attention}


def _check_config(args: dict[str, Any]) -> None:
    """Errors that name the key and a working value."""
    for key in ("out_dim", "hidden_dim", "bottleneck_dim"):
        if int(args[key]) < 1:
            raise ValueError(f"dino.{key} must be >= 1, got {args[key]}.")
    for key in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
        if not float(args[key]) > 0:
            raise ValueError(f"dino.{key} must be > 0, got {args[key]} (paper: teacher 0.04-0.07, student 0.1).")
    for key in ("momentum_teacher", "center_momentum"):
        if not 0.0 <= float(args[key]) <= 1.0:
            raise ValueError(f"dino.{key} must be in [0, 1], got {args[key]} (paper: 0.996 and 0.9).")
    for key in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
        if float(args[key]) < 0:
            raise ValueError(f"dino.{key} must be >= 0, got {args[key]}.")
    if int(args["local_crops"]) < 0:
        raise ValueError(f"dino.local_crops must be >= 0 (0: global crops only), got {args['local_crops']}.")
    for key in ("global_crops_scale", "local_crops_scale"):
        scale = tuple(args[key])
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"dino.{key} must be [low, high] with 0 < low <= high <= 1, got {list(scale)}.")
    jitter = tuple(args["color_jitter"])
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise ValueError(
            f"dino.color_jitter must be [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5, got "
            f"{list(jitter)} (paper: [0.4, 0.4, 0.2, 0.1])."
        )
    if not 0.0 <= float(args["grayscale"]) <= 1.0:
        raise ValueError(f"dino.grayscale is a probability in [0, 1], got {args['grayscale']} (paper: 0.2).")
    size = args["local_crop_size"]
    if size is not None and int(size) < 1:
        raise ValueError(f"dino.local_crop_size must be >= 1 or null (3/7 of data.image_size), got {size}.")
