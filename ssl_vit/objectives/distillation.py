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

import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_vit.objectives import register_objective
from ssl_vit.objectives.supervised import (
    MixTargets,
    classifier_classes,
    require_labels,
    soft_target_cross_entropy,
    top1_accuracy,
)

__all__ = [
    "DeiTDistillation",
    "TeacherError",
    "hard_distillation_loss",
    "has_checkpoint",
    "load_teacher",
    "soft_distillation_loss",
    "train_missing_teacher",
]

log = logging.getLogger(__name__)

DistillType = Literal["hard", "soft", "none"]


class TeacherError(ValueError):
    """A teacher that cannot be loaded or does not fit the student/data."""


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
# Teachers


def _checkpoint_files(path: Path) -> tuple[Path, Path]:
    """(weights, backbone.json) of a supervised-recipe run directory or its backbone.safetensors."""
    weights = path / "backbone.safetensors" if path.is_dir() or not path.suffix else path
    meta = weights.with_suffix(".json")
    if not weights.is_file() or not meta.is_file():
        raise TeacherError(
            f"teacher checkpoint '{path}' is incomplete: expected {weights} and {meta} as written by "
            f"recipes/supervised_pretrain.py: train the teacher first (python recipes/supervised_pretrain.py "
            f"output_dir=DIR model.name=resnet10t) or let recipes/deit_pretrain.py do it (distill.train_teacher)."
        )
    return weights, meta


def _load_checkpoint_teacher(path: Path) -> nn.Module:
    """A teacher saved by this suite (any architecture): rebuild it from backbone.json, load the weights."""
    from ssl_vit.interop.safe_load import load_tensor_file  # safetensors, or torch.load(weights_only=True)
    from ssl_vit.models import ViT, create_model, load_weights

    weights, meta = _checkpoint_files(path)
    spec = json.loads(meta.read_text()).get("model")
    if not isinstance(spec, dict) or "name" not in spec:
        raise TeacherError(f"{meta} has no 'model' spec ({{'name': ..., ...}}) to rebuild the teacher from.")
    model = create_model(**spec)
    state = load_tensor_file(weights)  # a truncated or unsafe file is a clear error naming it
    if isinstance(model, ViT):
        load_weights(model, state, strict=True)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise TeacherError(
                f"teacher weights {weights} do not fit {spec['name']} built from {meta}: missing "
                f"{missing[:8]}, unexpected {unexpected[:8]}."
            )
    return model


def _load_timm_teacher(name: str) -> nn.Module:
    """A timm model with its published weights (timm downloads them once into the Hugging Face cache)."""
    import timm

    if not timm.is_model(name):
        raise TeacherError(
            f"distill.teacher '{name}' is neither an existing checkpoint path nor a timm model name: give a "
            f"run directory (or backbone.safetensors) of recipes/supervised_pretrain.py, or a timm name "
            f"with published weights such as 'regnety_160.deit_in1k'."
        )
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:  # offline, no published weights, ... : all mean "no usable teacher"
        raise TeacherError(
            f"could not load the pretrained weights of timm model '{name}' ({type(err).__name__}: {err}). "
            f"Without network access, train a teacher with recipes/supervised_pretrain.py and set "
            f"distill.teacher to its output directory."
        ) from None


def load_teacher(source: str | Path | nn.Module) -> nn.Module:
    """The teacher as a frozen module in eval mode.

    Args:
        source: a module; a directory or `backbone.safetensors` written by the supervised recipe (the
            `backbone.json` beside it rebuilds the architecture); or a timm model name (published weights).
    """
    if isinstance(source, nn.Module):
        teacher = source
    else:
        path = Path(source)
        looks_like_path = path.exists() or len(path.parts) > 1 or path.suffix == ".safetensors"
        teacher = _load_checkpoint_teacher(path) if looks_like_path else _load_timm_teacher(str(source))
    teacher.requires_grad_(False)
    return teacher.eval()


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
        teacher: a module, a supervised-recipe run directory / backbone.safetensors, or a timm name.
        train_teacher: the supervised config `recipes/deit_pretrain.py` trains a missing teacher with
            (read by the recipe; here it only improves the error message).
        label_smoothing, mixup, cutmix, mixup_prob, mixup_switch_prob: the `supervised.*` group.
    forward(batch) -> {"loss", "loss_cls", "loss_dist", "teacher_agree"} plus, on unmixed batches,
    "top1" (heads averaged, as at eval) and "teacher_top1".
    """

    needs_labels: ClassVar[bool] = True
    transform: ClassVar[str] = "supervised"
    config_group: ClassVar[str | None] = "distill"
    # The runner merges these groups' fields into the constructor's kwargs (smoothing and mixup
    # apply to the class head exactly as in `Supervised`).
    config_groups: ClassVar[tuple[str, ...]] = ("supervised", "distill")

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
        feats = self.backbone.forward_features(images)  # (B, 2 + N, D)
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


# ---------------------------------------------------------------------------------------------------
# A teacher trained on the spot (recipes/deit_pretrain.py)


def has_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a run directory (or backbone.safetensors) with a complete teacher checkpoint."""
    path = Path(path)
    weights = path / "backbone.safetensors" if path.is_dir() or not path.suffix else path
    return weights.is_file() and weights.with_suffix(".json").is_file()


# Data keys a trained-on-the-spot teacher takes from its own config; all others come from the student's.
_TEACHER_AUGMENTATION = (
    "crop_scale_min",
    "interpolation",
    "hflip",
    "auto_augment",
    "reprob",
    "remode",
    "recount",
    "color_jitter",
    "repeated_aug",
)


def train_missing_teacher(cfg: Any) -> Any:
    """Before a DeiT run: train the teacher with the supervised recipe when its checkpoint is missing.

    `cfg` is a `PretrainConfig`. With `distill.train_teacher` (a supervised-recipe YAML) set and
    `distill.teacher` unset, the teacher goes to `<output_dir>/teacher`; with `distill.teacher` a
    directory that holds no checkpoint yet, it goes there. The teacher run takes this run's `data.*`
    (same images, classes, splits, normalisation) except the augmentation keys, and this run's `seed`;
    the rest comes from its YAML. A timm name or an existing checkpoint is left alone.
    Returns `cfg`, with `distill.teacher` set.
    """
    import copy
    import dataclasses

    distill = cfg.distill
    if distill.type == "none" or distill.train_teacher is None:
        return cfg
    if distill.teacher is None:
        distill.teacher = str(Path(cfg.output_dir) / "teacher")
    target = Path(distill.teacher)
    if not (target.exists() or len(target.parts) > 1) and _is_timm_name(distill.teacher):
        return cfg  # a timm name: the objective loads it with its published weights
    if has_checkpoint(target):
        _say(f"DeiT teacher: using the checkpoint in {target}")
        return cfg
    from ssl_vit.config import PretrainConfig, load_config
    from ssl_vit.engine import run_pretrain

    teacher_cfg = load_config(PretrainConfig, ["objective.name=supervised"], default_file=distill.train_teacher)
    teacher_cfg.output_dir = str(target)
    teacher_cfg.seed = cfg.seed
    # The student's data with the teacher's own augmentation: a teacher is trained to be right, the
    # student with DeiT's heavy augmentation (RandAugment, erasing, repeated aug).
    own_augmentation = {k: getattr(teacher_cfg.data, k) for k in _TEACHER_AUGMENTATION if hasattr(cfg.data, k)}
    teacher_cfg.data = dataclasses.replace(copy.deepcopy(cfg.data), **own_augmentation)
    _say(
        f"DeiT teacher: no checkpoint in {target}; training a {teacher_cfg.model.name} teacher there first "
        f"(supervised recipe, {distill.train_teacher}, on this run's data)"
    )
    summary = run_pretrain(teacher_cfg)
    if not has_checkpoint(target):
        raise TeacherError(f"the teacher run finished but wrote no backbone.safetensors/backbone.json in {target}.")
    accuracy = f", eval top-1 {summary['top1']:.2f}%" if "top1" in summary else ""
    _say(f"DeiT teacher ready in {target}{accuracy}; now distilling into {cfg.model.name}")
    return cfg


def _say(message: str) -> None:
    """One line in the run's log (the main process only, as the trainer's own lines)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    log.info(message)
    # The CPU flag as Accelerator reads it: a plain PartialState() first would make every process a world of one.
    if PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).is_main_process:
        print(f"[ssl_vit] {message}", flush=True)


def _is_timm_name(name: str) -> bool:
    import timm

    return timm.is_model(name)
