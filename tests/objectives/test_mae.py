"""The MAE objective: visible-only encoding, masked-only loss, norm_pix target, reconstructions."""

from __future__ import annotations

import pytest
import torch

from ssl_vit.models import create_backbone
from ssl_vit.objectives import OBJECTIVES, build_objective
from ssl_vit.objectives.mae import MAE, MAEConfig
from ssl_vit.objectives.masking import patchify, unpatchify
from ssl_vit.viz.mae import reconstruct

IMG, PATCH = 16, 4  # a 4x4 grid: N = 16 patches
N = (IMG // PATCH) ** 2
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the data normalisation visualize undoes


def tiny_backbone(**overrides):
    kwargs = dict(depth=2, embed_dim=64, num_heads=2, img_size=IMG, pos_embed="sincos", num_classes=0)
    kwargs.update(overrides)
    return create_backbone("vit_nano_patch4_32", **kwargs)


def tiny_mae(**kwargs) -> MAE:
    torch.manual_seed(0)
    kw = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    kw.update(kwargs)
    return MAE(tiny_backbone(), **kw)


def batch(b=4, seed=0, noise=True):
    g = torch.Generator().manual_seed(seed)
    out = {"pixel_values": torch.randn(b, 3, IMG, IMG, generator=g)}
    if noise:
        out["noise"] = torch.rand(b, N, generator=g)
    return out


def test_mae__is_registered_with_the_runner_attributes_and_builds_from_its_config_group():
    from dataclasses import asdict

    mae = build_objective("mae", tiny_backbone(), **{**asdict(MAEConfig()), "decoder_dim": 32, "decoder_heads": 2})
    assert OBJECTIVES["mae"] is MAE and isinstance(mae, MAE)
    assert MAE.needs_labels is False and MAE.transform == "mae" and MAE.config_groups == {"mae": MAEConfig}
    assert len(mae.decoder_blocks) == MAEConfig().decoder_depth


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.2])
def test_mae__rejects_mask_ratio_outside_open_unit_interval(ratio):
    with pytest.raises(ValueError, match="mask_ratio must be strictly between 0 and 1"):
        MAE(tiny_backbone(), mask_ratio=ratio, decoder_dim=32, decoder_heads=2)


def test_mae__rejects_decoder_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="decoder_heads"):
        MAE(tiny_backbone(), decoder_dim=30, decoder_heads=4)


@pytest.mark.parametrize("ratio,keep", [(0.75, 4), (0.5, 8), (0.9, 2)])
def test_mae_encoder__sees_only_the_class_token_and_visible_patches(ratio, keep):
    mae = tiny_mae(mask_ratio=ratio)
    seen = []
    mae.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    mae(batch(b=3))
    assert seen == [(3, 1 + keep, 64)]


def test_mae_forward__returns_the_loss_and_the_mask_ratio():
    out = tiny_mae()(batch())
    assert set(out) == {"loss", "mask_ratio"}
    assert out["loss"].ndim == 0 and out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert out["mask_ratio"].item() == pytest.approx(0.75)


@pytest.mark.parametrize("ratio,keep", [(0.75, 4), (0.5, 8)])
def test_mae_forward__decoder_tail_runs_for_the_masked_patches_only(ratio, keep):
    """The last decoder block's MLP, the norm and the pixel head see the N - K masked tokens; the rest
    of the decoder every token."""
    mae = tiny_mae(mask_ratio=ratio, decoder_depth=2)
    seen = {}
    for name in ("decoder_blocks.0.mlp", "decoder_blocks.1.mlp", "decoder_pred"):
        mae.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[0].shape}))
    mae(batch(b=3))
    assert seen == {
        "decoder_blocks.0.mlp": (3, 1 + N, 32), "decoder_blocks.1.mlp": (3, N - keep, 32), "decoder_pred": (3, N - keep, 32)
    }


def test_mae_forward__loss_is_the_masked_mean_of_the_full_reconstruction():
    """MAE's forward_loss (models_mae.py) on `decode`'s prediction of every patch in patch order."""
    mae = tiny_mae(decoder_depth=2)
    x = batch(seed=4)
    latent, ids_restore, mask = mae.encode(x["pixel_values"], x["noise"])
    pred = mae.decode(latent, ids_restore)  # (B, N, p*p*3)
    per_patch = ((pred - mae.target(x["pixel_values"])) ** 2).mean(dim=-1)  # (B, N)
    expected = (per_patch * mask).sum() / mask.sum()
    torch.testing.assert_close(mae(x)["loss"], expected, rtol=1e-5, atol=1e-6)


def test_mae_forward__same_noise_same_loss_and_other_noise_another_loss():
    mae = tiny_mae()
    x = batch(seed=3)
    assert torch.equal(mae(x)["loss"], mae({k: v.clone() for k, v in x.items()})["loss"])
    other = dict(x, noise=torch.rand(4, N, generator=torch.Generator().manual_seed(9)))
    assert not torch.equal(mae(x)["loss"], mae(other)["loss"])


def test_mae_forward__without_noise_draws_a_fresh_mask_each_call():
    mae = tiny_mae()
    x = batch(noise=False)
    assert mae(x)["loss"].item() != mae(x)["loss"].item()


def test_mae_forward__rejects_noise_of_the_wrong_shape():
    with pytest.raises(ValueError, match="num_patches"):
        tiny_mae()(dict(batch(), noise=torch.rand(4, N + 1)))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss__ignores_visible_patch_pixels_in_the_target(norm_pix, monkeypatch):
    """With the encoder's output fixed, only masked patches' pixels can move the loss."""
    mae = tiny_mae(norm_pix_loss=norm_pix)
    latent = torch.randn(4, 1 + mae.num_keep, 64)
    monkeypatch.setattr(mae.backbone, "forward_features", lambda x, ids_keep=None: latent)
    x = batch(seed=5)
    mask = x["noise"].argsort(1).argsort(1) >= mae.num_keep  # (B, N) True where masked
    base = mae(x)["loss"]

    def perturb(which: torch.Tensor) -> dict:
        patches = patchify(x["pixel_values"], PATCH)
        patches = patches + 3.0 * which.unsqueeze(-1) * torch.randn_like(patches)
        return dict(x, pixel_values=unpatchify(patches, PATCH, (IMG // PATCH,) * 2))

    torch.testing.assert_close(mae(perturb(~mask))["loss"], base, rtol=0, atol=0)
    assert not torch.allclose(mae(perturb(mask))["loss"], base)


def test_mae_norm_pix_target__is_zero_mean_unit_std_per_patch():
    mae = tiny_mae(norm_pix_loss=True)
    images = torch.rand(2, 3, IMG, IMG) * 5 + 2
    target = mae.target(images)  # (B, N, p*p*3)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, N), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(-1), torch.ones(2, N), atol=1e-4, rtol=0)
    raw = tiny_mae(norm_pix_loss=False).target(images)
    torch.testing.assert_close(raw, patchify(images, PATCH))


def test_mae_backward__trains_encoder_and_decoder_but_not_the_fixed_positions():
    mae = tiny_mae()
    mae(batch())["loss"].backward()
    assert mae.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert mae.backbone.cls_token.grad.abs().sum() > 0
    assert mae.mask_token.grad.abs().sum() > 0 and mae.decoder_pred.weight.grad.abs().sum() > 0
    assert mae.backbone.pos_embed.grad is None
    assert "decoder_pos_embed" not in dict(mae.named_parameters())
    assert "decoder_pos_embed" in mae.state_dict()


def test_mae_init__follows_facebookresearch_mae():
    mae = tiny_mae()
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out)), zero biases, N(0, 0.02) tokens.
    w = mae.backbone.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5 and w.abs().max() > 0.8 * (6 / sum(w.shape)) ** 0.5
    assert torch.all(mae.backbone.blocks[0].mlp.fc1.bias == 0)
    pw = mae.backbone.patch_embed.proj.weight.flatten(1)
    assert pw.abs().max() <= (6 / sum(pw.shape)) ** 0.5
    assert 0.01 < mae.backbone.cls_token.std() < 0.04
    assert 0.005 < mae.mask_token.std() < 0.04


@pytest.mark.parametrize(
    "overrides,prefix",
    [(dict(class_token=False, global_pool="avg"), 0), (dict(distilled=True), 2)],
)
def test_mae__handles_backbones_with_other_numbers_of_prefix_tokens(overrides, prefix):
    torch.manual_seed(0)
    if overrides.get("distilled"):
        backbone = create_backbone("deit_nano_distilled_patch4_32", depth=2, embed_dim=64, num_heads=2,
                                   img_size=IMG, pos_embed="sincos", num_classes=0)
    else:
        backbone = tiny_backbone(**overrides)
    mae = MAE(backbone, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    assert mae.num_prefix_tokens == prefix and mae.decoder_pos_embed.shape == (1, prefix + N, 32)
    assert torch.isfinite(mae(batch())["loss"])


def test_mae_visualize__grid_of_four_columns_in_unit_range_with_visible_patches_pasted():
    mae = tiny_mae().train()
    x = batch(b=3, noise=False)
    images = mae.visualize(x, MEAN, STD)
    grid = images["mae_reconstruction"]
    side = 4 * IMG  # 16-pixel images are enlarged 4x to reach the 64-pixel minimum tile
    h = side + 1  # make_grid pads 1 pixel between and around tiles
    assert set(images) == {"mae_reconstruction"}
    assert grid.shape == (3, 3 * h + 1, 4 * h + 1)
    assert grid.min() >= 0 and grid.max() <= 1
    assert mae.training  # restored after visualising in eval mode
    tile = lambda r, c: grid[:, 1 + r * h : 1 + r * h + side, 1 + c * h : 1 + c * h + side]  # noqa: E731
    # Same fixed seed, same grid (comparable across epochs); pasted == original on visible pixels.
    torch.testing.assert_close(mae.visualize(x, MEAN, STD)["mae_reconstruction"], grid)
    original, masked, pasted = tile(0, 0), tile(0, 1), tile(0, 3)
    visible = (masked == original).all(0)
    assert 0 < visible.float().mean() < 0.5
    torch.testing.assert_close(pasted[:, visible], original[:, visible])


def test_mae_reconstruct__returns_images_and_pixel_mask_matching_the_noise():
    mae = tiny_mae(norm_pix_loss=False)
    x = batch(b=2)
    recon, pix_mask = reconstruct(mae, x["pixel_values"], x["noise"])
    assert recon.shape == (2, 3, IMG, IMG) and pix_mask.shape == (2, 1, IMG, IMG)
    patch_mask = patchify(pix_mask, PATCH)[..., 0]  # (B, N)
    expected = (x["noise"].argsort(1).argsort(1) >= mae.num_keep).float()
    torch.testing.assert_close(patch_mask, expected)


def test_mae_forward__under_bf16_autocast_computes_the_loss_in_fp32():
    mae = tiny_mae()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mae(batch())
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert mae.decoder_pred.weight.grad is not None
