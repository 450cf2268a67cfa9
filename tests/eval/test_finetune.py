"""Fine-tuning: a fresh head, layer-wise lr decay groups of the engine's optimizer match the formula."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import DataLoader

from ssl_vit.config import load_config
from ssl_vit.eval.config import FinetuneEvalConfig
from ssl_vit.eval.finetune import build_finetune_objective, fresh_head
from ssl_vit.models import create_backbone

TINY = ["model.name=vit_nano_patch4_32", "model.args.depth=3", "model.args.embed_dim=64", "model.args.num_heads=2",
        "data.image_size=16"]


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.tensor(i % 3)}


def _expected_layer(name: str, depth: int) -> int:
    """Written out independently of the engine: BEiT/MAE's rule for a ViT's parameter names."""
    name = name.removeprefix("backbone.")
    if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "dist_token"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


@pytest.mark.parametrize("layer_decay", [0.65, 0.75])
def test_finetune__engine_optimizer_groups_follow_layer_decay_formula(tmp_path, layer_decay):
    from ssl_vit.engine import Trainer

    cfg = load_config(FinetuneEvalConfig, [*TINY, f"output_dir={tmp_path}", f"optim.layer_decay={layer_decay}",
                                           "optim.blr=1e-3", "train.batch_size=4", "model.global_pool=avg"])
    objective = build_finetune_objective(cfg, num_classes=3, seed=0)
    trainer = Trainer(cfg, objective, DataLoader(_Images(), batch_size=4, drop_last=True))
    depth = 3
    seen = set()
    for group in trainer.optimizer.param_groups:
        for name in group["param_names"]:
            layer = _expected_layer(name, depth)
            assert group["lr_scale"] == pytest.approx(layer_decay ** (depth + 1 - layer)), name
            assert group["lr"] == pytest.approx(trainer.peak_lr * layer_decay ** (depth + 1 - layer)), name
            seen.add(layer)
            no_decay = name.endswith(("bias", "pos_embed", "cls_token")) or "norm" in name
            assert group["weight_decay"] == (0.0 if no_decay else cfg.optim.weight_decay), name
    assert seen == set(range(depth + 2))  # stem, every block, and the head/fc_norm on top
    assert trainer.peak_lr == pytest.approx(1e-3 * 4 / 256)


def test_finetune_objective__fresh_mae_initialised_head_avg_pool_and_drop_path():
    cfg = load_config(FinetuneEvalConfig, [*TINY, "model.global_pool=avg", "model.drop_path_rate=0.2"])
    objective = build_finetune_objective(cfg, num_classes=5, seed=0)
    backbone = objective.backbone
    assert backbone.num_classes == 5 and backbone.global_pool == "avg"
    assert isinstance(backbone.fc_norm, torch.nn.LayerNorm) and isinstance(backbone.norm, torch.nn.Identity)
    assert backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert backbone.head.weight.std().item() < 1e-4 and torch.all(backbone.head.bias == 0)
    again = build_finetune_objective(cfg, num_classes=5, seed=0).backbone
    assert torch.equal(backbone.head.weight, again.head.weight)  # seeded


def test_fresh_head__replaces_a_trained_head_of_the_same_size():
    model = create_backbone("vit_nano_patch4_32", depth=1, embed_dim=32, num_heads=2, img_size=16, num_classes=4)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    fresh_head(model, 4)
    assert model.head.weight.abs().max().item() < 1e-3


def _mae_run(folder, **spec):
    from ssl_vit.engine import save_backbone

    backbone = create_backbone("vit_nano_patch4_32", depth=3, embed_dim=64, num_heads=2, img_size=16, pos_embed="sincos", **spec)
    save_backbone(backbone, folder)
    return folder, backbone.pos_embed.detach().clone()


def _official_mae(folder):
    """A facebookresearch/mae pretrain checkpoint: {"model": encoder (timm names, fixed sin-cos pos_embed) + decoder}."""
    from ssl_vit.models import sincos_pos_embed_2d

    timm_vit = __import__("timm").create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=3, embed_dim=64, num_heads=2)
    state = timm_vit.state_dict()
    state["pos_embed"] = sincos_pos_embed_2d(64, (4, 4), 1)
    state.update({  # a decoder of no blocks: models_mae.py's other decoder keys
        "mask_token": torch.zeros(1, 1, 32), "decoder_pos_embed": sincos_pos_embed_2d(32, (4, 4), 1),
        "decoder_embed.weight": torch.zeros(32, 64), "decoder_embed.bias": torch.zeros(32),
        "decoder_norm.weight": torch.ones(32), "decoder_norm.bias": torch.zeros(32),
        "decoder_pred.weight": torch.zeros(4 * 4 * 3, 32), "decoder_pred.bias": torch.zeros(4 * 4 * 3),
    })
    folder.mkdir()
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("head.")}}, folder / "mae_pretrain.pth")
    return folder / "mae_pretrain.pth", state["pos_embed"]


def _timm_checkpoint(folder):
    from safetensors.torch import save_file

    timm_vit = __import__("timm").create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=3, embed_dim=64, num_heads=2)
    folder.mkdir()
    save_file(timm_vit.state_dict(), str(folder / "model.safetensors"))
    return folder / "model.safetensors", timm_vit.pos_embed.detach().clone()


@pytest.mark.parametrize("make", [_mae_run, _official_mae, _timm_checkpoint], ids=["mae_run", "official_mae", "timm"])
def test_finetune__learns_the_position_embedding_starting_from_the_checkpoints_values(tmp_path, make):
    from ssl_vit.engine import Trainer

    checkpoint, saved = make(tmp_path / "ckpt")
    cfg = load_config(FinetuneEvalConfig, [*TINY, f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'ft'}",
                                           "train.batch_size=4", "train.max_steps=2", "optim.warmup_epochs=0",
                                           "optim.blr=0.5", "train.save_every=0", "train.eval_every=0"])
    objective = build_finetune_objective(cfg, num_classes=3, seed=0)
    pos = objective.backbone.pos_embed
    assert pos.requires_grad and torch.equal(pos.detach(), saved)  # MAE's fixed sin-cos values, now learned
    Trainer(cfg, objective, DataLoader(_Images(), batch_size=4, drop_last=True)).fit()
    assert not torch.equal(objective.backbone.pos_embed.detach(), saved)
