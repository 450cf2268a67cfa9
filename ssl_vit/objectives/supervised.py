"""Supervised pretraining: cross-entropy with label smoothing, optionally on mixup / cutmix batches.

The same objective trains our ViT backbones and any timm classifier (e.g. the ResNet teacher that
DeiT distillation needs): it only calls `backbone(x)` and reads `backbone.num_classes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ssl_vit.accepts import Range, non_negative, probability, setting

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup

from ssl_vit.objectives import register_objective

__all__ = ["MixTargets", "Supervised", "SupervisedConfig", "soft_target_cross_entropy", "top1_accuracy"]


@dataclass
class SupervisedConfig:
    """`supervised.*`: DeiT recipe defaults: label smoothing 0.1; mixup 0.8 / cutmix 1.0 are set by the paper configs."""

    label_smoothing: float = setting(0.1, Range(0, 1, high_open=True))
    mixup: float = setting(0.0, non_negative(), "mixup's Beta alpha; 0: off")
    cutmix: float = setting(0.0, non_negative(), "cutmix's Beta alpha; 0: off")
    mixup_prob: float = setting(1.0, probability(), 'probability of mixing a batch')
    mixup_switch_prob: float = setting(0.5, probability(), 'probability of cutmix instead of mixup')


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits)); logits, targets: (B, C)."""
    # float32 log-softmax: under bf16 autocast the per-class log-probabilities lose too many digits.
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max is the label; logits (B, C), labels (B,)."""
    return (logits.argmax(dim=-1) == labels).float().mean()


class _RecordingMixup(Mixup):
    """timm's Mixup that remembers the last batch's lambda (1.0: the batch was left unmixed)."""

    last_lam: float = 1.0

    def _mix_batch(self, x: torch.Tensor) -> float:
        self.last_lam = float(super()._mix_batch(x))
        return self.last_lam


class MixTargets(nn.Module):
    """Turns (images, labels) into (maybe mixed images, soft targets) with smoothing folded in.

    Without mixup/cutmix (or in eval mode) the targets are the smoothed one-hot labels, so one soft
    cross-entropy covers every case; with them, timm's `Mixup` mixes the batch (one lambda per batch,
    as DeiT) and its targets. Holds no parameters.
    """

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"supervised.label_smoothing must be in [0, 1), got {label_smoothing}.")
        if mixup < 0 or cutmix < 0:
            raise ValueError(
                f"supervised.mixup / supervised.cutmix are Beta(alpha, alpha) parameters and must be >= 0 "
                f"(0 turns them off), got mixup={mixup}, cutmix={cutmix}."
            )
        if not 0.0 <= mixup_prob <= 1.0 or not 0.0 <= mixup_switch_prob <= 1.0:
            raise ValueError(
                f"supervised.mixup_prob and supervised.mixup_switch_prob are probabilities in [0, 1], got "
                f"{mixup_prob} and {mixup_switch_prob}."
            )
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self._labels_checked = False
        self.mixup: _RecordingMixup | None = None
        if (mixup > 0 or cutmix > 0) and mixup_prob > 0:
            self.mixup = _RecordingMixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode="batch",
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )

    def smoothed(self, labels: torch.Tensor) -> torch.Tensor:
        """Smoothed one-hot targets (B, C): 1 - s + s/C on the label, s/C elsewhere (as timm, PyTorch)."""
        off = self.label_smoothing / self.num_classes
        targets = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        return targets.scatter_(1, labels.view(-1, 1), 1.0 - self.label_smoothing + off)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(images (B,3,H,W), soft targets (B,C), whether this batch was mixed)."""
        # Checked on the first batch only: the check syncs a GPU, and a wrong class count shows at once.
        if not self._labels_checked and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}) (the model's num_classes), got "
                f"{int(labels.min())}..{int(labels.max())}: build the model with the data's class count."
            )
        self._labels_checked = True
        # timm's Mixup pairs image i with image B-1-i, so it needs an even batch; an odd (last) batch
        # stays unmixed rather than failing.
        if self.mixup is None or not self.training or images.shape[0] % 2:
            return images, self.smoothed(labels), False
        # timm mixes in place; a copy keeps the caller's batch (e.g. a fixed visualisation batch) intact.
        images, targets = self.mixup(images.clone(), labels)
        return images, targets, self.mixup.last_lam != 1.0


@register_objective("supervised")
class Supervised(nn.Module):
    """Cross-entropy with label smoothing, mixup and cutmix (DeiT's recipe) on any classifier.

    Args:
        backbone: a classifier `nn.Module` with `num_classes` (our ViT, or any timm model).
        label_smoothing, mixup, cutmix, mixup_prob, mixup_switch_prob: the `supervised.*` config group;
            mixup / cutmix are Beta alphas (0 = off).
    forward(batch) -> {"loss", "top1"}; `top1` (on the batch) only when the batch was not mixed.
    """

    needs_labels: ClassVar[bool] = True
    transform: ClassVar[str] = "supervised"  # timm's RandAugment pipeline as DeiT
    config_groups: ClassVar[dict[str, type]] = {"supervised": SupervisedConfig}

    def __init__(
        self,
        backbone: nn.Module,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = classifier_classes(backbone)
        self.mix = MixTargets(self.num_classes, label_smoothing, mixup, cutmix, mixup_prob, mixup_switch_prob)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch["pixel_values"], require_labels(batch, "supervised")
        images, targets, mixed = self.mix(images, labels)
        logits = self.backbone(images)  # (B, C)
        out = {"loss": soft_target_cross_entropy(logits, targets)}
        if not mixed:
            out["top1"] = top1_accuracy(logits.detach(), labels)
        return out


def classifier_classes(model: nn.Module) -> int:
    """`model.num_classes`, checked: objectives with labels need a classification head."""
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(
            f"{type(model).__name__} has no classification head (num_classes={num_classes!r}): build it with "
            f"num_classes set to the data's class count (create_model(name, num_classes=...))."
        )
    return num_classes


def require_labels(batch: dict[str, torch.Tensor], objective: str) -> torch.Tensor:
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            f"the '{objective}' objective needs labels but the batch has none: choose data with a label "
            f"column (data.label_column) or a self-supervised objective such as objective.name=mae."
        )
    return labels
