"""DeiT distillation: hard / soft / none losses, the frozen teacher, timm compatibility of the student."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

from ssl_vit.models import create_backbone, create_model
from ssl_vit.objectives import build_objective
from ssl_vit.engine.teacher import TeacherError, load_teacher
from ssl_vit.objectives.distillation import DeiTDistillation, DistillConfig, soft_distillation_loss
from ssl_vit.objectives.supervised import SupervisedConfig

NUM_CLASSES = 4


def student(num_classes: int = NUM_CLASSES) -> nn.Module:
    return create_backbone(
        "deit_nano_distilled_patch4_32", depth=1, embed_dim=32, num_heads=2, img_size=16, num_classes=num_classes
    )


def bn_teacher(num_classes: int = NUM_CLASSES) -> nn.Module:
    """A timm convnet with BatchNorm, so running statistics would move if it ever ran in train mode."""
    return create_model("test_resnet", num_classes=num_classes)


def batch(b: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(b, 3, 16, 16, generator=g),
        "labels": torch.randint(0, NUM_CLASSES, (b,), generator=g),
    }


class FixedStudent(nn.Module):
    """A 'distilled backbone' with fixed head outputs; it records the images it saw."""

    distilled = True

    def __init__(self, cls_logits: torch.Tensor, dist_logits: torch.Tensor) -> None:
        super().__init__()
        self.num_classes = cls_logits.shape[1]
        self.register_buffer("cls_logits", cls_logits)
        self.register_buffer("dist_logits", dist_logits)
        self.seen: torch.Tensor | None = None

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x

    def forward_distill_heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_logits, self.dist_logits


class FixedTeacher(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.num_classes = logits.shape[1]
        self.register_buffer("logits", logits)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.logits[: x.shape[0]]


def test_registry__builds_deit_with_its_contract() -> None:
    objective = build_objective("deit", student(), type="none")
    assert isinstance(objective, DeiTDistillation)
    assert DeiTDistillation.needs_labels and DeiTDistillation.transform == "supervised"
    assert DeiTDistillation.config_groups == {"supervised": SupervisedConfig, "distill": DistillConfig}


def test_hard_loss__equals_the_hand_computed_value() -> None:
    cls_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    dist_logits = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    teacher_logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, 3.0, 1.0]])  # teacher says classes 2 and 1
    labels = torch.tensor([0, 2])
    objective = DeiTDistillation(
        FixedStudent(cls_logits, dist_logits), type="hard", teacher=FixedTeacher(teacher_logits), label_smoothing=0.0
    )
    out = objective({"pixel_values": torch.zeros(2, 3, 4, 4), "labels": labels})
    e = math.e
    ce_cls = [math.log(e**2 + 2) - 2, math.log(2 + e)]  # -log softmax at labels 0 and 2
    ce_dist = [math.log(2 + e) - 1, math.log(2 * e + 1) - 1]  # -log softmax at teacher classes 2 and 1
    expected = 0.5 * sum(ce_cls) / 2 + 0.5 * sum(ce_dist) / 2
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(out["loss_cls"]) == pytest.approx(sum(ce_cls) / 2, rel=1e-6)
    assert float(out["teacher_top1"]) == pytest.approx(0.0)  # teacher predicts 2, 1; labels are 0, 2
    assert float(out["teacher_agree"]) == pytest.approx(0.5)  # dist head picks 2 (agrees), then 0 (not 1)


@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0])
def test_soft_loss__scales_with_tau_squared(tau: float) -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    # Scaling both logits by tau makes the tempered distributions those at tau=1, so only tau^2 remains.
    scaled = soft_distillation_loss(s * tau, t * tau, tau)
    torch.testing.assert_close(scaled, tau**2 * soft_distillation_loss(s, t, 1.0))


def test_soft_loss__is_the_kl_divergence_and_zero_when_student_matches_teacher() -> None:
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p = torch.softmax(t, -1)[0]
    q = torch.softmax(s, -1)[0]
    kl = float((p * (p / q).log()).sum())
    assert float(soft_distillation_loss(s, t, 1.0)) == pytest.approx(kl, rel=1e-6)
    assert float(soft_distillation_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_soft_objective__weighs_class_and_distillation_losses_by_alpha() -> None:
    cls_logits, dist_logits = torch.randn(4, NUM_CLASSES), torch.randn(4, NUM_CLASSES)
    teacher = FixedTeacher(torch.randn(4, NUM_CLASSES))
    fixed = FixedStudent(cls_logits, dist_logits)
    objective = DeiTDistillation(fixed, type="soft", alpha=0.3, tau=2.0, teacher=teacher)
    out = objective(batch(b=4))
    expected = 0.7 * out["loss_cls"] + 0.3 * soft_distillation_loss(dist_logits, teacher.logits, 2.0)
    torch.testing.assert_close(out["loss"], expected)


def test_type_none__needs_no_teacher_and_trains_both_heads_on_the_labels() -> None:
    objective = DeiTDistillation(student(), type="none", label_smoothing=0.0)
    assert objective.teacher is None
    out = objective(batch())
    torch.testing.assert_close(out["loss"], (out["loss_cls"] + out["loss_dist"]) / 2)
    assert "teacher_agree" not in out


def test_teacher__gets_no_gradient_and_keeps_eval_mode_and_bn_statistics() -> None:
    torch.manual_seed(0)
    teacher = bn_teacher()
    teacher.train()  # load_teacher must switch it to eval
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = DeiTDistillation(student(), type="hard", teacher=teacher, mixup=0.8, cutmix=1.0)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in trainable}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(3):
        objective.eval()
        objective.train()  # what a trainer does after evaluating: must not flip the teacher
        loss = objective(batch(seed=step))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert objective.training and objective.backbone.training and not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():  # weights, BN running stats, num_batches_tracked
        assert torch.equal(value, before[key]), key


def test_teacher__sees_the_same_mixed_images_as_the_student() -> None:
    fixed = FixedStudent(torch.randn(8, NUM_CLASSES), torch.randn(8, NUM_CLASSES))
    teacher = FixedTeacher(torch.randn(8, NUM_CLASSES))
    objective = DeiTDistillation(fixed, teacher=teacher, mixup=0.8, cutmix=1.0).train()
    b = batch()
    out = objective(b)
    assert fixed.seen is teacher.seen
    assert not torch.equal(fixed.seen, b["pixel_values"])  # mixed, so no top-1 on this batch
    assert "top1" not in out and "teacher_top1" not in out


def test_student__loads_strictly_into_timm_deit_distilled_with_equal_eval_logits() -> None:
    torch.manual_seed(0)
    objective = DeiTDistillation(student(), type="hard", teacher=bn_teacher())
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=0.1)
    objective(batch())["loss"].backward()  # one step, so both heads differ from their initialisation
    optimizer.step()
    backbone = objective.backbone.eval()
    name, kwargs = backbone.timm_spec()
    assert name == "deit_tiny_distilled_patch16_224"
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    reference.load_state_dict(backbone.state_dict(), strict=True)
    x = batch()["pixel_values"]
    with torch.no_grad():
        ours, theirs = backbone(x), reference(x)
        cls_logits, dist_logits = backbone.forward_distill_heads(backbone.forward_features(x))
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, (cls_logits + dist_logits) / 2)


def write_run_dir(model: nn.Module, path: Path) -> Path:
    """What the supervised recipe leaves behind: backbone.safetensors + backbone.json with the spec."""
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "backbone.safetensors"))
    (path / "backbone.json").write_text(json.dumps({"model": model.spec, "objective": "supervised", "step": 1}))
    return path


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_load_teacher__rebuilds_any_architecture_from_a_supervised_run(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    if arch == "resnet":
        model = bn_teacher()
    else:
        model = create_backbone("vit_nano_patch4_32", depth=1, embed_dim=32, num_heads=2, img_size=16, num_classes=4)
    with torch.no_grad():  # non-default BN statistics, so a forgotten buffer would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    run = write_run_dir(model.eval(), tmp_path / "teacher")
    x = batch()["pixel_values"]
    for source in (run, run / "backbone.safetensors", str(run)):
        teacher = load_teacher(source)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            torch.testing.assert_close(teacher(x), model(x))


def test_teacher_with_another_class_count__is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="teacher predicts 10 classes but the student/data have 4"):
        DeiTDistillation(student(), teacher=bn_teacher(num_classes=10))
    run = write_run_dir(bn_teacher(num_classes=10), tmp_path / "teacher10")
    with pytest.raises(TeacherError, match="10 classes"):
        build_objective("deit", student(), teacher=str(run))


def test_teacher_errors__name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="needs a teacher"):
        DeiTDistillation(student(), type="hard", teacher=None)
    with pytest.raises(TeacherError, match="supervised_pretrain.py"):
        load_teacher(tmp_path / "missing_run")
    with pytest.raises(TeacherError, match="neither an existing checkpoint path nor a timm model"):
        load_teacher("no_such_model_anywhere")


def test_non_distilled_student__is_a_clear_error() -> None:
    plain = create_backbone("vit_nano_patch4_32", depth=1, embed_dim=32, num_heads=2, img_size=16, num_classes=4)
    with pytest.raises(ValueError, match="deit_tiny_distilled_patch4_32"):
        DeiTDistillation(plain, type="none")


def test_train_missing_teacher__trains_on_the_students_data_with_the_teachers_augmentation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    import ssl_vit.engine.teacher
    from ssl_vit.config import PretrainConfig, load_config
    from ssl_vit.engine.teacher import train_missing_teacher

    teacher_yaml = tmp_path / "teacher.yaml"
    teacher_yaml.write_text(
        yaml.safe_dump(
            {"model": {"name": "test_resnet"}, "data": {"name": "elsewhere", "auto_augment": None, "repeated_aug": 1}}
        )
    )
    runs = []

    def fake_run(cfg):  # stands in for the engine: records the config, writes a checkpoint
        runs.append(cfg)
        write_run_dir(bn_teacher(10), Path(cfg.output_dir))
        return {"top1": 50.0}

    monkeypatch.setattr(ssl_vit.engine.teacher, "run_pretrain", fake_run)
    argv = [
        "objective.name=deit",
        f"output_dir={tmp_path / 'student'}",
        f"distill.train_teacher={teacher_yaml}",
        "seed=7",
        "data.synthetic_train_size=64",
        "data.repeated_aug=3",
        "data.auto_augment=rand-m9-mstd0.5-inc1",
    ]
    cfg = train_missing_teacher(load_config(PretrainConfig, argv))
    assert cfg.distill.teacher == str(tmp_path / "student" / "teacher")
    (teacher_cfg,) = runs
    assert teacher_cfg.objective.name == "supervised" and teacher_cfg.model.name == "test_resnet"
    assert teacher_cfg.output_dir == cfg.distill.teacher and teacher_cfg.seed == 7
    assert teacher_cfg.data.name == "synthetic" and teacher_cfg.data.synthetic_train_size == 64  # the student's
    assert teacher_cfg.data.repeated_aug == 1 and teacher_cfg.data.auto_augment is None  # the teacher's own
    train_missing_teacher(cfg)  # the checkpoint exists now: nothing is trained again
    assert len(runs) == 1
    cfg.distill.teacher, cfg.distill.train_teacher = "resnet18", str(teacher_yaml)
    train_missing_teacher(cfg)  # a timm name is the objective's business
    assert len(runs) == 1
