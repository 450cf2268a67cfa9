"""The VQ-KD tokenizer objective (BEiT v2): the quantizer against a transcription of the official
`NormEMAVectorQuantizer` (microsoft/unilm beit2/norm_ema_quantizer.py), the cosine loss against the
official `calculate_rec_loss`, the frozen teacher, the usage metric and the saved tokenizer.

The transcription keeps the official forward (training, single process, `kmeans_init=False`); einops'
rearranges are written as permutes, `all_reduce_fn` is the identity of a single process.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F

from ssl_vit.accepts import rule_of
from ssl_vit.config import ConfigError, PretrainConfig, load_config
from ssl_vit.engine.teacher import TeacherError
from ssl_vit.models import create_backbone
from ssl_vit.objectives import OBJECTIVES, build_objective
from ssl_vit.objectives.vqkd import (
    VQKD,
    NormEMAQuantizer,
    VQKDConfig,
    VQKDTokenizer,
    teacher_patch_features,
    tokenizer_state,
)

IMG, D = 16, 32


def tiny_backbone(**overrides):
    kwargs = {"depth": 2, "embed_dim": D, "num_heads": 2, "img_size": IMG, "num_classes": 0}
    return create_backbone("vit_nano_patch4_32", **{**kwargs, **overrides})


def tiny_vqkd(teacher=None, **kw) -> VQKD:
    torch.manual_seed(0)
    teacher = teacher if teacher is not None else tiny_backbone(embed_dim=24, num_heads=2)
    cfg = {"codebook_size": 16, "codebook_dim": 8, "decoder_depth": 1, "usage_window": 3}
    return VQKD(tiny_backbone(), teacher=teacher, **{**cfg, **kw})


def images(b=4, seed=0):
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


# -- the official quantizer, transcribed -------------------------------------------------------


def l2norm(t):
    return F.normalize(t, p=2, dim=-1)


def ema_inplace(moving_avg, new, decay):
    moving_avg.data.mul_(decay).add_(new, alpha=(1 - decay))


def norm_ema_inplace(moving_avg, new, decay):
    moving_avg.data.mul_(decay).add_(new, alpha=(1 - decay))
    moving_avg.data.copy_(l2norm(moving_avg.data))


def official_quantize(z, weight, cluster_size, num_tokens, codebook_dim, beta, decay):
    """NormEMAVectorQuantizer.forward in training mode; z (b, c, h, w); updates weight, cluster_size in place."""
    z = z.permute(0, 2, 3, 1)  # 'b c h w -> b h w c'
    z = l2norm(z)
    z_flattened = z.reshape(-1, codebook_dim)
    d = z_flattened.pow(2).sum(dim=1, keepdim=True) + weight.pow(2).sum(dim=1) - 2 * torch.einsum(
        "bd,nd->bn", z_flattened, weight
    )
    encoding_indices = torch.argmin(d, dim=1)
    z_q = F.embedding(encoding_indices, weight).view(z.shape)
    encodings = F.one_hot(encoding_indices, num_tokens).type(z.dtype)
    bins = encodings.sum(0)
    ema_inplace(cluster_size, bins, decay)
    zero_mask = bins == 0
    bins = bins.masked_fill(zero_mask, 1.0)
    embed_sum = z_flattened.t() @ encodings
    embed_normalized = (embed_sum / bins.unsqueeze(0)).t()
    embed_normalized = l2norm(embed_normalized)
    embed_normalized = torch.where(zero_mask[..., None], weight, embed_normalized)
    norm_ema_inplace(weight, embed_normalized, decay)
    loss = beta * F.mse_loss(z_q.detach(), z)
    z_q = z + (z_q - z).detach()
    z_q = z_q.permute(0, 3, 1, 2)  # 'b h w c -> b c h w'
    return z_q, loss, encoding_indices


def test_quantizer__equals_the_official_norm_ema_quantizer_over_steps():
    torch.manual_seed(0)
    ours = NormEMAQuantizer(32, 8, decay=0.9, beta=1.0, kmeans_init=False).train()
    weight, cluster = ours.codebook.clone(), torch.zeros(32)
    for step in range(5):
        z = torch.randn(3, 4, 4, 8, generator=torch.Generator().manual_seed(step), requires_grad=True)  # (B, h, w, d)
        z_q, loss, ids = ours(z.view(3, 16, 8))
        z_ref = z.detach().clone().permute(0, 3, 1, 2).requires_grad_(True)  # (B, d, h, w)
        zq_ref, loss_ref, ids_ref = official_quantize(z_ref, weight, cluster, 32, 8, 1.0, 0.9)
        assert torch.equal(ids.reshape(-1), ids_ref), step
        torch.testing.assert_close(z_q.view(3, 4, 4, 8), zq_ref.permute(0, 2, 3, 1))
        torch.testing.assert_close(loss, loss_ref)
        torch.testing.assert_close(ours.codebook, weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.cluster_size, cluster)
    # Straight-through: the gradient reaches the encoder's vectors.
    z = torch.randn(2, 16, 8, requires_grad=True)
    z_q, loss, _ = ours(z)
    (z_q.sum() + loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_quantizer__kmeans_init_spreads_the_codes_over_the_first_batch():
    torch.manual_seed(0)
    q = NormEMAQuantizer(16, 8, kmeans_init=True).train()
    z = torch.randn(4, 64, 8) + 3.0  # data in one corner of the sphere: random codes would mostly lose
    q(z)
    assert bool(q.initted) and q.usage() >= 0.75
    torch.testing.assert_close(q.codebook.norm(dim=-1), torch.ones(16))


def test_quantizer__eval_mode_leaves_the_codebook_alone():
    q = NormEMAQuantizer(16, 8, kmeans_init=False).eval()
    before = q.codebook.clone()
    q(torch.randn(2, 16, 8))
    assert torch.equal(q.codebook, before) and q.window_counts.sum() == 0


# -- the objective -----------------------------------------------------------------------------


def test_vqkd__is_registered_and_its_config_fields_declare_their_rules():
    model = build_objective("vqkd", tiny_backbone(), **{**dataclasses.asdict(VQKDConfig()), "teacher": tiny_backbone(),
                                                       "codebook_size": 16, "decoder_depth": 1})
    assert isinstance(model, VQKD) and OBJECTIVES["vqkd"] is VQKD
    assert (VQKDConfig().codebook_size, VQKDConfig().codebook_dim, VQKDConfig().decay) == (8192, 32, 0.99)  # the paper's
    for field in dataclasses.fields(VQKDConfig):
        rule, meaning = rule_of(field)
        if field.name in ("teacher", "train_teacher", "kmeans_init"):  # paths and a switch: no numeric rule
            continue
        assert rule is not None and meaning, field.name
        assert rule.accepts(field.default), field.name
        for bad in rule.outside(field.type in (int, "int")):
            with pytest.raises(ConfigError, match=f"vqkd.{field.name}"):
                load_config(PretrainConfig, ["objective.name=vqkd", f"vqkd.{field.name}={bad}"])


def test_vqkd__without_a_teacher_says_how_to_get_one():
    with pytest.raises(TeacherError, match="vqkd.teacher"):
        VQKD(tiny_backbone(), teacher=None)


def test_vqkd__cosine_loss_as_the_official_and_teacher_frozen_in_eval_mode():
    model = tiny_vqkd().train()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    x = images()
    out = model({"pixel_values": x})
    # The official calculate_rec_loss on the same reconstruction and target.
    with torch.no_grad():
        target = teacher_patch_features(model.teacher, x, (4, 4))
    assert out["loss"].requires_grad and 0 <= out["loss_rec"] <= 2
    torch.testing.assert_close(out["loss"].detach(), out["loss_rec"] + out["loss_commit"])
    out["loss"].backward()
    assert model.backbone.patch_embed.proj.weight.grad is not None  # through the straight-through codes
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())
    assert target.shape == (4, 16, 24)


def official_rec_loss(rec, target):
    target = target / target.norm(dim=-1, keepdim=True)
    rec = rec / rec.norm(dim=-1, keepdim=True)
    return (1 - (target * rec).sum(-1)).mean()


def test_vqkd__reconstruction_loss_equals_the_official_cosine_loss():
    model = tiny_vqkd().eval()  # eval: the codebook holds still, so two forwards agree
    model.quantizer.initted.fill_(True)
    x = images(seed=1)
    out = model({"pixel_values": x})
    with torch.no_grad():
        target = teacher_patch_features(model.teacher, x, (4, 4))
        z_q, _, _ = model.quantizer(model.encode(x))
        rec = model.decoder(z_q)
    torch.testing.assert_close(out["loss_rec"], official_rec_loss(rec, target))


def test_teacher_patch_features__convnet_maps_are_resized_to_the_patch_grid():
    resnet = timm.create_model("test_resnet", num_classes=0).eval()
    feats = teacher_patch_features(resnet, torch.randn(2, 3, 32, 32), (8, 8))
    assert feats.shape == (2, 64, resnet.num_features)
    model = tiny_vqkd(teacher=resnet)
    out = model({"pixel_values": images()})
    assert torch.isfinite(out["loss"])


def test_vqkd__usage_window_counts_codes_and_rolls_over():
    model = tiny_vqkd().train()
    for step in range(3):
        out = model({"pixel_values": images(seed=step)})
        assert 0 < float(out["codebook_usage"]) <= 1
        model.on_step_end(step, 10)
    assert 0 < float(model.quantizer.last_window_usage) <= 1 and model.quantizer.window_counts.sum() == 0
    out = model({"pixel_values": images(seed=9)})
    assert "codebook_usage_last_window" in out


def test_tokenizer__from_the_objective_state_gives_the_objectives_codes():
    model = tiny_vqkd().train()
    for step in range(2):
        model({"pixel_values": images(seed=step)})
    model.eval()
    tok = VQKDTokenizer(tiny_backbone(), 16, 8)
    tok.load_state_dict(tokenizer_state(model.state_dict()), strict=True)
    x = images(seed=5)
    with torch.no_grad():
        _, _, ids = model.quantizer(model.encode(x))
    assert torch.equal(tok(x), ids)
