"""FSDP2 on the CPU with two real processes (gloo), launched as the README launches ViT-L/H on GPUs:
`accelerate launch --config_file recipes/configs/accelerate/fsdp_vit_large.yaml`, with ACCELERATE_USE_CPU=1,
--num_processes 2 and --mixed_precision no. A MAE run and a DeiT run (a ViT teacher: frozen, sharded too)
train, write sharded checkpoints (DCP, one file per process), resume after SIGKILL to the uninterrupted
run's state bit for bit, export a full backbone that timm loads strictly, and end within float rounding
of the same runs under DDP.

Three launches share the work (tests/distributed/recipe_runs.py runs several recipes per launch):
    1. MAE and DeiT uninterrupted (the references); MAE killed in step 6 (checkpoint of step 3 on disk)
    2. MAE relaunched (resumes at step 3); DeiT killed in step 6
    3. DeiT relaunched; MAE and DeiT under DDP; a DDP run resuming a copy of MAE's sharded step-3 checkpoint;
       MAE under FSDP with gathered checkpoints (fsdp_state_dict_type FULL_STATE_DICT)
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys

import pytest
import torch
from dist_launch import (
    FSDP_CONFIG,
    RECIPE_RUNS,
    STEPS,
    TINY,
    TINY_MAE,
    assert_same_tensors,
    backbone,
    free_port,
    run,
    trainer_state,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

OBJECTIVES = ["mae", "deit"]
KILL_FORWARD = 6  # inside step 6 (1-based): the checkpoint of step 3 is the last one on disk
RESUMED_AT = 3
# FSDP against DDP: the same data, masks and updates; only the float32 rounding of the gradient reduction
# differs (reduce-scatter of shards against an all-reduce, predivided differently; the clipping norm summed
# shard by shard). Measured after 8 steps: MAE bit for bit equal, DeiT max |diff| 3.6e-12 (one tensor).
# 3e-6 leaves room for other CPUs' kernels and still fails a step missed, repeated or applied to the wrong
# shard: an AdamW step moves a weight by about its lr, here 0.8e-5 to 4.7e-5 (blr x 8 images / 256 after
# a 4-step warm-up; blr 1.5e-3 MAE, 1e-3 DeiT). The two runs round differently: under FSDP the wrapped
# last block computes every token and is sliced (`block_queries` falls back), under DDP only the tokens
# read (measured 1.5e-6 apart after the MAE resume).
DDP_ATOL = 3e-6


def recipe(objective: str) -> str:
    return f"{objective}_pretrain.py"


def launch(plan: list[dict], tmp, name: str):
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(plan))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        str(RECIPE_RUNS), str(path),
    ]
    return run(cmd, timeout=300)


def resumed_at(stderr: str, out) -> int | None:
    found = re.search(rf"resuming from {re.escape(str(out))}/checkpoint-last at step (\d+)", stderr)
    return int(found.group(1)) if found else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ssl_vit.engine.checkpoint import save_backbone
    from ssl_vit.models import create_backbone

    root = tmp_path_factory.mktemp("fsdp")
    teacher = create_backbone("vit_tiny_patch4_32", img_size=16, depth=1, embed_dim=32, num_heads=2, num_classes=10)
    save_backbone(teacher, root / "teacher")
    args = {
        "mae": TINY_MAE,
        "deit": [*TINY, "model.name=deit_tiny_distilled_patch4_32", f"distill.teacher={root / 'teacher'}"],
    }
    fsdp, ddp = {"ACCELERATE_USE_FSDP": "true"}, {"ACCELERATE_USE_FSDP": "false"}
    full = {"FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}

    def step(objective, out, env=fsdp, kill=None):
        argv = [*args[objective], f"output_dir={root / out}"]
        return dict(recipe=recipe(objective), args=argv, env=env, kill_forward=kill)

    def launched(name, plan, killed):
        proc = launch(plan, root, name)
        ended = f"exitcode  : {-signal.SIGKILL}" in proc.stderr if killed else proc.returncode == 0
        assert ended, f"launch {name}:\n{proc.stderr[-5000:]}"
        return proc

    seen: dict = {"root": root}
    first = [step("mae", "mae_ref"), step("deit", "deit_ref"), step("mae", "mae", kill=KILL_FORWARD)]
    seen["first"] = launched("first", first, True)
    # A DDP run will resume this copy of the FSDP checkpoint of step 3.
    shutil.copytree(root / "mae", root / "mae_fsdp_then_ddp")
    seen["killed_at"] = {"mae": trainer_state(root / "mae")["step"]}
    seen["second"] = launched("second", [step("mae", "mae"), step("deit", "deit", kill=KILL_FORWARD)], True)
    seen["killed_at"]["deit"] = trainer_state(root / "deit")["step"]
    seen["third"] = launched("third", [
        step("deit", "deit"), step("mae", "mae_ddp", env=ddp), step("deit", "deit_ddp", env=ddp),
        step("mae", "mae_fsdp_then_ddp", env=ddp), step("mae", "mae_full", env={**fsdp, **full}),
    ], False)
    seen["resumed_at"] = {
        "mae": resumed_at(seen["second"].stderr, root / "mae"),
        "deit": resumed_at(seen["third"].stderr, root / "deit"),
    }
    seen["ddp_resumed_at"] = resumed_at(seen["third"].stderr, root / "mae_fsdp_then_ddp")
    return seen


def test_launches__two_killed_by_sigkill_then_all_complete(runs):
    for name in ("first", "second"):
        proc = runs[name]
        assert proc.returncode != 0, proc.stderr[-3000:]
        assert f"exitcode  : {-signal.SIGKILL}" in proc.stderr, proc.stderr[-3000:]
    assert runs["third"].returncode == 0, runs["third"].stderr[-5000:]
    assert runs["killed_at"] == {"mae": RESUMED_AT, "deit": RESUMED_AT}
    assert runs["resumed_at"] == {"mae": RESUMED_AT, "deit": RESUMED_AT}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_checkpoint__one_shard_file_per_process_parameters_split_between_them(runs, objective):
    from torch.distributed.checkpoint import FileSystemReader

    folder = runs["root"] / f"{objective}_ref" / "checkpoint-last"
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2
    assert sorted(p.name for p in (folder / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (folder / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
    assert not (folder / "model.safetensors").exists() and not (folder / "optimizer.pt").exists()
    meta = FileSystemReader(str(folder / "sharded")).read_metadata().state_dict_metadata
    for key in ("model.backbone.blocks.0.attn.qkv.weight", "model.backbone.patch_embed.proj.weight"):
        # A block's own shard unit and the root's: each parameter's rows are split over the 2 processes.
        assert meta[key].size[0] == (96 if "qkv" in key else 32)
        assert sorted(c.offsets[0] for c in meta[key].chunks) == [0, meta[key].size[0] // 2]
    assert any(k.startswith("optimizer.state.backbone.blocks.0.attn.qkv.weight") for k in meta)


def full_checkpoint(folder) -> dict[str, torch.Tensor]:
    """A sharded checkpoint gathered into one flat dict of tensors (model and optimizer)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.parent / f"{folder.parent.name}_gathered.pt"
    dcp_to_torch_save(str(folder / "sharded"), str(target))
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif torch.is_tensor(value):
            flat[prefix] = value

    walk("", torch.load(str(target), weights_only=True))
    return flat


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sigkill_then_relaunch__same_model_and_optimizer_state_as_the_uninterrupted_run(runs, objective):
    root = runs["root"]
    assert_same_tensors(backbone(root / objective), backbone(root / f"{objective}_ref"))
    resumed = full_checkpoint(root / objective / "checkpoint-last")
    reference = full_checkpoint(root / f"{objective}_ref" / "checkpoint-last")
    assert any(".exp_avg" in k for k in reference)
    assert_same_tensors(resumed, reference)
    checkpoints = sorted(p.name for p in (root / objective).iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-last"]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_backbone__full_weights_that_timm_loads_strictly(runs, objective):
    import timm

    out = runs["root"] / f"{objective}_ref"
    name, kwargs = json.loads((out / "backbone.json").read_text())["timm"]
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(backbone(out), strict=True)  # full shapes: nothing of a shard is left
    assert model.blocks[0].attn.qkv.weight.shape == (96, 32)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fsdp__same_weights_as_ddp_within_float_rounding(runs, objective):
    root = runs["root"]
    fsdp, ddp = backbone(root / f"{objective}_ref"), backbone(root / f"{objective}_ddp")
    assert fsdp.keys() == ddp.keys()
    worst = max(float((fsdp[k].double() - ddp[k].double()).abs().max()) for k in fsdp)
    assert worst <= DDP_ATOL, worst
    assert trainer_state(root / f"{objective}_ddp")["step"] == STEPS


def test_ddp_run__resumes_an_fsdp_sharded_checkpoint(runs):
    root = runs["root"]
    assert runs["ddp_resumed_at"] == RESUMED_AT
    resumed, ddp = backbone(root / "mae_fsdp_then_ddp"), backbone(root / "mae_ddp")
    assert max(float((resumed[k].double() - ddp[k].double()).abs().max()) for k in ddp) <= DDP_ATOL
    # It writes the checkpoint format of its own run (gathered files) from then on.
    assert (root / "mae_fsdp_then_ddp" / "checkpoint-last" / "model.safetensors").is_file()
    assert not (root / "mae_fsdp_then_ddp" / "checkpoint-last" / "sharded").exists()


def test_sharded_checkpoint__loads_into_one_process_without_fsdp(runs):
    """DCP re-shards: the two processes' shards load into a plain objective and optimizer, no process group."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from ssl_vit.config import PretrainConfig, load_config
    from ssl_vit.engine import fsdp
    from ssl_vit.engine.optim import build_optimizer, param_groups
    from ssl_vit.engine.run import build_run_objective

    out = runs["root"] / "mae_ref"
    cfg = load_config(PretrainConfig, [], default_file=out / "config.yaml")
    objective = build_run_objective(cfg, 0)
    optimizer = build_optimizer(param_groups(objective, cfg.optim.weight_decay, cfg.optim.layer_decay), cfg.optim, 1e-3)
    fsdp.load_states(out / "checkpoint-last", objective, optimizer)
    reference = full_checkpoint(out / "checkpoint-last")
    loaded = {f".model.{k}": v for k, v in objective.state_dict().items()}
    for name, state in get_optimizer_state_dict(objective, optimizer)["state"].items():
        loaded.update({f".optimizer.state.{name}.{k}": v for k, v in state.items()})
    assert_same_tensors(loaded, reference)


def test_full_state_dict__gathered_checkpoint_files_same_training(runs):
    folder = runs["root"] / "mae_full" / "checkpoint-last"
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["model.safetensors", "optimizer.pt", "rng", "trainer_state.json"]
    assert_same_tensors(backbone(runs["root"] / "mae_full"), backbone(runs["root"] / "mae_ref"))
