"""Profile breakdown: op names map to kinds of work, and a step's time splits into them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ssl_vit.bench import categorize, profile_step
from ssl_vit.bench.profile import CATEGORIES


@pytest.mark.parametrize(
    "op, kind",
    [
        ("aten::addmm", "matmul"),
        ("mkldnn::_linear_pointwise", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
        ("aten::gelu_backward", "gelu"),
        ("aten::native_layer_norm", "layernorm"),
        ("aten::cat", "copies"),
        ("aten::gather", "copies"),
        ("aten::mul", "other ops"),
    ],
)
def test_categorize__op_names_to_kinds(op, kind):
    assert categorize(op) == kind


def test_profile_step__splits_a_training_step_into_kinds_including_the_optimizer():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(16, 32)

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = profile_step(step, torch.device("cpu"), steps=2, warmup=1)
    assert set(out["ms_per_step"]) == set(CATEGORIES)
    assert out["ms_per_step"]["matmul"] > 0 and out["ms_per_step"]["optimizer"] > 0
    assert out["ms_per_step"]["gelu"] > 0 and out["ms_per_step"]["layernorm"] > 0
    assert sum(out["shares"].values()) == pytest.approx(1.0, abs=0.05)
    assert out["top_ops"] and {"op", "kind", "ms_per_step"} <= set(out["top_ops"][0])
