"""recipes/ijepa_pretrain.py and its configs: parsing, the paper's settings, and real runs killed,
resumed, and spread over 2 processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_vit.config import PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "ijepa_pretrain.py"
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
from reliability_common import Background, launch_sequence, load_recipe  # noqa: E402
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("ijepa_*.yaml"))
# Runs a recipe with faults armed from outside the library (kill_forward=N: SIGKILL inside the N-th forward).
FAULTY_LAUNCH = ROOT / "tests" / "reliability" / "faulty_launch.py"

# Seconds per run: 32 synthetic 16x16 images (a 4x4 patch grid), batch 8 (4 steps an epoch), 3 epochs =
# 12 steps, a 1-block 32-wide ViT and predictor, a checkpoint every 3 steps.
TINY = [
    "data.synthetic_train_size=32",
    "data.synthetic_eval_size=8",
    "data.image_size=16",
    "data.num_workers=0",
    "model.args={depth: 1, embed_dim: 32, num_heads: 2}",
    "ijepa.predictor_dim=16",
    "ijepa.predictor_depth=1",
    "ijepa.min_context=2",
    "train.batch_size=8",
    "train.epochs=3",
    "train.save_every=3",
    "train.log_every=3",
]
STEPS = 12
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def launch(out: Path, *args: str, faults: str = "", launcher: list[str] | None = None, env: dict | None = None):
    cmd = (launcher or [sys.executable]) + [str(FAULTY_LAUNCH), str(RECIPE), *TINY, *args, f"output_dir={out}"]
    full_env = {**os.environ, **CHILD_ENV, "RELIABILITY_FAULTS": faults, **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def test_ijepa_configs__all_three_exist_parse_and_start_with_the_launch_command():
    names = {p.name for p in CONFIGS}
    assert {"ijepa_default.yaml", "ijepa_vit_tiny_cifar10.yaml", "ijepa_vit_huge_imagenet.yaml"} <= names
    for path in CONFIGS:
        text = path.read_text()
        first = text.splitlines()[0]
        assert first.startswith("# ") and "recipes/ijepa_pretrain.py" in first and "->" in first, path.name
        assert "features.pool=avg" in text, path.name  # how to evaluate a model without a class token
        cfg = load_config(PretrainConfig, [], default_file=path)
        assert cfg.objective.name == "ijepa" and cfg.model.pos_embed == "sincos", path.name
        assert cfg.data.hflip == 0.0 and cfg.optim.weight_decay_end is not None, path.name


def test_ijepa_default_config__is_synthetic_nano_and_small_enough_for_a_cpu():
    cfg = load_config(PretrainConfig, [], default_file=load_recipe("ijepa_pretrain").DEFAULT_CONFIG)
    assert cfg.data.name == "synthetic" and cfg.model.name == "vit_nano_patch4_32"
    assert cfg.output_dir == "outputs/ijepa_default"
    assert cfg.ijepa.predictor_dim <= 128 and cfg.ijepa.predictor_depth <= 4


def test_ijepa_vit_huge_imagenet_config__has_the_papers_settings():
    cfg = load_config(PretrainConfig, [], default_file=ROOT / "recipes/configs/ijepa_vit_huge_imagenet.yaml")
    assert cfg.model.name == "vit_huge_patch14_224" and cfg.data.image_size == 224
    assert cfg.train.epochs == 300 and cfg.optim.warmup_epochs == 40
    batch = cfg.train.batch_size * cfg.train.grad_accum_steps * 8  # with 8 processes
    assert batch == 2048 and cfg.optim.blr * batch / 256 == pytest.approx(1e-3) and cfg.optim.min_lr == 1e-6
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.4)
    assert tuple(cfg.optim.betas) == (0.9, 0.999)
    c = cfg.ijepa
    assert (c.predictor_dim, c.predictor_depth, c.num_targets, c.min_context) == (384, 12, 4, 10)
    assert (c.target_scale, c.target_aspect_ratio, c.context_scale) == ((0.15, 0.2), (0.75, 1.5), (0.85, 1.0))
    assert (c.momentum, c.momentum_end) == (0.996, 1.0) and cfg.data.crop_scale_min == 0.3


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """One child process (imports paid once) runs the uninterrupted tiny run ("whole", also the 1-process side
    of the 2-process comparison: the same arguments), then the run SIGKILLed inside its 5th forward ("broken":
    step 5; the last checkpoint is step 3's), which ends the process. Meanwhile (in a thread: it needs none
    of them) the 2-process run of the comparison ("two")."""
    root = tmp_path_factory.mktemp("ijepa_runs")
    # `accelerate launch --cpu` starts one process without an accelerate config: torchrun, as the engine's tests.
    two = Background(
        launch, root / "two", "train.batch_size=4", env={"ACCELERATE_USE_CPU": "1"},
        launcher=["torchrun", "--standalone", "--nproc_per_node", "2"],
    )
    proc = launch_sequence([
        {"recipe": str(RECIPE), "args": [*TINY, f"output_dir={root / 'whole'}"]},
        {"recipe": str(RECIPE), "args": [*TINY, f"output_dir={root / 'broken'}"], "faults": "kill_forward=5"},
    ], env=CHILD_ENV)
    yield root, proc, two
    two.wait()


@pytest.mark.slow
def test_ijepa_recipe__exports_the_target_encoder_and_a_killed_run_resumes_to_the_same_weights(one_process_runs):
    root, proc, _ = one_process_runs
    whole, broken = root / "whole", root / "broken"
    # The launch ends in its last, killed run: the uninterrupted run before it returned normally.
    assert proc.returncode == -signal.SIGKILL and (whole / "checkpoint-last").is_dir(), proc.stderr[-3000:]
    exported = load_file(str(whole / "backbone.safetensors"))
    state = load_file(str(whole / "checkpoint-last" / "model.safetensors"))
    assert "mask_seed" in state and any(k.startswith("predictor.") for k in state)
    for key, value in exported.items():  # backbone.safetensors is the EMA target encoder
        assert torch.equal(value, state[f"target_encoder.{key}"]), key
    assert any(not torch.equal(exported[k], state[f"backbone.{k}"]) for k in exported)

    # SIGKILLed inside the 5th forward (step 5; the last checkpoint is step 3's), then relaunched.
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = launch(broken)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 3" in proc.stderr
    resumed = load_file(str(broken / "backbone.safetensors"))
    assert resumed.keys() == exported.keys()
    differ = [k for k in exported if not torch.equal(resumed[k], exported[k])]
    assert not differ, differ[:5]


@pytest.mark.slow
def test_ijepa_recipe__two_processes_train_as_one_process_with_the_same_global_batch(one_process_runs):
    root, first, two_processes = one_process_runs
    one, two = root / "whole", root / "two"  # the 1-process run: the uninterrupted tiny run
    # The launch ends in its last, killed run: every run before it (this one too) returned normally.
    assert first.returncode == -signal.SIGKILL and (one / "checkpoint-last").is_dir(), first.stderr[-3000:]
    proc = two_processes.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(one / "checkpoint-last" / "model.safetensors"))
    b = load_file(str(two / "checkpoint-last" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert torch.equal(a["mask_seed"], b["mask_seed"])
    # The same masks and images: only the order of float sums differs (~1e-8 measured; masks drawn per
    # process instead move the weights by ~4e-4 in this run).
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
