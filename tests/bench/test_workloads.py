"""The benchmarked steps build and run on tiny configs: ours and the references of the same size."""

from __future__ import annotations

import torch

from ssl_vit.bench import BenchEnv, WorkloadConfig
from ssl_vit.bench.workloads import (
    backbone_cases,
    deit_cases,
    eval_cases,
    hf_mae_config,
    mae_cases,
    scaling_cases,
    supervised_cases,
)

ENV = BenchEnv(torch.device("cpu"))
TINY = dict(depth=1, embed_dim=32, num_heads=2)


def _cfg(**kw) -> WorkloadConfig:
    base = dict(model="vit_nano_patch4_32", batch_size=4, eval_batch_size=4, overrides=dict(TINY, img_size=16),
                decoder_dim=16, decoder_depth=1, decoder_heads=2, teacher="resnet10t")
    return WorkloadConfig(**{**base, **kw})


def test_supervised_cases__ours_and_timm_take_a_step():
    cases = supervised_cases(_cfg(), ENV)
    assert [c.name for c in cases] == ["supervised/ours", "supervised/timm"]
    assert cases[0].info["trainable_params"] == cases[1].info["trainable_params"]  # same architecture
    for case in cases:
        case.step()
        case.flops_fn()
        assert case.images == 4


def test_backbone_cases__forward_backward_of_ours_and_timm():
    cases = backbone_cases(_cfg(), ENV)
    assert [c.name for c in cases] == ["backbone/ours", "backbone/timm"]
    for case in cases:
        case.step()
        assert all(p.grad is None for p in case.track[0].parameters())  # gradients cleared each step


def test_mae_cases__hf_reference_has_our_sizes():
    cases = mae_cases(_cfg(), ENV)
    assert [c.name for c in cases] == ["mae/ours", "mae/hf"]
    for case in cases:
        case.step()
    # The same encoder and decoder: trainable parameter counts agree up to the mask token and HF's
    # learned-free (frozen) position embeddings, which neither counts.
    assert cases[0].info["trainable_params"] == cases[1].info["trainable_params"]


def test_hf_mae_config__mirrors_backbone_and_decoder():
    from ssl_vit.models import create_backbone

    backbone = create_backbone("vit_tiny_patch4_32", num_classes=0, pos_embed="sincos")
    cfg = hf_mae_config(backbone, 0.75, {"decoder_dim": 128, "decoder_depth": 4, "decoder_heads": 4})
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (192, 12, 3, 768)
    assert (cfg.decoder_hidden_size, cfg.decoder_num_hidden_layers, cfg.decoder_num_attention_heads) == (128, 4, 4)
    assert (cfg.image_size, cfg.patch_size, cfg.mask_ratio, cfg.norm_pix_loss) == (32, 4, 0.75, True)


def test_deit_cases__distilled_student_and_timm_reference_step():
    cases = deit_cases(_cfg(), ENV)
    assert [c.name for c in cases] == ["deit/ours", "deit/timm"]
    assert cases[0].info["model"] == "deit_nano_distilled_patch4_32"
    for case in cases:
        case.step()


def test_eval_cases__run_in_inference_mode():
    cases = eval_cases(_cfg(), ENV)
    assert [c.name for c in cases] == ["eval/ours", "eval/timm"]
    for case in cases:
        case.step()


def test_scaling_cases__every_mask_ratio_then_every_other_size():
    cases = scaling_cases(_cfg(), ENV, [0.5, 0.75], [(16, 4), (32, 8)], batch_size=2)
    names = [c.name for c in cases]
    assert names == [
        "scaling/step/16px/p4/mask0.5", "scaling/encoder/16px/p4/mask0.5",
        "scaling/step/16px/p4/mask0.75", "scaling/encoder/16px/p4/mask0.75",
        "scaling/step/32px/p8/mask0.75", "scaling/encoder/32px/p8/mask0.75",
    ]
    assert [c.info["visible"] for c in cases[::2]] == [8, 4, 4]
    for case in cases:
        case.step()
