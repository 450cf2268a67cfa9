"""GPU-only checks (skipped on CPU machines): bf16 and fp16 runs, fp16 loss-scaler state, FSDP on 1 GPU.

    python -m pytest tests/engine/test_gpu.py -q      # on a machine with a CUDA GPU
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from toys import toy_config, toy_loader, toy_objective, weights

from ssl_vit.engine import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision__trains_on_gpu_saves_fp32_weights_and_resumes(tmp_path, precision):
    cfg = toy_config(tmp_path, mixed_precision=precision, max_steps=4, save_every=2)
    trainer = Trainer(cfg, toy_objective(), toy_loader())
    assert trainer.accelerator.device.type == "cuda" and trainer.accelerator.mixed_precision == precision
    assert all(g.get("fused") for g in trainer.optimizer.param_groups)  # fused AdamW on CUDA
    summary = trainer.fit()
    assert summary["steps"] == 4 and summary["loss"] == summary["loss"]  # not NaN
    assert all(v.dtype == torch.float32 for v in weights(tmp_path).values())
    assert (tmp_path / "checkpoint-last" / "scaler.pt").is_file() == (precision == "fp16")
    cfg = toy_config(tmp_path, mixed_precision=precision, max_steps=6, save_every=2)
    assert Trainer(cfg, toy_objective(), toy_loader()).fit()["steps"] == 6


def test_compile__inductor_on_gpu(tmp_path):
    cfg = toy_config(tmp_path, compile=True, mixed_precision="bf16", max_steps=3, save_every=0)
    assert Trainer(cfg, toy_objective(stochastic=False), toy_loader()).fit()["steps"] == 3


@pytest.mark.slow
def test_fsdp__one_gpu_run_saves_full_plain_weights_and_resumes(tmp_path):
    env = {
        **os.environ,
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block",
        "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
        "FSDP_RESHARD_AFTER_FORWARD": "true",
    }
    script = Path(__file__).parent / "run_toy.py"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "1", str(script), str(tmp_path), "ddp", "4"]
    for _ in range(2):  # the second launch resumes the finished run
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 8
    assert "backbone.blocks.0.attn.qkv.weight" in weights(tmp_path)
