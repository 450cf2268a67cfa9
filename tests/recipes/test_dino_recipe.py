"""recipes/dino_pretrain.py end to end, in child processes: a run killed mid-step and relaunched ends
with an uninterrupted run's weights (teacher, centre and schedules resumed); 2 processes end with
1 process's weights at the same global batch (the centre is all-reduced).

Across processes DINO has one per-process statistic, the teacher centre: each process sums its teacher
outputs and `on_step_end` all-reduces sums and counts, so every process moves the centre by the global
batch mean. The teacher is the same everywhere (an EMA, on every process, of the student that DDP keeps
identical); the ViT and the DINO head have no batch norm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
from reliability_common import (  # noqa: E402
    Background,
    assert_same_tensors,
    checkpoint_state,
    checkpoint_step,
    launch,
    launch_sequence,
    resumed_at,
)

pytestmark = pytest.mark.slow

# 32 synthetic 16x16 images, batch 8: 4 steps an epoch, 3 epochs = 12 steps, a checkpoint every 3.
# Every DINO schedule changes inside the run: the teacher temperature warms up over 2 epochs (8 steps),
# the last layer is frozen for the first epoch, the momentum follows its cosine, the centre moves.
TINY_DINO = [
    "data.synthetic_train_size=32",
    "data.synthetic_eval_size=8",
    "data.image_size=16",
    "model.args={depth: 1, embed_dim: 32, num_heads: 2, dynamic_img_size: true}",
    "dino.out_dim=64",
    "dino.hidden_dim=32",
    "dino.bottleneck_dim=16",
    "dino.local_crops=2",  # 8 px: 2x2 patches
    "dino.momentum_teacher=0.9",  # a teacher that moves visibly in 12 steps
    "dino.warmup_teacher_temp=0.04",
    "dino.teacher_temp=0.07",
    "dino.warmup_teacher_temp_epochs=2",
    "dino.freeze_last_layer_epochs=1",
    "train.batch_size=8",
    "train.epochs=3",
    "optim.warmup_epochs=1",
    "train.save_every=3",
    "train.log_every=3",
    "train.vis_every=0",
]
STEPS = 12
# One thread per process (shared CI cores; bit-for-bit comparisons use the same count) and PyTorch's own
# linear kernels: a per-machine kernel choice measured anew by each launch could differ between them.
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SSL_VIT_ONEDNN_LINEAR": "0"}


def test_dino_recipe__killed_mid_step_and_relaunched_ends_as_an_uninterrupted_run(one_process_runs):
    root, proc, _ = one_process_runs
    whole, broken = root / "whole", root / "broken"
    # The launch ends in its last, killed run: the uninterrupted run before it returned normally.
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint_step(whole) == STEPS
    reference = checkpoint_state(whole)
    exported = load_file(str(whole / "backbone.safetensors"))
    # The teacher is what is exported; it differs from the student, and the centre has moved.
    for key, value in exported.items():
        assert torch.equal(value, reference[f"teacher.backbone.{key}"]), key
    assert any(not torch.equal(exported[k], reference[f"backbone.{k}"]) for k in exported)
    assert reference["center"].abs().sum() > 0
    assert (whole / "dino_views.png").exists() and (whole / "dino_attention.png").exists()

    # SIGKILLed inside the 8th training forward (step 7, after the step-6 checkpoint), then relaunched.
    assert checkpoint_step(broken) == 6
    proc = launch("dino_pretrain.py", *TINY_DINO, f"output_dir={broken}", env=PINNED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_at(proc.stderr) == 6
    assert_same_tensors(checkpoint_state(broken), reference)
    assert_same_tensors(load_file(str(broken / "backbone.safetensors")), exported)


# Fixed views: the augmentations draw from per-process random streams, which differ between a run of
# 1 process and one of 2, so this comparison replaces them (the training step is what it is about).
FIXED_VIEWS_LAUNCHER = textwrap.dedent(
    '''
    """Run a recipe with DINO's random multi-crop views replaced by fixed ones."""
    import runpy
    import sys

    from torchvision.transforms import functional as TF

    from ssl_vit.objectives.dino import DINO


    class FixedViews:
        def __init__(self, size, local, mean, std):
            self.size, self.local, self.mean, self.std = size, local, list(mean), list(std)

        def view(self, image, size):
            return TF.normalize(TF.to_tensor(TF.resize(image, [size, size])), self.mean, self.std)

        def __call__(self, image):
            big, small = self.view(image, self.size), self.view(image, self.local)
            return {"global_crops": [big, TF.hflip(big)], "local_crops": [small, TF.vflip(small)]}


    real_train_transform = DINO.train_transform
    DINO.train_transform = lambda self, data_cfg: FixedViews(data_cfg.image_size, 8, data_cfg.mean, data_cfg.std)
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:  # a later run in the same process (sequence_launch.py) gets DINO's own views again
        DINO.train_transform = real_train_transform
    '''
)


def fixed_views_args(out: Path, batch_size: int) -> list[str]:
    return [str(ROOT / "recipes" / "dino_pretrain.py"), *TINY_DINO, "data.num_workers=0", f"train.batch_size={batch_size}",
            "train.save_every=0", f"output_dir={out}"]


def run_fixed_views(launcher: Path, out: Path, batch_size: int, processes: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable] if processes == 1 else ["torchrun", "--standalone", "--nproc_per_node", str(processes)]
    cmd += [str(launcher), *fixed_views_args(out, batch_size)]
    env = {**os.environ, **PINNED, "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """One child process (imports paid once) runs, in order: the uninterrupted run ("whole"), the 1-process
    x 8 fixed-views run of the 2-process comparison ("one"), then the run SIGKILLed inside its 8th training
    forward (step 7, after the step-6 checkpoint; "broken"), which ends the process. Meanwhile (in a thread:
    it needs none of them) the fixed-views 2-process x 4 run of the comparison ("two")."""
    root = tmp_path_factory.mktemp("dino_runs")
    launcher = root / "fixed_views.py"
    launcher.write_text(FIXED_VIEWS_LAUNCHER)
    two = Background(run_fixed_views, launcher, root / "two", batch_size=4, processes=2)
    proc = launch_sequence([
        {"recipe": "dino_pretrain.py", "args": [*TINY_DINO, f"output_dir={root / 'whole'}"]},
        {"recipe": str(launcher), "args": fixed_views_args(root / "one", batch_size=8), "env": {"ACCELERATE_USE_CPU": "1"}},
        {"recipe": "dino_pretrain.py", "args": [*TINY_DINO, f"output_dir={root / 'broken'}"], "faults": "kill_forward=8"},
    ], env=PINNED)
    yield root, proc, two
    two.wait()


def test_dino_recipe__two_processes_end_with_one_process_weights_at_the_same_global_batch(one_process_runs):
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
    # Float sums in another order (each process's half, then the all-reduce): equal to rounding, which
    # AdamW's normalised steps carry over 12 steps (measured: at most 5e-8 apart). Without the centre's
    # all-reduce (each process's centre from its own 4 images) the centre is 6e-3 apart and the student
    # 5e-5: far outside this tolerance.
    # The one exception: the key third of each qkv bias. Softmax ignores a shift shared by every key, so its
    # true gradient is 0 and what it gets is rounding noise, which AdamW's normalised steps turn into moves
    # of up to the lr (here ~1e-6 apart after 12 steps, since the class-token classifier's last block
    # computes its queries alone: other GEMM shapes, other rounding).
    for key in a:
        if key.endswith("attn.qkv.bias"):
            d = a[key].numel() // 3
            torch.testing.assert_close(b[key][d : 2 * d], a[key][d : 2 * d], rtol=0, atol=1e-5, msg=key)
            b[key][d : 2 * d] = a[key][d : 2 * d]
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert a["center"].abs().max() > 1e-3
