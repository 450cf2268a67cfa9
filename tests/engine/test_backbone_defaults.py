"""An objective's backbone defaults (MAE: fixed sin-cos positions) apply unless the user chose otherwise."""

from __future__ import annotations

import logging

import pytest
import torch

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine.run import build_run_objective
from ssl_vit.models import sincos_pos_embed_2d

TINY = ["data.image_size=16", "model.args={depth: 1, embed_dim: 32, num_heads: 2}",
        "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"]


def test_mae_without_its_yaml__gets_fixed_sincos_positions_and_the_log_says_so(caplog):
    cfg = load_config(PretrainConfig, ["objective.name=mae", *TINY])
    with caplog.at_level(logging.INFO, logger="ssl_vit.engine"):
        pos = build_run_objective(cfg, num_classes=0).backbone.pos_embed
    assert not pos.requires_grad  # fixed, as facebookresearch/mae's encoder
    torch.testing.assert_close(pos.detach(), sincos_pos_embed_2d(32, (4, 4), 1))
    assert "objective mae sets the backbone's pos_embed=sincos" in caplog.text


@pytest.mark.parametrize("choice", [["model.pos_embed=learn"], ["model.args={depth: 1, embed_dim: 32, num_heads: 2, pos_embed: learn}"]])
def test_mae_with_the_users_choice__keeps_it(choice):
    cfg = load_config(PretrainConfig, ["objective.name=mae", *TINY, *choice])
    assert build_run_objective(cfg, num_classes=0).backbone.pos_embed.requires_grad


def test_objectives_without_defaults__keep_learned_positions():
    cfg = load_config(PretrainConfig, ["objective.name=supervised", *TINY[:2]])
    assert build_run_objective(cfg, num_classes=10).backbone.pos_embed.requires_grad
