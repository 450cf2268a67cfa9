"""The supervised objective: smoothed / mixed soft targets, top-1 reporting, any timm classifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_vit.models import create_backbone, create_model
from ssl_vit.objectives import build_objective, get_objective
from ssl_vit.objectives.supervised import MixTargets, Supervised, SupervisedConfig, soft_target_cross_entropy

NUM_CLASSES = 5


def tiny_vit(num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    return create_backbone(
        "vit_nano_patch4_32", depth=1, embed_dim=32, num_heads=2, img_size=16, num_classes=num_classes
    )


def batch(b: int = 8, num_classes: int = NUM_CLASSES, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(b, 3, 16, 16, generator=g),
        "labels": torch.randint(0, num_classes, (b,), generator=g),
    }


def test_registry__builds_supervised_with_its_contract() -> None:
    objective = build_objective("supervised", tiny_vit(), label_smoothing=0.0)
    assert isinstance(objective, Supervised)
    assert get_objective("supervised").needs_labels is True
    assert Supervised.transform == "supervised" and Supervised.config_groups == {"supervised": SupervisedConfig}


def test_smoothed_targets__sum_to_one_and_put_the_rest_on_the_label() -> None:
    mix = MixTargets(NUM_CLASSES, label_smoothing=0.1)
    labels = torch.tensor([0, 3, 4])
    targets = mix.smoothed(labels)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(3))
    assert torch.allclose(targets[torch.arange(3), labels], torch.tensor(0.9 + 0.1 / NUM_CLASSES))
    assert torch.allclose(targets[0, 1:], torch.tensor(0.1 / NUM_CLASSES))


def test_loss__equals_pytorch_cross_entropy_with_label_smoothing() -> None:
    torch.manual_seed(0)
    objective = Supervised(tiny_vit(), label_smoothing=0.1)
    b = batch()
    out = objective(b)
    expected = F.cross_entropy(objective.backbone(b["pixel_values"]), b["labels"], label_smoothing=0.1)
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_targets__sum_to_one_and_mix_two_labels(mixup: float, cutmix: float) -> None:
    mix = MixTargets(NUM_CLASSES, label_smoothing=0.1, mixup=mixup, cutmix=cutmix, mixup_prob=1.0)
    images = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    mixed_images, targets, mixed = mix(images, labels)
    assert mixed
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    assert not torch.equal(mixed_images, images)
    # Image i is mixed with image B-1-i, so its target puts weight on both of their labels.
    on_label = targets[torch.arange(6), labels] + targets[torch.arange(6), labels.flip(0)]
    assert (on_label > 0.9).all()


def test_mixup__leaves_the_callers_batch_untouched() -> None:
    mix = MixTargets(NUM_CLASSES, mixup=0.8, cutmix=1.0)
    images = torch.randn(4, 3, 16, 16)
    before = images.clone()
    mix(images, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(images, before)


def test_mixed_batch__has_no_top1_and_unmixed_batch_has_it() -> None:
    torch.manual_seed(0)
    mixing = Supervised(tiny_vit(), mixup=0.8, cutmix=1.0, mixup_prob=1.0).train()
    assert set(mixing(batch())) == {"loss"}
    plain = Supervised(tiny_vit()).train()
    out = plain(batch())
    assert set(out) == {"loss", "top1"} and 0.0 <= float(out["top1"]) <= 1.0


def test_eval_mode_and_odd_batches__are_never_mixed() -> None:
    objective = Supervised(tiny_vit(), mixup=0.8, cutmix=1.0)
    assert "top1" in objective.eval()(batch())
    assert "top1" in objective.train()(batch(b=7))


def test_top1__counts_correct_rows() -> None:
    class Fixed(torch.nn.Module):
        num_classes = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])

    out = Supervised(Fixed())({"pixel_values": torch.zeros(4, 3, 2, 2), "labels": torch.tensor([0, 1, 0, 1])})
    assert float(out["top1"]) == pytest.approx(0.5)


def test_supervised__trains_a_timm_resnet() -> None:
    torch.manual_seed(0)
    resnet = create_model("test_resnet", num_classes=NUM_CLASSES)
    objective = Supervised(resnet, label_smoothing=0.0).train()
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=3e-3)
    b = batch(b=16)
    first = float(objective(b)["loss"].detach())
    for _ in range(15):
        loss = objective(b)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(objective(b)["loss"].detach()) < 0.5 * first


def test_soft_target_cross_entropy__is_float32_under_half_precision_logits() -> None:
    logits = torch.randn(4, NUM_CLASSES).bfloat16()
    targets = F.one_hot(torch.tensor([0, 1, 2, 3]), NUM_CLASSES).float()
    assert soft_target_cross_entropy(logits, targets).dtype == torch.float32


def test_errors__name_the_fix() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        Supervised(tiny_vit(num_classes=0))
    objective = Supervised(tiny_vit())
    with pytest.raises(ValueError, match="needs labels"):
        objective({"pixel_values": torch.randn(2, 3, 16, 16)})
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        objective({"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 7])})
    with pytest.raises(ValueError, match="label_smoothing"):
        Supervised(tiny_vit(), label_smoothing=1.0)
    with pytest.raises(ValueError, match="mixup"):
        Supervised(tiny_vit(), mixup=-1.0)
