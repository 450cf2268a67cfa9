"""Importing the published layouts: facebookresearch/mae (pretraining, released encoder, fine-tuned),
facebookresearch/deit (distilled) and Hugging Face ViTForImageClassification / ViTMAEForPreTraining.

The layouts come from `official_layouts.py` (written from the published code, not from our models). Each
is first checked against an independent implementation of its architecture (timm, transformers, the
transcribed models_mae.py), then filled with random tensors, saved the way its scripts save it,
imported, and compared with that implementation's forward. A renamed key must make the import fail.
Nothing is downloaded; full-size layouts are checked by keys and shapes only.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import official_layouts as L
from ssl_vit.interop import build_backbone, to_backbone_state_dict
from ssl_vit.models import create_backbone
from ssl_vit.objectives.mae import MAE

transformers = pytest.importorskip("transformers")

# ViT-nano's width and heads (a .pth file does not say its heads: they are read from the width), 2 blocks,
# 16 patches: the published names at a size that runs in milliseconds.
SMALL = L.ViTDims(embed_dim=128, depth=2, num_heads=4, patch_size=8, img_size=32)
SMALL_DECODER = (32, 2, 2)  # width, blocks, heads
ATOL = 1e-5
# How facebookresearch/mae's main_pretrain.py / main_finetune.py and DeiT's main.py fill the rest of a
# checkpoint (util/misc.py save_model): an optimizer state, the epoch, the AMP scaler and the argparse args.
PRETRAIN_ARGS = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True, blr=1.5e-4)
FINETUNE_ARGS = argparse.Namespace(model="vit_base_patch16", global_pool=True, nb_classes=10, layer_decay=0.65)
TRAINING_STATE = {
    "optimizer": {"state": {}, "param_groups": [{"lr": 2.4e-3, "betas": (0.9, 0.95), "params": [0, 1]}]},
    "epoch": 799,
    "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
}


def shapes(sd: dict[str, torch.Tensor]) -> L.Layout:
    return {k: tuple(v.shape) for k, v in sd.items()}


def images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def timm_vit(d: L.ViTDims, name: str = "vit_base_patch16_224", **kw) -> torch.nn.Module:
    """timm's class for the layout, at the fixture's size."""
    dims = dict(embed_dim=d.embed_dim, depth=d.depth, num_heads=d.num_heads, patch_size=d.patch_size)
    return timm.create_model(name, pretrained=False, img_size=d.img_size, **dims, **kw).eval()


def hf_config(cls, d: L.ViTDims, **kw):
    return cls(
        hidden_size=d.embed_dim, num_hidden_layers=d.depth, num_attention_heads=d.num_heads,
        intermediate_size=d.embed_dim * d.mlp_ratio, image_size=d.img_size, patch_size=d.patch_size, **kw,
    )


def hf_vitmae_config(d: L.ViTDims, decoder: tuple[int, int, int], **kw):
    width, depth, heads = decoder
    return hf_config(
        transformers.ViTMAEConfig, d, decoder_hidden_size=width, decoder_num_hidden_layers=depth,
        decoder_num_attention_heads=heads, decoder_intermediate_size=4 * width, **kw,
    )


def save_hf(folder: Path, sd: dict[str, torch.Tensor], config) -> Path:
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    return folder


def our_mae(spec: dict, decoder: tuple[int, int, int], backbone_sd: dict, decoder_sd: dict) -> MAE:
    width, depth, heads = decoder
    mae = MAE(create_backbone(**spec), decoder_dim=width, decoder_depth=depth, decoder_heads=heads, norm_pix_loss=True)
    mae.load_state_dict({**{"backbone." + k: v for k, v in backbone_sd.items()}, **decoder_sd}, strict=True)
    return mae.eval()


def write_checkpoint(tmp_path: Path, which: str, sd: dict[str, torch.Tensor]) -> Path:
    if which.startswith("hf_"):
        config = (
            hf_config(transformers.ViTConfig, SMALL, num_labels=10) if which == "hf_vit"
            else hf_vitmae_config(SMALL, SMALL_DECODER)
        )
        return save_hf(tmp_path / which, sd, config)
    torch.save({"model": sd}, tmp_path / f"{which}.pth")
    return tmp_path / f"{which}.pth"


def small_layout(which: str) -> L.Layout:
    return {
        "mae_pretrain": lambda: L.mae_pretrain(SMALL, SMALL_DECODER),
        "mae_encoder": lambda: L.mae_pretrain_encoder(SMALL),
        "mae_finetuned": lambda: L.mae_finetuned(SMALL, 10),
        "deit": lambda: L.deit_distilled(SMALL, 10),
        "hf_vit": lambda: L.hf_vit_for_image_classification(SMALL, 10),
        "hf_vitmae": lambda: L.hf_vitmae_for_pretraining(SMALL, SMALL_DECODER, 4 * 32),
    }[which]()


def renamed(sd: dict, old: str, new: str) -> dict:
    assert old in sd, f"{old} is not a key of the layout"
    return {(new if k == old else k): v for k, v in sd.items()}


# -- the layouts against independent implementations of their architectures (full size, meta device) --


def test_mae_pretrain_layout__is_the_state_dict_of_models_mae_built_on_timm_blocks():
    with torch.device("meta"):
        official = L.OfficialMAE(L.VIT_BASE_16, L.MAE_DECODER_512_8, norm_pix_loss=True)
    assert shapes(official.state_dict()) == L.mae_pretrain()
    assert len(L.mae_pretrain()) == 4 + 2 + 12 * 12 + 2 + 2 + 8 * 12 + 2 + 2


@pytest.mark.parametrize(
    "layout, name, kwargs",
    [
        (L.mae_pretrain_encoder, "vit_base_patch16_224", dict(num_classes=0)),
        (L.mae_finetuned, "vit_base_patch16_224", dict(global_pool="avg")),
        (L.deit_distilled, "deit_tiny_distilled_patch16_224", {}),
    ],
)
def test_timm_built_layouts__equal_timm_models_state_dict(layout, name, kwargs):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    assert shapes(model.state_dict()) == layout()


@pytest.mark.parametrize(
    "layout, model_cls, config",
    [
        (L.hf_vit_for_image_classification, "ViTForImageClassification", dict(num_labels=1000)),
        (L.hf_vitmae_for_pretraining, "ViTMAEForPreTraining", {}),
    ],
)
def test_hf_layouts_full_size__hold_as_many_weights_as_the_transformers_model(layout, model_cls, config):
    # transformers 5 renames layers in memory (q_proj, layers.N), so compare sizes here; names below.
    model_cls = getattr(transformers, model_cls)
    with torch.device("meta"):
        model = model_cls(model_cls.config_class(**config))
    assert sum(math.prod(s) for s in layout().values()) == sum(t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize("which", ["hf_vit", "hf_vitmae"])
def test_hf_layouts__load_into_transformers_with_no_missing_or_unexpected_key(tmp_path, which):
    cls = transformers.ViTForImageClassification if which == "hf_vit" else transformers.ViTMAEForPreTraining
    folder = write_checkpoint(tmp_path, which, L.random_tensors(small_layout(which)))
    _, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


# -- imported and compared with the original architecture's forward (random values) -------------------


def test_mae_pretrain_checkpoint__encoder_and_decoder_import_with_the_official_loss(tmp_path):
    sd = L.random_tensors(L.mae_pretrain(SMALL, SMALL_DECODER))
    sd["pos_embed"] = L.official_sincos(SMALL.embed_dim, 4)  # as models_mae.py initialises (and freezes) them
    sd["decoder_pos_embed"] = L.official_sincos(32, 4)
    official = L.OfficialMAE(SMALL, SMALL_DECODER, norm_pix_loss=True).eval()
    official.load_state_dict(sd, strict=True)
    torch.save({"model": sd, **TRAINING_STATE, "args": PRETRAIN_ARGS}, tmp_path / "checkpoint-799.pth")

    backbone_sd, info = to_backbone_state_dict(tmp_path / "checkpoint-799.pth")
    assert info.format == "mae" and info.has_mae_decoder and info.arch["num_classes"] == 0
    assert info.spec["pos_embed"] == "sincos"  # the fixed embedding is recognised and stays fixed
    ours = our_mae(info.spec, SMALL_DECODER, backbone_sd, info.decoder_state_dict)
    x, noise = images(32), torch.rand(2, SMALL.num_patches, generator=torch.Generator().manual_seed(1))
    encoder = timm_vit(SMALL, num_classes=0)
    encoder.load_state_dict({k: v for k, v in sd.items() if k in encoder.state_dict()}, strict=True)
    with torch.no_grad():
        close(ours({"pixel_values": x, "noise": noise})["loss"], official(x, noise))
        close(ours.backbone.forward_features(x), encoder.forward_features(x))


def test_mae_released_encoder_checkpoint__imports_as_mae_with_timm_features(tmp_path):
    sd = L.random_tensors(L.mae_pretrain_encoder(SMALL))
    torch.save({"model": sd}, tmp_path / "mae_pretrain_vit_base.pth")
    ours, info = build_backbone(tmp_path / "mae_pretrain_vit_base.pth")
    assert info.format == "mae" and not info.has_mae_decoder and info.arch["num_classes"] == 0
    reference = timm_vit(SMALL, num_classes=0)
    reference.load_state_dict(sd, strict=True)
    with torch.no_grad():
        close(ours.forward_features(images(32)), reference.forward_features(images(32)))


def test_mae_released_encoder__starts_a_global_pool_fine_tune_as_main_finetune_does(tmp_path):
    # main_finetune.py loads the pretrained encoder with strict=False: `norm` unused, `fc_norm` and `head` fresh.
    from ssl_vit.engine.checkpoint import load_backbone

    sd = L.random_tensors(L.mae_pretrain_encoder(SMALL))
    torch.save({"model": sd}, tmp_path / "mae_pretrain_vit_base.pth")
    model = load_backbone(tmp_path / "mae_pretrain_vit_base.pth", num_classes=10, global_pool="avg")
    reference = timm_vit(SMALL, global_pool="avg", num_classes=10)
    missing = reference.load_state_dict({k: v for k, v in sd.items() if not k.startswith("norm.")}, strict=False)
    assert set(missing.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    with torch.no_grad():
        reference.fc_norm.load_state_dict(model.fc_norm.state_dict())
        reference.head.load_state_dict(model.head.state_dict())
        close(model.eval()(images(32)), reference(images(32)))


def test_mae_finetuned_checkpoint__imports_with_global_pool_and_timm_logits(tmp_path):
    sd = L.random_tensors(L.mae_finetuned(SMALL, num_classes=10))
    torch.save({"model": sd, **TRAINING_STATE, "args": FINETUNE_ARGS}, tmp_path / "checkpoint-99.pth")
    ours, info = build_backbone(tmp_path / "checkpoint-99.pth")
    assert info.format == "mae" and info.spec["global_pool"] == "avg" and info.arch["num_classes"] == 10
    reference = timm_vit(SMALL, global_pool="avg", num_classes=10)
    reference.load_state_dict(sd, strict=True)
    with torch.no_grad():
        close(ours(images(32)), reference(images(32)))


def test_deit_tiny_distilled_checkpoint__imports_with_timm_logits_at_full_size(tmp_path):
    sd = L.random_tensors(L.deit_distilled())
    torch.save({"model": sd}, tmp_path / "deit_tiny_distilled_patch16_224-b40b3cf7.pth")  # as released
    ours, info = build_backbone(tmp_path / "deit_tiny_distilled_patch16_224-b40b3cf7.pth")
    assert info.format == "deit" and info.spec == {"name": "deit_tiny_distilled_patch16_224"}
    reference = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    reference.load_state_dict(sd, strict=True)
    with torch.no_grad():
        # eval: the two heads averaged, as DeiT infers. 12 random blocks: larger sums, a looser tolerance.
        close(ours(images(224)), reference(images(224)), atol=1e-4)


def test_hf_vit_for_image_classification__imports_with_transformers_logits(tmp_path):
    config = hf_config(transformers.ViTConfig, SMALL, num_labels=10)  # the Hub's LayerNorm eps, 1e-12
    folder = save_hf(tmp_path / "hf", L.random_tensors(L.hf_vit_for_image_classification(SMALL, 10)), config)
    reference = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    ours, info = build_backbone(folder)
    assert info.format == "hf-vit" and info.arch["num_heads_source"] == "config"
    x = images(32)
    with torch.no_grad():
        # LayerNorm eps 1e-12 there, 1e-6 in timm (the converter notes it): equal to ~1e-5
        close(ours.forward_features(x), reference.vit(x).last_hidden_state, atol=1e-4)
        close(ours(x), reference(x).logits, atol=1e-4)


def test_hf_vitmae_for_pretraining__imports_with_the_transformers_loss(tmp_path):
    config = hf_vitmae_config(SMALL, SMALL_DECODER, norm_pix_loss=True, layer_norm_eps=1e-6)
    layout = L.hf_vitmae_for_pretraining(SMALL, SMALL_DECODER, 4 * 32)
    folder = save_hf(tmp_path / "hf", L.random_tensors(layout), config)
    reference = transformers.ViTMAEForPreTraining.from_pretrained(folder).eval()
    backbone_sd, info = to_backbone_state_dict(folder)
    assert info.format == "hf-vitmae" and info.has_mae_decoder
    ours = our_mae(info.spec, SMALL_DECODER, backbone_sd, info.decoder_state_dict)
    x, noise = images(32), torch.rand(2, SMALL.num_patches, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(ours({"pixel_values": x, "noise": noise})["loss"], reference(pixel_values=x, noise=noise).loss)


# -- full size: keys and shapes only -----------------------------------------------------------------


def zeros_at_full_size(layout: L.Layout) -> dict[str, torch.Tensor]:
    """Full-size tensors without the memory: one zero seen at every index (torch.save keeps it one element)."""
    return {k: torch.zeros(()).expand(shape) for k, shape in layout.items()}


@pytest.mark.parametrize(
    "layout, name, num_classes",
    [
        (L.mae_pretrain, "vit_base_patch16_224", 0),
        (L.mae_pretrain_encoder, "vit_base_patch16_224", 0),
        (L.mae_finetuned, "vit_base_patch16_224", 1000),
        (L.deit_distilled, "deit_tiny_distilled_patch16_224", 1000),
    ],
)
def test_full_size_official_checkpoints__convert_to_the_named_backbone(tmp_path, layout, name, num_classes):
    torch.save({"model": zeros_at_full_size(layout())}, tmp_path / "checkpoint.pth")
    sd, info = to_backbone_state_dict(tmp_path / "checkpoint.pth")  # raises unless the keys fit exactly
    assert info.spec["name"] == name and info.arch["num_classes"] == num_classes
    if layout is L.mae_pretrain:
        with torch.device("meta"):
            mae = MAE(create_backbone(**info.spec), decoder_dim=512, decoder_depth=8, decoder_heads=16)
        decoder = {k: v for k, v in shapes(mae.state_dict()).items() if not k.startswith("backbone.")}
        assert shapes(info.decoder_state_dict) == decoder


@pytest.mark.parametrize("which", ["vit", "vitmae"])
def test_full_size_hf_checkpoints__convert_to_vit_base(tmp_path, which):
    if which == "vit":
        layout, config = L.hf_vit_for_image_classification(), transformers.ViTConfig(num_labels=1000)
    else:
        layout, config = L.hf_vitmae_for_pretraining(), transformers.ViTMAEConfig()
    (tmp_path / "hf").mkdir()
    torch.save(zeros_at_full_size(layout), tmp_path / "hf" / "pytorch_model.bin")  # the Hub's older file name
    config.to_json_file(str(tmp_path / "hf" / "config.json"))
    sd, info = to_backbone_state_dict(tmp_path / "hf")
    assert info.spec["name"] == "vit_base_patch16_224" and info.arch["num_heads"] == 12
    if which == "vitmae":
        assert len(info.decoder_state_dict) == 8 + 8 * 12  # decoder_pos_embed, mask_token, 3 layers x 2, 8 blocks


# -- a renamed key fails: the import, and the checks of the layouts themselves ------------------------

RENAMED = [  # (layout, key as published, the same key renamed)
    ("mae_pretrain", "decoder_pred.weight", "decoder_predict.weight"),
    ("mae_pretrain", "decoder_blocks.1.mlp.fc2.bias", "decoder_blocks.1.mlp.fc_2.bias"),
    ("mae_pretrain", "mask_token", "mask_embedding"),
    ("mae_pretrain", "blocks.0.attn.qkv.weight", "blocks.0.attn.in_proj.weight"),
    ("mae_encoder", "norm.weight", "encoder_norm.weight"),
    ("mae_finetuned", "fc_norm.bias", "fc_norm.beta"),
    ("deit", "head_dist.weight", "head_distill.weight"),
    ("deit", "dist_token", "distillation_token"),
    ("hf_vit", "vit.encoder.layer.1.attention.attention.key.bias", "vit.encoder.layer.1.attention.attention.k.bias"),
    ("hf_vit", "classifier.weight", "classifier.kernel"),
    ("hf_vitmae", "decoder.decoder_layers.0.layernorm_after.weight", "decoder.decoder_layers.0.layernorm_post.weight"),
    ("hf_vitmae", "vit.embeddings.position_embeddings", "vit.embeddings.pos_embed"),
]


@pytest.mark.parametrize("which, old, new", RENAMED, ids=[f"{w}:{o}" for w, o, _ in RENAMED])
def test_renamed_official_key__import_fails_naming_the_key(tmp_path, which, old, new):
    sd = L.random_tensors(small_layout(which))
    path = write_checkpoint(tmp_path, which, renamed(sd, old, new))
    with pytest.raises(ValueError) as err:
        build_backbone(path)
    assert old in str(err.value) or new in str(err.value), str(err.value)


@pytest.mark.parametrize("which", ["mae_pretrain", "mae_encoder", "mae_finetuned", "deit", "hf_vit", "hf_vitmae"])
def test_unrenamed_layouts__import_without_error(tmp_path, which):
    """The control for the test above: the same files with the published names import."""
    _, info = to_backbone_state_dict(write_checkpoint(tmp_path, which, L.random_tensors(small_layout(which))))
    assert info.has_mae_decoder == (which in ("mae_pretrain", "hf_vitmae"))


def test_renamed_key__is_caught_by_the_reference_implementations(tmp_path):
    """The checks of the layouts are not vacuous: timm, transformers and models_mae refuse a renamed key."""
    deit = renamed(L.random_tensors(small_layout("deit")), "head_dist.weight", "head_distill.weight")
    with pytest.raises(RuntimeError, match="head_dist"):
        timm_vit(SMALL, "deit_tiny_distilled_patch16_224", num_classes=10).load_state_dict(deit, strict=True)
    mae = renamed(L.random_tensors(L.mae_pretrain(SMALL, SMALL_DECODER)), "decoder_norm.bias", "decoder_norm.beta")
    with pytest.raises(RuntimeError, match="decoder_norm"):
        L.OfficialMAE(SMALL, SMALL_DECODER, norm_pix_loss=True).load_state_dict(mae, strict=True)
    hf = renamed(L.random_tensors(small_layout("hf_vit")), "vit.layernorm.weight", "vit.final_layernorm.weight")
    folder = write_checkpoint(tmp_path, "hf_vit", hf)
    _, info = transformers.ViTForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] and info["unexpected_keys"]
