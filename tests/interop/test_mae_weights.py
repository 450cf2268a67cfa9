"""Official MAE weights: Hugging Face ViTMAE models load and give equal losses; our objective's split.

Every model here is randomly initialised and built locally: nothing is downloaded.
"""

from __future__ import annotations

import re

import pytest
import torch

import official_layouts as L
from ssl_vit.interop.mae_weights import (
    MAEWeightsError,
    hf_vitmae_to_ours,
    mae_official_to_ours,
    split_backbone_decoder,
)
from ssl_vit.models import create_backbone, sincos_pos_embed_2d
from ssl_vit.objectives.mae import MAE

transformers = pytest.importorskip("transformers")

IMG, PATCH, DIM, DEPTH, HEADS = 16, 4, 64, 2, 2
DEC_DIM, DEC_DEPTH, DEC_HEADS = 32, 2, 2
N = (IMG // PATCH) ** 2


def hf_model(norm_pix: bool, mask_ratio: float = 0.75, seed: int = 0, qkv_bias: bool = True):
    torch.manual_seed(seed)
    config = transformers.ViTMAEConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        image_size=IMG, patch_size=PATCH, decoder_hidden_size=DEC_DIM, decoder_num_hidden_layers=DEC_DEPTH,
        decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=4 * DEC_DIM, mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix, qkv_bias=qkv_bias,
        layer_norm_eps=1e-6,  # timm's (and MAE's) LayerNorm eps; HF's default is 1e-12
    )
    model = transformers.ViTMAEForPreTraining(config).eval()
    # transformers 5.x leaves a freshly built model's sin-cos tables at zero (its init marks the patch
    # projection initialised and skips them; Hub weights carry the values): run HF's own sin-cos init.
    model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    model.vit.embeddings.initialize_weights()
    model.decoder.initialize_weights(N)
    assert model.vit.embeddings.position_embeddings.abs().sum() > 0
    with torch.no_grad():  # HF zero-initialises LayerNorm/bias-free things less randomly: shake them all
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def our_mae(norm_pix: bool, mask_ratio: float = 0.75) -> MAE:
    backbone = create_backbone(
        "vit_nano_patch4_32", depth=DEPTH, embed_dim=DIM, num_heads=HEADS, img_size=IMG, pos_embed="sincos",
        num_classes=0,
    )
    return MAE(backbone, mask_ratio=mask_ratio, decoder_dim=DEC_DIM, decoder_depth=DEC_DEPTH,
               decoder_heads=DEC_HEADS, norm_pix_loss=norm_pix).eval()


def load_into(mae: MAE, backbone_sd: dict, decoder_sd: dict) -> MAE:
    mae.load_state_dict({**{"backbone." + k: v for k, v in backbone_sd.items()}, **decoder_sd}, strict=True)
    return mae


def to_hub_layout(sd: dict) -> dict:
    """transformers>=5 in-memory names -> the names saved in Hub checkpoints (transformers<5)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", k)
        k = k.replace("attention.q_proj", "attention.attention.query").replace(
            "attention.k_proj", "attention.attention.key").replace("attention.v_proj", "attention.attention.value")
        k = k.replace("attention.o_proj", "attention.output.dense")
        k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        out[k] = v
    return out


@pytest.mark.parametrize("norm_pix", [True, False])
def test_hf_vitmae_loss__equals_ours_with_imported_weights_and_same_noise(norm_pix):
    hf = hf_model(norm_pix)
    ours = load_into(our_mae(norm_pix), *hf_vitmae_to_ours(hf.state_dict()))
    g = torch.Generator().manual_seed(1)
    images, noise = torch.randn(3, 3, IMG, IMG, generator=g), torch.rand(3, N, generator=g)
    with torch.no_grad():
        theirs = hf(pixel_values=images, noise=noise)
        mine = ours({"pixel_values": images, "noise": noise})
        _, _, mask = ours.encode(images, noise)
    torch.testing.assert_close(mine["loss"], theirs.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(mask, theirs.mask)  # the same noise -> mask convention


def test_hf_vitmae_loss__equals_ours_from_the_hub_checkpoint_layout_without_qkv_bias():
    hf = hf_model(norm_pix=True, qkv_bias=False, seed=3)
    backbone_sd, decoder_sd = hf_vitmae_to_ours(to_hub_layout(hf.state_dict()))
    assert torch.all(backbone_sd["blocks.0.attn.qkv.bias"] == 0)
    ours = load_into(our_mae(True), backbone_sd, decoder_sd)
    images, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, N)
    with torch.no_grad():
        torch.testing.assert_close(
            ours({"pixel_values": images, "noise": noise})["loss"],
            hf(pixel_values=images, noise=noise).loss, rtol=0, atol=1e-5,
        )


def test_hf_vitmae_save_pretrained_file__loads_with_equal_loss(tmp_path):
    # transformers 5's save_pretrained names decoder blocks `decoder.decoder_encoder.layer.N`, not the
    # in-memory `decoder.decoder_layers.N`: files users save themselves must convert too.
    from safetensors.torch import load_file

    hf = hf_model(norm_pix=True, seed=5)
    hf.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    ours = load_into(our_mae(True), *hf_vitmae_to_ours(saved))
    images, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, N)
    with torch.no_grad():
        torch.testing.assert_close(
            ours({"pixel_values": images, "noise": noise})["loss"],
            hf(pixel_values=images, noise=noise).loss, rtol=0, atol=1e-5,
        )


def test_hf_sincos_positions__equal_ours_in_encoder_and_decoder():
    hf = hf_model(norm_pix=True)
    grid = (IMG // PATCH, IMG // PATCH)
    torch.testing.assert_close(hf.vit.embeddings.position_embeddings.detach(), sincos_pos_embed_2d(DIM, grid, 1))
    torch.testing.assert_close(hf.decoder.decoder_pos_embed.detach(), sincos_pos_embed_2d(DEC_DIM, grid, 1))
    mae = our_mae(True)
    torch.testing.assert_close(mae.backbone.pos_embed.detach(), hf.vit.embeddings.position_embeddings.detach())
    torch.testing.assert_close(mae.decoder_pos_embed, hf.decoder.decoder_pos_embed.detach())


def test_hf_patchify__has_our_patch_layout():
    from ssl_vit.objectives.masking import patchify

    hf = hf_model(norm_pix=False)
    images = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(patchify(images, PATCH), hf.patchify(images), rtol=0, atol=0)


def test_hf_encoder_only_vitmaemodel__gives_our_backbone_features():
    hf = hf_model(norm_pix=True, mask_ratio=0.0)  # ratio 0: HF keeps every patch
    encoder = transformers.ViTMAEModel(hf.config).eval()
    encoder.load_state_dict(hf.vit.state_dict())
    backbone_sd, decoder_sd = hf_vitmae_to_ours(to_hub_layout({"vit." + k: v for k, v in encoder.state_dict().items()}))
    assert decoder_sd == {}
    backbone = our_mae(True).backbone
    backbone.load_state_dict(backbone_sd, strict=True)
    images = torch.randn(2, 3, IMG, IMG)
    in_order = torch.arange(N, dtype=torch.float32).expand(2, N)  # sorted noise keeps patch order
    with torch.no_grad():
        theirs = encoder(pixel_values=images, noise=in_order).last_hidden_state
        torch.testing.assert_close(backbone.forward_features(images), theirs, rtol=0, atol=1e-5)
    # Bare ViTMAEModel keys (no "vit." prefix) convert the same way.
    bare, _ = hf_vitmae_to_ours(encoder.state_dict())
    assert bare.keys() == backbone_sd.keys()


def test_hf_vitmae_to_ours__names_unknown_keys():
    sd = hf_model(norm_pix=True).state_dict()
    sd["vit.pooler.dense.weight"] = torch.zeros(1)
    with pytest.raises(MAEWeightsError, match="pooler"):
        hf_vitmae_to_ours(sd)


def test_split_backbone_decoder__gives_our_backbone_and_the_official_decoder_keys():
    # The official layouts' imports are tested against that layout in test_official_layouts.py; here,
    # the other way round: our objective's own state splits into a timm backbone and MAE's decoder names.
    mae = our_mae(True)
    backbone_sd, decoder_sd = split_backbone_decoder(mae.state_dict())
    assert backbone_sd.keys() == mae.backbone.state_dict().keys()
    d = L.ViTDims(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, img_size=IMG)
    official = L.mae_pretrain(d, (DEC_DIM, DEC_DEPTH, DEC_HEADS))
    assert {k: tuple(v.shape) for k, v in decoder_sd.items()} == {
        k: v for k, v in official.items() if k not in L.mae_pretrain_encoder(d)
    }


def test_mae_official_to_ours__rejects_a_hugging_face_state_dict_with_a_hint():
    with pytest.raises(MAEWeightsError, match="hf_vitmae_to_ours"):
        mae_official_to_ours(hf_model(norm_pix=True).state_dict())
