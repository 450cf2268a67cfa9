"""The objective contract, used as a new contributor would: a module outside the package with its own
views (two sizes), its own config group, step hooks, an EMA teacher updated after each step, and the
teacher exported. It trains through `recipes/pretrain.py` with no change to `ssl_vit/`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ssl_vit.config import ConfigError, PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
from reliability_common import CHILD_ENV, launch_sequence  # noqa: E402

TWO_VIEW_MODULE = textwrap.dedent(
    '''
    """Two views of each image (16 px and 8 px); the student matches an EMA teacher's class token."""
    import copy
    import dataclasses
    import os
    import signal

    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torchvision import transforms as T

    from ssl_vit.objectives import register_objective


    @dataclasses.dataclass
    class TwoViewConfig:
        momentum: float = 0.9
        small: int = 8
        hook_log: str = ""


    class TwoViews:
        def __init__(self, size, small, mean, std):
            norm = [T.ToTensor(), T.Normalize(mean, std)]
            self.big = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), *norm])
            self.small = T.Compose([T.RandomResizedCrop(small, scale=(0.2, 0.5)), *norm])

        def __call__(self, image):
            return {"views": [self.big(image), self.small(image)]}


    @register_objective("two_view")
    class TwoView(nn.Module):
        needs_labels = False
        config_groups = {"two_view": TwoViewConfig}

        def __init__(self, backbone, momentum=0.9, small=8, hook_log=""):
            super().__init__()
            self.backbone = backbone
            self.teacher = copy.deepcopy(backbone).requires_grad_(False)
            self.head = nn.Linear(backbone.embed_dim, backbone.embed_dim)
            self.momentum, self.small, self.hook_log = momentum, small, hook_log

        def train_transform(self, data_cfg):
            return TwoViews(data_cfg.image_size, self.small, tuple(data_cfg.mean), tuple(data_cfg.std))

        def export_backbone(self):
            return self.teacher

        def forward(self, batch):
            big, small = batch["views"]  # (B, 3, 16, 16), (B, 3, 8, 8)
            assert big.shape[-1] == 2 * small.shape[-1]
            small = F.interpolate(small, size=big.shape[-2:], mode="bilinear", align_corners=False)
            student = self.head(self.backbone.forward_features(small)[:, 0])  # (B, D)
            with torch.no_grad():
                target = self.teacher.forward_features(big)[:, 0]  # (B, D)
            loss = 1 - F.cosine_similarity(student, target, dim=-1).mean()
            return {"loss": loss, "views": torch.tensor(float(len(batch["views"])))}

        def _log(self, name, step, total_steps):
            if self.hook_log:
                with open(self.hook_log, "a") as f:
                    f.write(f"{os.getpid()} {name} {step} {total_steps}\\n")

        def on_train_start(self, total_steps, steps_per_epoch):
            self._log("train_start", round(steps_per_epoch * 1000), total_steps)

        def on_step_start(self, step, total_steps):
            self._log("start", step, total_steps)

        def on_before_optimizer_step(self, step, total_steps):
            assert all(p.grad is not None for p in self.head.parameters())  # after backward
            self._log("before", step, total_steps)

        def on_step_end(self, step, total_steps):
            assert not torch.is_grad_enabled()
            for t, s in zip(self.teacher.parameters(), self.backbone.parameters()):
                t.mul_(self.momentum).add_(s.detach(), alpha=1 - self.momentum)
            self._log("end", step, total_steps)
            if os.environ.get("TWO_VIEW_KILL_AT") == str(step):
                os.kill(os.getpid(), signal.SIGKILL)  # as a preempted job dies: no cleanup at all
    '''
)

STEPS = 6
RUN = [
    "objective.module=two_view_mod",
    "objective.name=two_view",
    "two_view.momentum=0.8",
    "model.args={depth: 2, embed_dim: 32, num_heads: 2}",
    "data.image_size=16",
    "data.synthetic_train_size=64",
    "data.synthetic_eval_size=16",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.grad_accum_steps=2",  # 4 optimizer steps an epoch: the run crosses an epoch boundary
    f"train.max_steps={STEPS}",
    "train.save_every=2",
    "train.log_every=1",
]


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "two_view_mod.py").write_text(TWO_VIEW_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def user_env(folder: Path) -> dict:
    """The user's folder on PYTHONPATH, as a contributor's module outside the package is found."""
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def launch(folder: Path, out: Path, log: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    # One thread, as launch_sequence's runs (CHILD_ENV): runs compared bit for bit use the same count.
    env = {**os.environ, **CHILD_ENV, **user_env(folder)}
    env.pop("TWO_VIEW_KILL_AT", None)
    if kill_at is not None:
        env["TWO_VIEW_KILL_AT"] = str(kill_at)
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), *RUN, f"two_view.hook_log={log}", f"output_dir={out}"]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def hook_calls(log: Path) -> list[list[tuple[str, int]]]:
    """The logged hook calls, one list per process that ran (in order)."""
    sessions: dict[str, list[tuple[str, int]]] = {}
    for line in log.read_text().splitlines():
        pid, name, step, total = line.split()
        assert int(total) == STEPS
        sessions.setdefault(pid, []).append((name, int(step)))
    return list(sessions.values())


def once_per_step(steps: range) -> list[tuple[str, int]]:
    return [(name, s) for s in steps for name in ("start", "before", "end")]


def test_own_config_group__parses_helps_and_is_the_only_group_saved(user_module: Path, capsys) -> None:
    cfg = load_config(PretrainConfig, RUN)
    assert cfg.two_view.momentum == 0.8 and cfg.two_view.small == 8
    assert not hasattr(cfg, "mae") and not hasattr(cfg, "supervised")  # only the chosen objective's group
    with pytest.raises(ConfigError, match="did you mean 'two_view.momentum'"):
        load_config(PretrainConfig, [*RUN, "two_view.momentun=0.5"])
    with pytest.raises(ConfigError, match="two_view.small.*expected int"):
        load_config(PretrainConfig, [*RUN, "two_view.small=big"])
    with pytest.raises(SystemExit):
        load_config(PretrainConfig, [*RUN, "--help"])
    assert "two_view.momentum = 0.8  (float)" in capsys.readouterr().out


def test_builtin_keys__keep_working_and_belong_to_their_objective() -> None:
    mae = load_config(PretrainConfig, ["objective.name=mae", "mae.mask_ratio=0.6"])
    deit = load_config(PretrainConfig, ["objective.name=deit", "supervised.mixup=0.8", "distill.type=soft"])
    assert mae.mae.mask_ratio == 0.6 and deit.supervised.mixup == 0.8 and deit.distill.type == "soft"
    assert not hasattr(mae, "distill") and not hasattr(deit, "mae")
    with pytest.raises(ConfigError, match="unknown config key 'distill.type'"):
        load_config(PretrainConfig, ["objective.name=mae", "distill.type=soft"])
    with pytest.raises(ConfigError, match="Did you mean 'mae'"):
        load_config(PretrainConfig, ["objective.name=maee"])


@pytest.mark.slow
def test_objective_outside_the_package__views_hooks_teacher_export_and_kill_resume(user_module: Path, tmp_path: Path) -> None:
    # An uninterrupted run, then one killed by SIGKILL inside step 3 (after the step-2 checkpoint): one
    # child process runs both, one after the other (imports paid once); the kill ends it.
    whole, whole_log = tmp_path / "whole", tmp_path / "whole.log"
    broken, broken_log = tmp_path / "broken", tmp_path / "broken.log"
    pretrain = str(ROOT / "recipes" / "pretrain.py")
    proc = launch_sequence([
        {"recipe": pretrain, "args": [*RUN, f"two_view.hook_log={whole_log}", f"output_dir={whole}"]},
        {"recipe": pretrain, "args": [*RUN, f"two_view.hook_log={broken_log}", f"output_dir={broken}"],
         "env": {"TWO_VIEW_KILL_AT": "3"}},
    ], env=user_env(user_module), timeout=600, cwd=user_module)
    # The launch ends in its last, killed run: the uninterrupted run before it returned normally.
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (whole / "backbone.safetensors").is_file(), proc.stderr[-3000:]
    # Each hook once per optimizer step (2 micro-batches each), in order, steps consecutive; a
    # schedule "epoch" = total_steps / train.epochs (max_steps=6 of 10 epochs: 0.6 steps).
    assert hook_calls(whole_log) == [[("train_start", 600), *once_per_step(range(STEPS))]]
    saved = yaml.safe_load((whole / "config.yaml").read_text())
    assert saved["two_view"]["momentum"] == 0.8 and "mae" not in saved and "distill" not in saved

    # backbone.safetensors holds the teacher (the EMA), not the student.
    exported = load_file(str(whole / "backbone.safetensors"))
    state = load_file(str(whole / "checkpoint-last" / "model.safetensors"))
    for key, value in exported.items():
        assert torch.equal(value, state[f"teacher.{key}"]), key
    assert any(not torch.equal(exported[k], state[f"backbone.{k}"]) for k in exported)

    # The run killed inside step 3 (after the step-2 checkpoint), relaunched.
    proc = launch(user_module, broken, broken_log)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 2" in proc.stderr
    first, second = hook_calls(broken_log)
    assert first == [("train_start", 600), *once_per_step(range(4))]
    # The same step numbers after the resume.
    assert second == [("train_start", 600), *once_per_step(range(2, STEPS))]
    resumed = load_file(str(broken / "backbone.safetensors"))
    assert set(resumed) == set(exported)
    for key, value in exported.items():
        assert torch.equal(resumed[key], value), key
