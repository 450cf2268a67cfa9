"""The BEiT objective: cross-entropy on masked positions only (against a direct computation from the official
head's definition), the frozen tokenizer (no gradient, eval mode, unchanged after optimizer steps), masks
from the data pipeline, the error messages and the exported backbone in timm.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from ssl_vit.accepts import rule_of
from ssl_vit.config import ConfigError, PretrainConfig, load_config
from ssl_vit.data.config import DataConfig
from ssl_vit.engine.seeding import isolated_rng
from ssl_vit.models import create_backbone
from ssl_vit.objectives import OBJECTIVES, build_objective
from ssl_vit.objectives.beit import BEiT, BEiTConfig
from ssl_vit.objectives.vqkd import TokenizerError, VQKDTokenizer, l2norm

IMG, D, K = 16, 32, 16
N = (IMG // 4) ** 2
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_backbone(**overrides):
    kwargs = {"depth": 2, "embed_dim": D, "num_heads": 2, "img_size": IMG, "num_classes": 0}
    return create_backbone("vit_nano_patch4_32", **{**kwargs, **overrides})


def tiny_tokenizer(codes: int = K) -> VQKDTokenizer:
    torch.manual_seed(1)
    tok = VQKDTokenizer(tiny_backbone(), codes, 8)
    tok.codebook.copy_(l2norm(torch.randn(codes, 8)))
    return tok.eval()


def tiny_beit(**kw) -> BEiT:
    torch.manual_seed(0)
    cfg = {"codebook_size": K, "mask_ratio": 0.4, "min_block_patches": 2}
    return BEiT(tiny_backbone(), tokenizer=tiny_tokenizer(), **{**cfg, **kw})


def batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, N, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(N, generator=g)[:6]] = True
    return {"pixel_values": torch.randn(b, 3, IMG, IMG, generator=g), "mask": mask}


class FixedTokens(torch.nn.Module):
    """A stand-in tokenizer that returns given ids."""

    def __init__(self, ids: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("ids", ids)
        self.codebook_size = K

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ids


# -- registration and config ---------------------------------------------------------------------


def test_beit__is_registered_and_builds_from_its_config_group():
    cfg = {**dataclasses.asdict(BEiTConfig()), "tokenizer": tiny_tokenizer(), "codebook_size": K, "min_block_patches": 2}
    model = build_objective("beit", tiny_backbone(), **cfg)
    assert OBJECTIVES["beit"] is BEiT and isinstance(model, BEiT)
    assert BEiT.config_groups == {"beit": BEiTConfig} and BEiT.needs_labels is False
    c = BEiTConfig()
    assert (c.codebook_size, c.mask_ratio, c.min_block_patches, c.min_aspect) == (8192, 0.4, 16, 0.3)  # the paper's


def test_beit_config__every_numeric_field_declares_what_it_accepts_and_refuses_the_rest():
    for field in dataclasses.fields(BEiTConfig):
        if field.name in ("tokenizer", "train_tokenizer"):
            continue
        rule, meaning = rule_of(field)
        assert rule is not None and meaning, field.name
        assert rule.accepts(field.default), field.name
        for bad in rule.outside(field.type in (int, "int")):
            with pytest.raises(ConfigError, match=f"beit.{field.name}"):
                load_config(PretrainConfig, ["objective.name=beit", f"beit.{field.name}={bad}"])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"codebook_size": 32}, TokenizerError, "set beit.codebook_size=16"),
        ({"min_block_patches": 7}, ValueError, "more than the 6 patches masked"),
        ({"tokenizer": None}, TokenizerError, "beit.tokenizer"),
        ({"tokenizer": "/nonexistent/tok"}, TokenizerError, "recipes/beit_tokenizer.py"),
    ],
)
def test_beit__a_tokenizer_or_mask_that_cannot_fit_is_refused_naming_the_fix(kwargs, error, match):
    cfg = {"tokenizer": tiny_tokenizer(), "codebook_size": K, "min_block_patches": 2, **kwargs}
    with pytest.raises(error, match=match):
        BEiT(tiny_backbone(), **cfg)


def test_beit__a_tokenizer_of_another_patch_grid_is_refused():
    tok = VQKDTokenizer(tiny_backbone(img_size=32), K, 8)
    with pytest.raises(TokenizerError, match="same patch size and image size"):
        BEiT(tiny_backbone(), tokenizer=tok, codebook_size=K, min_block_patches=2)


# -- the loss ----------------------------------------------------------------------------------


def test_beit_loss__is_cross_entropy_of_the_head_on_masked_positions_only():
    model = tiny_beit().eval()
    b = batch()
    ids = torch.randint(0, K, (4, N), generator=torch.Generator().manual_seed(3))
    model.tokenizer = FixedTokens(ids)
    out = model(b)
    with torch.no_grad():
        feats = model.backbone.forward_features(b["pixel_values"], mask=b["mask"], mask_token=model.mask_token)
        logits = model.lm_head(feats[:, model.num_prefix_tokens :])  # (B, N, K): every position
    m = b["mask"]
    reference = F.cross_entropy(logits[m], ids[m])  # the official: labels = ids[bool_masked_pos]
    torch.testing.assert_close(out["loss"].detach(), reference)
    # Visible positions' targets do not matter; a masked one does.
    other = ids.clone()
    other[~m] = (other[~m] + 1) % K
    model.tokenizer = FixedTokens(other)
    torch.testing.assert_close(model(b)["loss"], out["loss"])
    other = ids.clone()
    other[m] = (other[m] + 1) % K
    model.tokenizer = FixedTokens(other)
    assert not torch.allclose(model(b)["loss"], out["loss"])
    assert out["mask_ratio"] == 6 / 16 and 0 <= out["mlm_acc"] <= 1


def test_beit_loss__gradient_flows_from_masked_positions_only_to_their_inputs():
    model = tiny_beit().train()
    b = batch(b=2)
    model(b)["loss"].backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_beit__tokenizer_is_frozen_no_grad_eval_mode_and_unchanged_after_steps():
    model = tiny_beit()
    before = {k: v.clone() for k, v in model.tokenizer.state_dict().items()}
    model.train()
    assert not model.tokenizer.training and model.backbone.training
    assert not any(p.requires_grad for p in model.tokenizer.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    backbone_before = model.backbone.patch_embed.proj.weight.clone()
    for step in range(3):
        loss = model(batch(seed=step))["loss"]
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.tokenizer.parameters())
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.tokenizer.state_dict().items())
    assert not torch.equal(model.backbone.patch_embed.proj.weight, backbone_before)
    assert not model.tokenizer.training


def test_beit__without_masks_in_the_batch_draws_block_masks_with_the_exact_count():
    model = tiny_beit()
    b = batch()
    del b["mask"]
    out = model(b)
    assert out["mask_ratio"] == 6 / 16 and torch.isfinite(out["loss"])


# -- masks in the data pipeline ------------------------------------------------------------------


def test_train_transform__paper_crop_and_a_per_sample_block_mask_seeded_like_the_crop():
    model = tiny_beit()
    transform = model.train_transform(DataConfig(image_size=IMG, mean=MEAN, std=STD))
    assert transform.crop.transforms[1].scale == (0.08, 1.0)  # the paper's crop
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8))
    with isolated_rng(7):
        a = transform(image)
    with isolated_rng(7):
        b = transform(image)
    with isolated_rng(8):
        c = transform(image)
    assert a["pixel_values"].shape == (3, IMG, IMG) and a["mask"].shape == (N,) and a["mask"].dtype == torch.bool
    assert int(a["mask"].sum()) == 6
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    masks = []
    for seed in range(20):
        with isolated_rng(seed):
            masks.append(tuple(transform(image)["mask"].tolist()))
    assert len(set(masks)) > 10 and c is not None


def test_train_transform__jitters_colour_first_as_data_augmentation_for_beit():
    """microsoft/unilm beit2 datasets.py DataAugmentationForBEiT: ColorJitter(0.4, 0.4, 0.4) on every image, then
    the flip and the crop; beit.color_jitter=0 leaves the colours alone."""
    data = DataConfig(image_size=IMG, mean=MEAN, std=STD)
    jitter = tiny_beit().train_transform(data).crop.transforms[0]
    official = T.ColorJitter(0.4, 0.4, 0.4)
    assert isinstance(jitter, T.ColorJitter)
    for key in ("brightness", "contrast", "saturation", "hue"):
        assert getattr(jitter, key) == getattr(official, key), key
    image = Image.fromarray(np.full((IMG, IMG, 3), 128, dtype=np.uint8))  # flat grey: only colour can change
    plain = tiny_beit(color_jitter=0.0).train_transform(data)
    assert not any(isinstance(t, T.ColorJitter) for t in plain.crop.transforms)
    jittered = tiny_beit().train_transform(data)
    with isolated_rng(0):
        means = {round(float(jittered(image)["pixel_values"].mean()), 4) for _ in range(5)}
    assert len(means) > 1 and len({round(float(plain(image)["pixel_values"].mean()), 4) for _ in range(5)}) == 1


# -- export --------------------------------------------------------------------------------------


def test_beit__exported_backbone_loads_into_timm_strictly_and_gives_its_features():
    model = tiny_beit().eval()
    bb = model.backbone
    name, kwargs = bb.timm_spec()
    twin = timm.create_model(name, pretrained=False, **kwargs).eval()
    twin.load_state_dict(bb.state_dict(), strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(bb.forward_features(x), twin.forward_features(x))
    own = {k for k in model.state_dict() if not k.startswith(("backbone.", "tokenizer."))}
    assert own == {"mask_token", "lm_head.weight", "lm_head.bias"}
