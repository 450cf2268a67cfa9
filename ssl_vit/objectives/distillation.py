"""DeiT distillation (Touvron et al. 2020): a distillation token learns from a frozen convnet teacher.

The student is a distilled backbone (`deit_*_distilled_*`: class and distillation tokens, two heads).
The class head learns the labels (smoothing, mixup / cutmix as `Supervised`); the distillation head
learns the teacher's output on the same (augmented, mixed) images:
- hard: CE(distillation head, teacher arg-max), weighted 1/2 each with the class loss (the paper's best);
- soft: KL(teacher || student) at temperature tau, times tau^2, weight alpha;
- none: no teacher; both heads learn the labels (so that the eval average of the heads stays meaningful).
At eval the backbone averages the two heads' logits (timm's `deit_*_distilled_*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

from ssl_vit.accepts import positive, probability, setting

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_vit.engine.teacher import TeacherError, load_teacher
from ssl_vit.objectives import register_objective
from ssl_vit.objectives.supervised import (
    MixTargets,
    SupervisedConfig,
    classifier_classes,
    require_labels,
    soft_target_cross_entropy,
    top1_accuracy,
)

__all__ = ["DeiTDistillation", "DistillConfig", "hard_distillation_loss", "soft_distillation_loss"]

DistillType = Literal["hard", "soft", "none"]


@dataclass
class DistillConfig:
    """`distill.*`: DeiT distillation (Touvron et al. 2020): hard beat soft in the paper."""

    type: DistillType = "hard"
    alpha: float = setting(0.5, probability(), 'weight of the distillation loss')
    tau: float = setting(1.0, positive(), 'soft-distillation temperature')
    # A checkpoint directory/file written by the supervised recipe (any architecture), or a timm model
    # name with published weights (downloaded once, e.g. "regnety_160.deit_in1k" as in the paper).
    teacher: Optional[str] = None
    # A supervised-recipe YAML: when `teacher` is a directory without a checkpoint, recipes/deit_pretrain.py
    # first trains the teacher with it there (on this run's data.* settings), so no download is needed.
    train_teacher: Optional[str] = None


def hard_distillation_loss(dist_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CE of the distillation head against the teacher's arg-max; both (B, C)."""
    return F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=-1))


def soft_distillation_loss(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)), summed over classes, mean over the batch.

    tau^2 keeps the gradient scale independent of tau (Hinton et al. 2015). facebookresearch/deit divides
    the summed KL by B*C instead of B, which only rescales alpha by 1/C; we keep the textbook KL.
    """
    log_student = F.log_softmax(dist_logits.float() / tau, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * (tau * tau)


# ---------------------------------------------------------------------------------------------------
# The objective


@register_objective("deit")
class DeiTDistillation(nn.Module):
    """DeiT: class head on the labels, distillation head on a frozen teacher's outputs.

    Args:
        backbone: a distilled ViT (`deit_*_distilled_*`) with `forward_distill_heads(feats)`.
        type: "hard" | "soft" | "none" (`distill.type`).
        alpha: weight of the distillation loss; the class loss gets 1 - alpha (DeiT's code; 0.5 is the
            paper's hard distillation, CE/2 + CE_teacher/2).
        tau: soft-distillation temperature.
        teacher: a module, a supervised-recipe run directory / backbone.safetensors, or a timm name
            (`ssl_vit.engine.teacher.load_teacher`).
        train_teacher: the supervised config `recipes/deit_pretrain.py` trains a missing teacher with
            (read by the recipe; here it only improves the error message).
        label_smoothing, mixup, cutmix, mixup_prob, mixup_switch_prob: the `supervised.*` group.
    forward(batch) -> {"loss", "loss_cls", "loss_dist", "teacher_agree"} plus, on unmixed batches,
    "top1" (heads averaged, as at eval) and "teacher_top1".
    """

    needs_labels: ClassVar[bool] = True
    transform: ClassVar[str] = "supervised"
    # Both groups' fields are constructor kwargs: smoothing and mixup apply to the class head exactly
    # as in `Supervised`.
    config_groups: ClassVar[dict[str, type]] = {"supervised": SupervisedConfig, "distill": DistillConfig}

    def __init__(
        self,
        backbone: nn.Module,
        type: DistillType = "hard",  # noqa: A002 - the config key is distill.type
        alpha: float = 0.5,
        tau: float = 1.0,
        teacher: str | Path | nn.Module | None = None,
        train_teacher: str | None = None,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
    ) -> None:
        super().__init__()
        if not callable(getattr(backbone, "forward_distill_heads", None)) or not getattr(backbone, "distilled", False):
            raise ValueError(
                f"the 'deit' objective needs a backbone with a distillation token, got "
                f"{getattr(backbone, 'spec', {}).get('name', backbone.__class__.__name__)}: use a distilled name "
                f"such as model.name=deit_tiny_distilled_patch4_32 (or deit_small_distilled_patch16_224)."
            )
        if type not in ("hard", "soft", "none"):
            raise ValueError(f"distill.type must be 'hard', 'soft' or 'none', got {type!r}.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha weighs the distillation loss and must be in [0, 1], got {alpha}.")
        if tau <= 0:
            raise ValueError(f"distill.tau is a temperature and must be > 0, got {tau}.")
        self.backbone = backbone
        self.num_classes = classifier_classes(backbone)
        self.distill_type: DistillType = type
        self.alpha = alpha
        self.tau = tau
        self.mix = MixTargets(self.num_classes, label_smoothing, mixup, cutmix, mixup_prob, mixup_switch_prob)
        self.teacher: nn.Module | None = None
        if type != "none":
            if teacher is None:
                how = f" or let recipes/deit_pretrain.py train one from {train_teacher}" if train_teacher else ""
                raise TeacherError(
                    f"distill.type={type} needs a teacher: set distill.teacher to a run directory of "
                    f"recipes/supervised_pretrain.py or a timm model name{how}; distill.type=none trains "
                    f"without one."
                )
            # A submodule, so Accelerate moves it to the student's device and precision; frozen, so the
            # engine (which optimises parameters with requires_grad) never updates it.
            self.teacher = load_teacher(teacher)
            teacher_classes = getattr(self.teacher, "num_classes", None)
            if teacher_classes is not None and teacher_classes != self.num_classes:
                raise TeacherError(self._class_mismatch(teacher_classes))

    def _class_mismatch(self, teacher_classes: int) -> str:
        return (
            f"the teacher predicts {teacher_classes} classes but the student/data have {self.num_classes}: "
            f"distil from a teacher trained on the same data (recipes/supervised_pretrain.py with the same "
            f"data.* settings)."
        )

    def train(self, mode: bool = True) -> "DeiTDistillation":
        """Train the student; the teacher stays in eval mode (its BatchNorm statistics never move)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch["pixel_values"], require_labels(batch, "deit")
        images, targets, mixed = self.mix(images, labels)  # teacher and student see the same images
        feats = self.backbone.forward_prefix(images)  # (B, 2, D): class and distillation tokens
        cls_logits, dist_logits = self.backbone.forward_distill_heads(feats)  # (B, C) each
        loss_cls = soft_target_cross_entropy(cls_logits, targets)
        out: dict[str, torch.Tensor] = {}
        if self.teacher is None:
            loss_dist = soft_target_cross_entropy(dist_logits, targets)
            loss = (loss_cls + loss_dist) / 2
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(images)  # (B, C)
            if teacher_logits.shape[-1] != self.num_classes:
                raise TeacherError(self._class_mismatch(teacher_logits.shape[-1]))
            if self.distill_type == "hard":
                loss_dist = hard_distillation_loss(dist_logits, teacher_logits)
            else:
                loss_dist = soft_distillation_loss(dist_logits, teacher_logits, self.tau)
            loss = (1 - self.alpha) * loss_cls + self.alpha * loss_dist
            teacher_pred = teacher_logits.argmax(dim=-1)
            out["teacher_agree"] = (dist_logits.detach().argmax(dim=-1) == teacher_pred).float().mean()
            if not mixed:
                out["teacher_top1"] = (teacher_pred == labels).float().mean()
        out.update(loss=loss, loss_cls=loss_cls.detach(), loss_dist=loss_dist.detach())
        if not mixed:
            out["top1"] = top1_accuracy((cls_logits.detach() + dist_logits.detach()) / 2, labels)
        return out
