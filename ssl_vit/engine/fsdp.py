"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the engine: one code path on GPUs and on CPUs.

A run asks for FSDP the way Accelerate reads it: an accelerate config file with `distributed_type: FSDP`
and `fsdp_config` (recipes/configs/accelerate/fsdp_*.yaml), which `accelerate launch` turns into
ACCELERATE_USE_FSDP=true and FSDP_* variables; Accelerate's `FullyShardedDataParallelPlugin` reads them.
Accelerate 1.16 switches to its FSDP state only on accelerator process groups (MULTI_GPU, ...;
accelerate/state.py), never on MULTI_CPU, so `enable_on_cpu` puts a multi-process CPU run that asks for
FSDP into that same state: from there on `accumulate` (no gradient sync between micro-batches) and
`clip_grad_norm_` take Accelerate's FSDP2 branches on every device. The process group's own state
(PartialState: barriers, gathers) stays MULTI_CPU, which is what gloo needs.

`shard` wraps the objective on every device before its optimizer is built, as Accelerate's
`fsdp2_prepare_model` does: `fully_shard` on each transformer block (`fsdp_transformer_layer_cls_to_wrap`,
timm's `Block`: the backbone's, the MAE decoder's, a ViT teacher's), then on the objective itself (the
root: embeddings, norms, heads, tokens, a convnet teacher), on an explicit device mesh of the run's device
type. `prepare` then hands the optimizer and the data loaders to Accelerate and keeps the model as it is.

Checkpoints (`fsdp_state_dict_type`): SHARDED_STATE_DICT writes `checkpoint-last/sharded/` with
torch.distributed.checkpoint (DCP: one `__<rank>_0.distcp` file per process plus `.metadata`) holding the
objective's and the optimizer's sharded state; FULL_STATE_DICT gathers them into `model.safetensors` and
`optimizer.pt` as without FSDP. Either way `backbone.safetensors` is gathered in full (timm keys), and the
rest of the folder (rng/, trainer_state.json written last, the atomic swap) is the engine's usual one.
A resume reads whichever format the folder holds; DCP re-shards, so a sharded checkpoint also loads on
another number of processes, and into a run without FSDP.

Objective hooks under FSDP see the sharded parameters (DTensors) outside forward: an EMA teacher that
`lerp_`s its parameters towards the student's (`on_step_end`) works shard by shard, as long as the teacher
is sharded like the student (a deep copy of the backbone is: its blocks are `Block`s too).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from accelerate.utils import (
    DistributedType,
    DynamoBackend,
    FullyShardedDataParallelPlugin,
    get_module_children_bottom_up,
    parse_flag_from_env,
)
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, StateDictType, fully_shard
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from ssl_vit.engine.checkpoint import CheckpointError

__all__ = [
    "SHARDED",
    "enable_on_cpu",
    "full_model_state",
    "is_sharded",
    "load_states",
    "prepare",
    "requested",
    "save_sharded",
    "shard",
    "sharded_checkpoints",
]

log = logging.getLogger("ssl_vit.engine")

SHARDED = "sharded"  # checkpoint-last/sharded/: the DCP folder of a SHARDED_STATE_DICT run
DEFAULT_WRAP = ["Block"]  # timm's transformer block (backbone, MAE decoder, ViT teachers)


def requested() -> bool:
    """The launch asks for FSDP (ACCELERATE_USE_FSDP=true: an accelerate config with distributed_type FSDP)."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def enable_on_cpu(accelerator: Any) -> None:
    """Put a multi-process CPU run that asks for FSDP into Accelerate's FSDP state, as a GPU run is put.

    The plugin is built from the same FSDP_* variables Accelerate reads on GPUs (one config file for
    both); mixed precision goes into its MixedPrecisionPolicy, as accelerate/state.py does.
    """
    if not requested():
        return
    if accelerator.distributed_type == DistributedType.NO:
        log.warning(
            "ACCELERATE_USE_FSDP=true with a single process: training without FSDP (nothing to shard over). "
            "Launch several processes (accelerate launch --num_processes N, or torchrun) to shard."
        )
        return
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return  # GPUs: Accelerate made its FSDP state already
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP


def _plugin(accelerator: Any) -> FullyShardedDataParallelPlugin:
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"fsdp_version: {plugin.fsdp_version} in the accelerate config: ssl_vit trains with FSDP2 only; set "
            f"fsdp_version: 2 (recipes/configs/accelerate/fsdp_vit_large.yaml)."
        )
    if plugin.activation_checkpointing:
        raise ValueError(
            "fsdp_activation_checkpointing: true in the accelerate config: set it to false and use "
            "train.grad_checkpointing=true (timm's per-block checkpointing, which works under FSDP)."
        )
    return plugin


def shard(model: nn.Module, accelerator: Any) -> nn.Module:
    """`fully_shard` each module the plugin's wrap policy picks (timm's `Block`s), then `model` itself; in place.

    The policy is Accelerate's own (`set_auto_wrap_policy` + `fsdp2_prepare_auto_wrap_policy`, the
    bottom-up walk of `fsdp2_prepare_model`). Call it before building the optimizer, which then holds the
    sharded parameters, and `prepare` after.
    """
    plugin = _plugin(accelerator)
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and not plugin.transformer_cls_names_to_wrap:
        plugin.transformer_cls_names_to_wrap = list(DEFAULT_WRAP)  # our models name no `_no_split_modules`
    # Class names -> classes, on the plain model (once sharded, a `Block` is an `FSDPBlock`); raises naming
    # a class the model does not have.
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    # Explicit, so a CPU run stays on the CPU on a machine that also has a GPU (the default mesh would not).
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=plugin.reshard_after_forward,
        offload_policy=plugin.cpu_offload,
        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    )
    if policy is not None:
        for module in get_module_children_bottom_up(model)[:-1]:
            if policy(module) and not isinstance(module, FSDPModule):
                fully_shard(module, **kwargs)
    # The root keeps torch's default for reshard_after_forward (its parameters are needed again at once).
    fully_shard(model, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
    return model


def prepare(accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer, *others: Any) -> tuple[Any, ...]:
    """`accelerator.prepare(model, optimizer, *others)` for a model `shard` wrapped and an optimizer built on
    its shards: the optimizer and the others (data loaders) go through Accelerate; the model stays as it
    is (compiled when the run asks for torch.compile, as Accelerate's FSDP2 prepare would).

    Accelerate's FSDP2 prepare re-maps the optimizer's parameters by data pointer, and the empty local
    shards of small parameters (a (1, 1, D) class token has no rows on the second process) all point to
    0, so the second process's optimizer would get the wrong tensors.
    """
    dynamo = accelerator.state.dynamo_plugin
    if dynamo.backend != DynamoBackend.NO:
        model = torch.compile(model, **dynamo.to_kwargs())
    return (model, accelerator.prepare_optimizer(optimizer), *(accelerator.prepare(o) for o in others))


def sharded_checkpoints(accelerator: Any) -> bool:
    """Whether this FSDP run writes per-process shards (SHARDED_STATE_DICT) or gathered files (FULL_STATE_DICT)."""
    return accelerator.state.fsdp_plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state_dict, gathered on CPU in the main process (all must call it; the others get {})."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(folder: Path) -> bool:
    """A checkpoint folder written by a SHARDED_STATE_DICT run."""
    return (Path(folder) / SHARDED / ".metadata").is_file()


def _failures(err: BaseException) -> str:
    failures = getattr(err, "failures", None) or {}
    return "; ".join(f"rank {rank}: {type(e).__name__}: {e}" for rank, e in failures.items()) or str(err)


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the model and optimizer state into `folder/sharded/` (DCP).

    A failed write on any process raises OSError on every process (DCP agrees on the outcome).
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    path = Path(folder) / SHARDED
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)
    except CheckpointException as err:  # a BaseException: it would pass the engine's error handling
        raise OSError(f"writing the sharded checkpoint {path} failed: {_failures(err)}") from None


def load_states(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor] | None = None,
    optim_state: dict[str, Any] | None = None,
) -> None:
    """Restore `model` and `optimizer` (FSDP-sharded or not) from checkpoint `folder`: its DCP shards when it
    has them, else the full state dicts read from its files. Every process must call it."""
    if not is_sharded(folder):
        set_state_dict(
            model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True),
        )
        return
    # The run's own state dicts (sharded where the run is) as the templates DCP loads into, in place.
    current_model, current_optim = get_state_dict(model, optimizer)
    state = {"model": current_model, "optimizer": current_optim}
    path = Path(folder) / SHARDED
    try:
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    except CheckpointException as err:
        raise CheckpointError(f"reading the sharded checkpoint {path} failed: {_failures(err)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
