"""recipes/simmim_pretrain.py and its configs: the paper's values, an end-to-end run whose export loads into
timm, and real processes (killed and relaunched; 2 processes x B against 1 process x 2B).

Masks are drawn in the data pipeline from each sample's seed (run seed, epoch, position in the epoch), so a
resumed run and a 2-process run see the masks of an uninterrupted 1-process run: the comparisons need no
fixed views.
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.models import create_backbone
from ssl_vit.objectives.simmim import SimMIM

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "configs"
sys.path.insert(0, str(ROOT / "tests" / "reliability"))  # faulty_launch.py: SIGKILL inside a step
from reliability_common import (  # noqa: E402
    Background,
    assert_same_tensors,
    checkpoint_state,
    checkpoint_step,
    launch,
    launch_sequence,
    load_recipe,
    resumed_at,
)

# The default recipe shrunk to seconds: 32 synthetic 16x16 images, batch 8 (4 steps an epoch), 3 epochs =
# 12 steps, a 2-block 32-wide ViT (patch 4) with 8-px mask patches, a checkpoint every 3 steps.
TINY = [
    "data.synthetic_train_size=32",
    "data.synthetic_eval_size=8",
    "data.image_size=16",
    "model.name=vit_nano_patch4_32",
    "model.args={depth: 2, embed_dim: 32, num_heads: 2}",
    "simmim.mask_patch_size=8",
    "train.batch_size=8",
    "train.epochs=3",
    "train.save_every=3",
    "train.log_every=3",
    "train.vis_every=0",
]
STEPS = 12
# One thread per process (shared CI cores; bit-for-bit comparisons use the same count) and PyTorch's own
# linear kernels: a per-machine kernel choice measured anew by each launch could differ between them.
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SSL_VIT_ONEDNN_LINEAR": "0"}


def config(name: str) -> PretrainConfig:
    return load_config(PretrainConfig, [], default_file=CONFIGS / name)


# -- configs -----------------------------------------------------------------------------------


def test_simmim_configs__all_three_parse_and_start_with_the_launch_command():
    paths = sorted(CONFIGS.glob("simmim_*.yaml"))
    expected = {"simmim_default.yaml", "simmim_vit_tiny_cifar10.yaml", "simmim_vit_base_imagenet.yaml"}
    assert {p.name for p in paths} >= expected
    for path in paths:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "recipes/simmim_pretrain.py" in first and "->" in first, path.name
        cfg = config(path.name)
        assert cfg.objective.name == "simmim" and cfg.simmim.mask_ratio == 0.6, path.name
        patch = {"patch16": 16, "patch8": 8}.get(cfg.model.name.split("_")[2], 4)
        # The paper's 32 px masks over 16-px patches; the default's 32-px images keep 8-px patches = masks (header).
        assert cfg.simmim.mask_patch_size == (patch if path.name == "simmim_default.yaml" else 2 * patch), path.name
        assert cfg.data.image_size % cfg.simmim.mask_patch_size == 0, path.name
        assert tuple(cfg.optim.betas) == (0.9, 0.999) and cfg.optim.weight_decay == 0.05, path.name
        assert cfg.train.clip_grad == 5.0, path.name


def test_simmim_default_config__is_synthetic_nano_and_the_recipes_default():
    cfg = config("simmim_default.yaml")
    assert load_recipe("simmim_pretrain").DEFAULT_CONFIG == CONFIGS / "simmim_default.yaml"
    assert cfg.data.name == "synthetic" and cfg.model.name == "vit_nano_patch8_32"
    assert cfg.simmim.norm_target_window == 7  # normalised targets: what lifts it above the random init (header)
    assert cfg.output_dir == "outputs/simmim_default"


SIMMIM_CFG = "microsoft/SimMIM configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml"
SIMMIM_DEFAULTS = "microsoft/SimMIM config.py defaults"
SIMMIM_MAIN = "microsoft/SimMIM main_simmim.py: lr = BASE_LR * batch / 512"
SIMMIM_DATA = "microsoft/SimMIM data/data_simmim.py SimMIMTransform"
SIMMIM_README = "microsoft/SimMIM README.md (ViT-Base 800 ep 224: 83.8; DGX-2: 16 GPUs x --batch-size 128)"
# Written from the official repository, never from our config: (value, source).
PUBLISHED = {
    "objective.name": ("simmim", "Xie et al. 2022"),
    "model.name": ("vit_base_patch16_224", SIMMIM_CFG + ": EMBED_DIM 768, DEPTH 12, NUM_HEADS 12, patch 16"),
    "model.drop_path_rate": (0.1, SIMMIM_CFG + " DROP_PATH_RATE"),
    "model.args.init_values": (0.1, SIMMIM_DEFAULTS + " MODEL.VIT.INIT_VALUES (layer scale)"),
    "data.image_size": (224, SIMMIM_CFG + " IMG_SIZE"),
    "simmim.mask_patch_size": (32, SIMMIM_CFG + " MASK_PATCH_SIZE"),
    "simmim.mask_ratio": (0.6, SIMMIM_CFG + " MASK_RATIO"),
    "train.epochs": (800, SIMMIM_CFG + " EPOCHS"),
    "optim.warmup_epochs": (10, SIMMIM_CFG + " WARMUP_EPOCHS"),
    "@effective_batch": (2048, SIMMIM_README),
    "@lr": (1e-4 * 2048 / 512, SIMMIM_CFG + " BASE_LR 1e-4; " + SIMMIM_MAIN),
    "optim.name": ("adamw", SIMMIM_DEFAULTS + " TRAIN.OPTIMIZER.NAME"),
    "optim.betas": ((0.9, 0.999), SIMMIM_DEFAULTS + " TRAIN.OPTIMIZER.BETAS"),
    "optim.eps": (1e-8, SIMMIM_DEFAULTS + " TRAIN.OPTIMIZER.EPS"),
    "optim.weight_decay": (0.05, SIMMIM_CFG + " WEIGHT_DECAY"),
    "train.clip_grad": (5.0, SIMMIM_DEFAULTS + " TRAIN.CLIP_GRAD"),
    "@train_crop.scale": ((0.67, 1.0), SIMMIM_DATA + " RandomResizedCrop(scale=(0.67, 1.))"),
    "@train_crop.ratio": ((3 / 4, 4 / 3), SIMMIM_DATA + " ratio=(3. / 4., 4. / 3.)"),
    "@train_crop.interpolation": ("bilinear", SIMMIM_DATA + ": torchvision's default"),
    "data.hflip": (0.5, SIMMIM_DATA + " RandomHorizontalFlip()"),
    "@result": ("83.8", SIMMIM_README),
}


def test_simmim_vit_base_imagenet_config__holds_the_published_values():
    path = CONFIGS / "simmim_vit_base_imagenet.yaml"
    first = path.read_text().splitlines()[0]
    processes = int(re.search(r"--num_processes (\d+)", first).group(1))
    cfg = config(path.name)
    backbone = create_backbone(cfg.model.name, num_classes=0, depth=1, embed_dim=32, num_heads=2)  # its patch grid
    simmim = SimMIM(backbone, cfg.simmim.mask_patch_size, cfg.simmim.mask_ratio)
    crop = simmim.train_transform(cfg.data).crop.transforms[0]
    batch = cfg.train.batch_size * cfg.train.grad_accum_steps * processes
    derived = {
        "@effective_batch": batch,
        "@lr": cfg.optim.blr * batch / 256,
        "@train_crop.scale": tuple(crop.scale),
        "@train_crop.ratio": tuple(crop.ratio),
        "@train_crop.interpolation": crop.interpolation.value,
    }
    wrong = []
    for key, (published, source) in PUBLISHED.items():
        if key == "@result":
            actual = published if published in first else None
        elif key in derived:
            actual = derived[key]
        elif key.startswith("model.args."):
            actual = cfg.model.args[key.split(".")[-1]]
        else:
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            actual = tuple(node) if isinstance(node, (tuple, list)) else node
        same = (
            all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(actual, published)) if isinstance(published, tuple)
            else math.isclose(actual, published, rel_tol=1e-9) if isinstance(published, float)
            else actual == published
        )
        if not same:
            wrong.append(f"{key}: config gives {actual!r}, published {published!r} ({source})")
    assert not wrong, "\n".join(wrong)


# -- an end-to-end run -------------------------------------------------------------------------


def test_simmim_recipe__runs_and_exports_a_backbone_that_timm_loads_strictly(tmp_path):
    out = tmp_path / "run"
    summary = load_recipe("simmim_pretrain").main([*TINY, "train.max_steps=2", "data.num_workers=0", f"output_dir={out}"])
    assert summary["steps"] == 2
    assert (out / "simmim_reconstruction.png").stat().st_size > 0
    saved = (out / "config.yaml").read_text()
    assert "simmim:" in saved and "mae:" not in saved
    info = json.loads((out / "backbone.json").read_text())
    name, kwargs = info["timm"]
    twin = timm.create_model(name, pretrained=False, **kwargs).eval()
    exported = load_file(str(out / "backbone.safetensors"))
    twin.load_state_dict(exported, strict=True)
    state = load_file(str(out / "checkpoint-last" / "model.safetensors"))
    assert {k for k in state if not k.startswith("backbone.")} == {"mask_token", "decoder.0.weight", "decoder.0.bias"}
    # The export is the trained backbone and gives timm's features.
    from ssl_vit.engine.checkpoint import load_backbone

    ours = load_backbone(str(out)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), twin.forward_features(x), rtol=0, atol=1e-5)


# -- real processes ----------------------------------------------------------------------------


def run_args(out: Path, batch_size: int = 8, save_every: int = 3) -> list[str]:
    return [*TINY, f"train.batch_size={batch_size}", f"train.save_every={save_every}", f"output_dir={out}"]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """One child process (imports paid once) runs, in order: the uninterrupted run ("whole"), the 1-process
    x 8 run of the 2-process comparison ("one", no checkpoints on the way), then the run SIGKILLed inside its
    8th training forward (step 7, after the step-6 checkpoint; "broken"), which ends the process. Meanwhile
    (in a thread: it needs none of them) the 2-process x 4 run of the comparison ("two")."""
    root = tmp_path_factory.mktemp("simmim_runs")
    # The tiny run with 2 CPU processes (torchrun + gloo, as `accelerate launch` runs them).
    two = Background(
        launch, "simmim_pretrain.py", *run_args(root / "two", batch_size=4, save_every=0),
        env={**PINNED, "ACCELERATE_USE_CPU": "1"}, launcher=["torchrun", "--standalone", "--nproc_per_node", "2"],
        timeout=300,
    )
    proc = launch_sequence([
        {"recipe": "simmim_pretrain.py", "args": run_args(root / "whole")},
        {"recipe": "simmim_pretrain.py", "args": run_args(root / "one", save_every=0), "env": {"ACCELERATE_USE_CPU": "1"}},
        {"recipe": "simmim_pretrain.py", "args": run_args(root / "broken"), "faults": "kill_forward=8"},
    ], env=PINNED)
    yield root, proc, two
    two.wait()


@pytest.mark.slow
def test_simmim_recipe__killed_mid_step_and_relaunched_ends_as_an_uninterrupted_run(one_process_runs):
    root, proc, _ = one_process_runs
    whole, broken = root / "whole", root / "broken"
    # The launch ends in its last, killed run: the uninterrupted run before it returned normally.
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint_step(whole) == STEPS
    reference = checkpoint_state(whole)

    # Killed inside the 8th training forward (step 7, after the step-6 checkpoint), then relaunched.
    assert checkpoint_step(broken) == 6
    proc = launch("simmim_pretrain.py", *TINY, f"output_dir={broken}", env=PINNED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) == 6
    assert_same_tensors(checkpoint_state(broken), reference)  # backbone, mask token and head, bit for bit
    assert_same_tensors(load_file(str(broken / "backbone.safetensors")), load_file(str(whole / "backbone.safetensors")))


@pytest.mark.slow
def test_simmim_recipe__two_processes_end_with_one_process_weights_at_the_same_global_batch(one_process_runs):
    root, first, two_processes = one_process_runs
    one, two = root / "one", root / "two"
    proc = two_processes.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The launch ends in its last, killed run: every run before it (the 1-process x 8 one too) returned normally.
    assert first.returncode == -signal.SIGKILL and (one / "checkpoint-last").is_dir(), first.stderr[-3000:]
    state = json.loads((two / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["effective_batch"] == 8 and state["step"] == STEPS

    a, b = checkpoint_state(one), checkpoint_state(two)
    assert a.keys() == b.keys()
    # Every sample masks the same number of pixels, so each process's masked mean over its half batch,
    # averaged by DDP, is the 1-process mean over the whole batch: the same gradients but for float sums
    # taken in another order (and the 1e-5 epsilon under a halved count), which AdamW's normalised steps
    # carry over 12 steps.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
