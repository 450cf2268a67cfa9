"""recipes/mocov3_pretrain.py and its configs: the paper's settings, and real processes (killed and
relaunched; 2 processes x B against 1 process x 2B)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_vit.config import PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "configs"
sys.path.insert(0, str(ROOT / "tests" / "reliability"))  # faulty_launch.py: SIGKILL inside a step

from reliability_common import (  # noqa: E402
    Background,
    backbone_weights,
    checkpoint_step,
    launch,
    launch_sequence,
    resumed_at,
)

# The default recipe shrunk to seconds: 32 synthetic 16x16 images, batch 8 (4 steps an epoch), 3 epochs
# = 12 steps, a 2-block 32-wide ViT and 32-wide heads, a checkpoint every 3 steps.
TINY = [
    "data.synthetic_train_size=32",
    "data.synthetic_eval_size=8",
    "data.image_size=16",
    "data.num_workers=0",
    "model.args={depth: 2, embed_dim: 32, num_heads: 2}",
    "mocov3.hidden_dim=32",
    "mocov3.out_dim=16",
    "train.batch_size=8",
    "train.epochs=3",
    "train.save_every=3",
    "train.log_every=3",
]
STEPS = 12


def test_mocov3_configs__all_three_parse_and_start_with_the_launch_command():
    paths = sorted(CONFIGS.glob("mocov3_*.yaml"))
    expected = {"mocov3_default.yaml", "mocov3_vit_tiny_cifar10.yaml", "mocov3_vit_small_imagenet.yaml"}
    assert {p.name for p in paths} >= expected
    for path in paths:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "recipes/mocov3_pretrain.py" in first and "->" in first, path.name
        cfg = load_config(PretrainConfig, [], default_file=path)
        assert cfg.objective.name == "mocov3" and cfg.model.pos_embed == "sincos", path.name
        assert cfg.mocov3.temperature == 0.2 and cfg.mocov3.momentum == 0.99 and cfg.mocov3.freeze_patch_embed
        assert cfg.train.grad_accum_steps == 1, "accumulation would split the negatives and BN batches"


def test_mocov3_default_config__is_synthetic_and_nano():
    cfg = load_config(PretrainConfig, [], default_file=CONFIGS / "mocov3_default.yaml")
    assert cfg.data.name == "synthetic" and cfg.model.name == "vit_nano_patch8_32"
    assert cfg.output_dir == "outputs/mocov3_default"


def test_mocov3_vit_small_imagenet_config__has_the_papers_settings():
    cfg = load_config(PretrainConfig, [], default_file=CONFIGS / "mocov3_vit_small_imagenet.yaml")
    assert cfg.model.name == "vit_small_patch16_224" and cfg.data.image_size == 224
    assert cfg.model.args == {"num_heads": 12}  # the official ViT-Small (vits.py), not timm's 6 heads
    assert cfg.train.epochs == 300 and cfg.optim.warmup_epochs == 40
    assert cfg.train.batch_size * 32 == 4096  # with 32 processes
    assert cfg.optim.name == "adamw" and cfg.optim.blr == 1.5e-4 and cfg.optim.weight_decay == 0.1
    assert tuple(cfg.optim.betas) == (0.9, 0.999)
    m = cfg.mocov3
    assert (m.hidden_dim, m.out_dim, m.momentum_cosine) == (4096, 256, True)
    assert tuple(m.blur_prob) == (1.0, 0.1) and tuple(m.solarize_prob) == (0.0, 0.2)
    assert cfg.data.crop_scale_min == 0.08


def weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / name))


# The 2-processes-vs-1 comparison's run: SGD, not AdamW: Adam scales each gradient to about +-lr, so
# parameters whose gradient is zero in exact arithmetic (the attention's key bias; the final LayerNorm's
# bias, whose shift the projector's first BN removes) take +-lr steps of float noise, different for any
# summation order.
SGD_ONE_EPOCH = [*TINY, "train.epochs=1", "train.save_every=0", "optim.name=sgd", "optim.lr=0.05",
                 "optim.weight_decay=0", "optim.warmup_epochs=0"]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """One child process (imports paid once) runs, in order: the uninterrupted run ("whole"), the 1-process
    x 8 SGD run of the 2-process comparison ("one"), then the run SIGKILLed inside its 8th forward (step 8,
    after the step-6 checkpoint; "broken"), which ends the process. Meanwhile (in a thread: it needs none of
    them) the 2-process x 4 run of the comparison ("two")."""
    root = tmp_path_factory.mktemp("mocov3_runs")
    two = Background(
        launch, "mocov3_pretrain.py", *SGD_ONE_EPOCH, "train.batch_size=4", f"output_dir={root / 'two'}",
        env={"ACCELERATE_USE_CPU": "1"}, launcher=["torchrun", "--standalone", "--nproc_per_node", "2"], timeout=300,
    )
    proc = launch_sequence([
        {"recipe": "mocov3_pretrain.py", "args": [*TINY, f"output_dir={root / 'whole'}"]},
        {"recipe": "mocov3_pretrain.py", "args": [*SGD_ONE_EPOCH, f"output_dir={root / 'one'}"]},
        {"recipe": "mocov3_pretrain.py", "args": [*TINY, f"output_dir={root / 'broken'}"], "faults": "kill_forward=8"},
    ], timeout=300)
    yield root, proc, two
    two.wait()


@pytest.mark.slow
def test_mocov3_recipe__killed_in_a_step_and_relaunched__ends_equal_to_an_uninterrupted_run(one_process_runs):
    root, proc, _ = one_process_runs
    whole, broken = root / "whole", root / "broken"
    # The launch ends in its last, killed run: the uninterrupted run before it returned normally.
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint_step(whole) == STEPS

    # SIGKILLed inside the 8th forward (step 8, after the step-6 checkpoint), then relaunched.
    assert checkpoint_step(broken) == 6
    proc = launch("mocov3_pretrain.py", *TINY, f"output_dir={broken}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) == 6

    a, b = backbone_weights(whole), backbone_weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The whole objective too: key encoder, heads, BN statistics.
    a, b = (weights(out / "checkpoint-last", "model.safetensors") for out in (whole, broken))
    assert any(k.startswith("momentum_backbone.") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not differ, differ[:5]


@pytest.mark.slow
def test_mocov3_recipe__two_processes_x_4_train_as_one_process_x_8(one_process_runs):
    # Keys gathered from both processes (labels offset by rank) and BN statistics over both (as the
    # official SyncBatchNorm): the same computation as one process, up to float summation order.
    # SGD, not AdamW (SGD_ONE_EPOCH).
    root, first, two_processes = one_process_runs
    one = root / "one"
    # The launch ends in its last, killed run: every run before it (the 1-process x 8 one too) returned normally.
    assert first.returncode == -signal.SIGKILL and (one / "checkpoint-last").is_dir(), first.stderr[-3000:]
    two = root / "two"
    proc = two_processes.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((two / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4 and state["images_seen"] == 32

    a, b = (weights(out / "checkpoint-last", "model.safetensors") for out in (one, two))
    assert a.keys() == b.keys()
    for key in a:  # weights, key encoder, BN statistics
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # ... after steps that moved them (the key encoder lags the trained backbone).
    moved = (a["backbone.blocks.0.attn.qkv.weight"] - a["momentum_backbone.blocks.0.attn.qkv.weight"]).abs().max()
    assert moved > 1e-2
