"""recipes/beit_pretrain.py, recipes/beit_tokenizer.py and their configs: the chain teacher -> VQ-KD tokenizer
-> BEiT end to end (the tokenizer unchanged inside BEiT's checkpoint, the export loads into timm), and real
processes (killed and relaunched; 2 processes x B against 1 process x 2B) for BEiT and for the tokenizer.

Masks are drawn in the data pipeline from each sample's seed, and every mask has the same count, so a
resumed run and a 2-process run see the masks and the loss normalisation of an uninterrupted 1-process run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.engine.checkpoint import load_backbone, save_backbone
from ssl_vit.models import create_backbone
from ssl_vit.objectives.vqkd import load_tokenizer

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

# 32 synthetic 16x16 images, batch 8 (4 steps an epoch), 3 epochs = 12 steps, a 2-block 32-wide ViT (patch 4:
# a 4x4 grid, 6 of 16 patches masked in blocks of >= 2), 16 codes, a checkpoint every 3 steps.
DATA = ["data.synthetic_train_size=32", "data.synthetic_eval_size=8", "data.image_size=16", "data.num_workers=0"]
NET = "model.args={depth: 2, embed_dim: 32, num_heads: 2}"
RUN = ["train.batch_size=8", "train.epochs=3", "train.save_every=3", "train.log_every=3", "train.vis_every=0"]
BEIT = ["beit.codebook_size=16", "beit.min_block_patches=2", "beit.train_tokenizer=null"]
STEPS = 12
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SSL_VIT_ONEDNN_LINEAR": "0"}

TOKENIZER_YAML = """\
output_dir: unused
objective: {{name: vqkd}}
model: {{name: vit_nano_patch4_32, args: {{depth: 2, embed_dim: 32, num_heads: 2}}}}
data: {{name: synthetic, image_size: 16, num_workers: 0}}
vqkd: {{teacher: null, train_teacher: {teacher_yaml}, codebook_size: 64, codebook_dim: 8, decoder_depth: 1, usage_window: 2}}
train: {{epochs: 1, max_steps: 3, batch_size: 8, save_every: 0, log_every: 1, vis_every: 0}}
optim: {{name: adamw, blr: 1.0e-3, weight_decay: 1.0e-4, betas: [0.9, 0.99], warmup_epochs: 0}}
"""
TEACHER_YAML = """\
output_dir: unused
objective: {name: supervised}
model: {name: test_resnet}
data: {name: synthetic, image_size: 16, num_workers: 0}
train: {epochs: 1, max_steps: 2, batch_size: 8, save_every: 0, log_every: 1, vis_every: 0}
optim: {name: adamw, blr: 1.0e-3, weight_decay: 0.05, warmup_epochs: 0}
"""


def config(name: str) -> PretrainConfig:
    return load_config(PretrainConfig, [], default_file=CONFIGS / name)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny trained tokenizer (16 codes) over a random tiny ViT teacher, for the BEiT process tests."""
    root = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    save_backbone(create_backbone("vit_nano_patch4_32", depth=1, embed_dim=24, num_heads=2, img_size=16, num_classes=0), root / "teacher")
    out = root / "tokenizer"
    args = [*DATA, NET, "vqkd.codebook_size=16", "vqkd.codebook_dim=8", "vqkd.decoder_depth=1",
            f"vqkd.teacher={root / 'teacher'}", "train.max_steps=4", "train.batch_size=8", "train.save_every=0",
            "train.vis_every=0", f"output_dir={out}"]
    load_recipe("beit_tokenizer").main(args)
    return out


# -- configs -----------------------------------------------------------------------------------


def test_beit_configs__parse_start_with_the_launch_command_and_hold_the_papers_masking():
    expected = {"beit_default.yaml", "beit_vit_tiny_cifar10.yaml", "beit_vit_base_imagenet.yaml"}
    assert {p.name for p in CONFIGS.glob("beit_*.yaml") if "tokenizer" not in p.name} == expected
    for name in expected:
        first = (CONFIGS / name).read_text().splitlines()[0]
        assert first.startswith("# ") and "recipes/beit_pretrain.py" in first and "->" in first, name
        cfg = config(name)
        assert cfg.objective.name == "beit" and cfg.beit.min_aspect == 0.3, name
        assert cfg.model.args["init_values"] == 0.1, name  # the paper's layer scale
        assert tuple(cfg.optim.betas) == (0.9, 0.999) and cfg.optim.weight_decay == 0.05 and cfg.train.clip_grad == 3.0
        tok = load_config(PretrainConfig, [], default_file=ROOT / cfg.beit.train_tokenizer)
        assert tok.objective.name == "vqkd" and tok.model.name.split("_patch")[1] == cfg.model.name.split("_patch")[1]
        assert tok.vqkd.codebook_size == cfg.beit.codebook_size and tok.data.image_size == cfg.data.image_size
    assert config("beit_default.yaml").data.name == "synthetic"
    assert load_recipe("beit_pretrain").DEFAULT_CONFIG == CONFIGS / "beit_default.yaml"
    assert load_recipe("beit_tokenizer").DEFAULT_CONFIG == CONFIGS / "beit_tokenizer_default.yaml"
    for name in ("beit_tokenizer_default.yaml", "beit_tokenizer_vit_tiny_cifar10.yaml", "beit_tokenizer_vit_base_imagenet.yaml"):
        first = (CONFIGS / name).read_text().splitlines()[0]
        assert "recipes/beit_tokenizer.py" in first and "->" in first, name


# -- the whole chain ----------------------------------------------------------------------------


def test_beit_recipe__trains_teacher_then_tokenizer_then_beit_and_exports_a_timm_backbone(tmp_path):
    (tmp_path / "teacher.yaml").write_text(TEACHER_YAML)
    (tmp_path / "tokenizer.yaml").write_text(TOKENIZER_YAML.format(teacher_yaml=tmp_path / "teacher.yaml"))
    out = tmp_path / "run"
    args = [*DATA, NET, *RUN, "beit.codebook_size=64", "beit.min_block_patches=2",
            f"beit.train_tokenizer={tmp_path / 'tokenizer.yaml'}", "train.max_steps=3", f"output_dir={out}"]
    summary = load_recipe("beit_pretrain").main(args)
    assert summary["steps"] == 3
    assert (out / "tokenizer" / "teacher" / "backbone.safetensors").is_file()  # the teacher, trained first
    info = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    assert info["codebook_size"] == 64 and info["codebook_usage_last_window"] is not None
    # k-means init on the first batch: most of the 64 codes are in use in the tiny tokenizer run.
    assert info["codebook_usage_last_window"] >= 0.25, info
    # The tokenizer inside BEiT's checkpoint is the saved one, unchanged by 3 steps of training.
    state = load_file(str(out / "checkpoint-last" / "model.safetensors"))
    saved = load_file(str(out / "tokenizer" / "tokenizer.safetensors"))
    inside = {k[len("tokenizer."):]: v for k, v in state.items() if k.startswith("tokenizer.")}
    assert_same_tensors(inside, saved)
    assert {k for k in state if not k.startswith(("backbone.", "tokenizer."))} == {"mask_token", "lm_head.weight", "lm_head.bias"}
    meta = json.loads((out / "backbone.json").read_text())
    name, kwargs = meta["timm"]
    twin = timm.create_model(name, pretrained=False, **kwargs).eval()
    twin.load_state_dict(load_file(str(out / "backbone.safetensors")), strict=True)
    ours = load_backbone(str(out)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), twin.forward_features(x), rtol=0, atol=1e-5)
    # A second run finds the tokenizer and does not train another.
    assert load_tokenizer(out / "tokenizer").codebook_size == 64


# -- real processes ----------------------------------------------------------------------------


def beit_args(tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return [*DATA, NET, *RUN, *BEIT, f"beit.tokenizer={tokenizer}", *extra, f"output_dir={out}"]


def one_process(args: list[str]) -> dict:
    """The 1-process side of a 2-process comparison (batch 8, no checkpoints on the way), as a sequence run."""
    return {"args": [*args, "train.batch_size=8", "train.save_every=0"], "env": {"ACCELERATE_USE_CPU": "1"}}


@pytest.fixture(scope="module")
def beit_runs(tmp_path_factory, tokenizer_dir):
    """One child process (imports paid once) runs, in order: BEiT uninterrupted ("whole"), the 1-process x 8
    run of the 2-process comparison ("one"), then the run SIGKILLed inside its 8th training forward
    ("broken": step 7, after the step-6 checkpoint), which ends the process. Meanwhile (in a thread: it needs
    none of them) the 2-process x 4 run of the comparison ("two")."""
    root = tmp_path_factory.mktemp("beit_runs")
    two = Background(run, "beit_pretrain.py", beit_args(tokenizer_dir, root / "two"), 4, 2)
    proc = launch_sequence([
        {"recipe": "beit_pretrain.py", "args": beit_args(tokenizer_dir, root / "whole")},
        {"recipe": "beit_pretrain.py", **one_process(beit_args(tokenizer_dir, root / "one"))},
        {"recipe": "beit_pretrain.py", "args": beit_args(tokenizer_dir, root / "broken"), "faults": "kill_forward=8"},
    ], env=PINNED)
    yield root, proc, two
    two.wait()


@pytest.mark.slow
def test_beit_recipe__killed_mid_step_and_relaunched_ends_as_an_uninterrupted_run(beit_runs, tokenizer_dir):
    root, proc, _ = beit_runs
    whole, broken = root / "whole", root / "broken"
    # The launch ends in its last, killed run: the uninterrupted run before it returned normally.
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint_step(whole) == STEPS
    assert checkpoint_step(broken) == 6
    proc = launch("beit_pretrain.py", *beit_args(tokenizer_dir, broken), env=PINNED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) == 6
    assert_same_tensors(checkpoint_state(broken), checkpoint_state(whole))
    assert_same_tensors(load_file(str(broken / "backbone.safetensors")), load_file(str(whole / "backbone.safetensors")))


def run(recipe: str, args: list[str], batch_size: int, processes: int) -> subprocess.CompletedProcess:
    launcher = None if processes == 1 else ["torchrun", "--standalone", "--nproc_per_node", str(processes)]
    env = {**PINNED, "ACCELERATE_USE_CPU": "1"}
    return launch(recipe, *args, f"train.batch_size={batch_size}", "train.save_every=0", env=env, launcher=launcher, timeout=300)


@pytest.mark.slow
def test_beit_recipe__two_processes_end_with_one_process_weights_at_the_same_global_batch(beit_runs):
    root, first, two_processes = beit_runs
    one, two = root / "one", root / "two"
    proc = two_processes.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The launch ends in its last, killed run: every run before it (the 1-process x 8 one too) returned normally.
    assert first.returncode == -signal.SIGKILL and (one / "checkpoint-last").is_dir(), first.stderr[-3000:]
    state = json.loads((two / "checkpoint-last" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["effective_batch"] == 8 and state["step"] == STEPS
    a, b = checkpoint_state(one), checkpoint_state(two)
    assert a.keys() == b.keys()
    # Same masked count per sample: each process's mean CE over its half batch, averaged by DDP, is the
    # 1-process mean; only float sums in another order differ.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def tokenizer_runs(tmp_path_factory):
    """A random tiny ViT teacher, then one child process running, in order: the tokenizer recipe
    uninterrupted ("whole"), the 1-process x 8 run of the 2-process comparison ("one"), then the run
    SIGKILLed inside its 8th training forward ("broken"), which ends the process. Meanwhile (in a thread: it
    needs none of them) the 2-process x 4 run of the comparison ("two")."""
    root = tmp_path_factory.mktemp("tokenizer_runs")
    torch.manual_seed(0)
    save_backbone(create_backbone("vit_nano_patch4_32", depth=1, embed_dim=24, num_heads=2, img_size=16, num_classes=0), root / "teacher")
    base = [*DATA, NET, *RUN, "vqkd.codebook_size=16", "vqkd.codebook_dim=8", "vqkd.decoder_depth=1",
            "vqkd.usage_window=5", f"vqkd.teacher={root / 'teacher'}"]
    two = Background(run, "beit_tokenizer.py", [*base, f"output_dir={root / 'two'}"], 4, 2)
    proc = launch_sequence([
        {"recipe": "beit_tokenizer.py", "args": [*base, f"output_dir={root / 'whole'}"]},
        {"recipe": "beit_tokenizer.py", **one_process([*base, f"output_dir={root / 'one'}"])},
        {"recipe": "beit_tokenizer.py", "args": [*base, f"output_dir={root / 'broken'}"], "faults": "kill_forward=8"},
    ], env=PINNED)
    yield root, base, proc, two
    two.wait()


@pytest.mark.slow
def test_beit_tokenizer_recipe__two_processes_update_the_codebook_as_one_process(tokenizer_runs):
    root, base, first, two_processes = tokenizer_runs
    one, two = root / "one", root / "two"
    proc = two_processes.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The launch ends in its last, killed run: every run before it (the 1-process x 8 one too) returned normally.
    assert first.returncode == -signal.SIGKILL and (one / "checkpoint-last").is_dir(), first.stderr[-3000:]
    a, b = checkpoint_state(one), checkpoint_state(two)
    assert a.keys() == b.keys()
    # k-means init on the gathered batch and EMA sums reduced over processes: the codebook and the usage
    # counts follow the 1-process run.
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    assert (two / "tokenizer.safetensors").is_file() and (two / "tokenizer.json").is_file()


@pytest.mark.slow
def test_beit_tokenizer_recipe__killed_mid_step_and_relaunched_ends_as_an_uninterrupted_run(tokenizer_runs):
    root, base, proc, _ = tokenizer_runs
    whole, broken = root / "whole", root / "broken"
    # The launch ends in its last, killed run: the uninterrupted run before it returned normally.
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint_step(broken) == 6 and not (broken / "tokenizer.safetensors").exists()
    proc = launch("beit_tokenizer.py", *base, f"output_dir={broken}", env=PINNED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) == 6
    # Codebook, EMA counts and the usage window (module buffers) continue bit for bit.
    assert_same_tensors(checkpoint_state(broken), checkpoint_state(whole))
    assert_same_tensors(load_file(str(broken / "tokenizer.safetensors")), load_file(str(whole / "tokenizer.safetensors")))
    assert json.loads((broken / "tokenizer.json").read_text())["codebook_usage_last_window"] == json.loads(
        (whole / "tokenizer.json").read_text())["codebook_usage_last_window"]


def test_default_tokenizer_settings__keep_most_codes_in_use_on_a_patch_level_teacher(tmp_path):
    """beit_tokenizer_default.yaml's codebook (256 l2-normalised 32-d codes, k-means init, EMA 0.99, commitment
    1.0), scaled down in data and encoder only, on a ViT teacher (a code per patch): at least half of the codes
    are used in the last window (the default run's own figure is in its header). A collapse (dead codes after
    the k-means init) fails here."""
    torch.manual_seed(0)
    save_backbone(create_backbone("vit_nano_patch4_32", depth=1, embed_dim=24, num_heads=2, img_size=16, num_classes=0), tmp_path / "teacher")
    default = config("beit_tokenizer_default.yaml")
    assert (default.vqkd.codebook_size, default.vqkd.codebook_dim, default.vqkd.decay, default.vqkd.kmeans_init) == (256, 32, 0.99, True)
    args = ["data.synthetic_train_size=512", "data.synthetic_eval_size=8", "data.image_size=16", "data.num_workers=0",
            NET, "train.batch_size=32", "train.max_steps=32", "train.save_every=0", "train.log_every=8",
            "train.vis_every=0", "vqkd.usage_window=16", f"vqkd.teacher={tmp_path / 'teacher'}",
            "vqkd.train_teacher=null", f"output_dir={tmp_path / 'tok'}"]
    load_recipe("beit_tokenizer").main(args)
    info = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert info["codebook_size"] == 256
    assert info["codebook_usage_last_window"] >= 0.5, info["codebook_usage_last_window"]
