"""The one training loop (Accelerate) that every objective, pretraining and fine-tuning, runs through.

Accelerate owns processes, devices and precision; this loop owns the order of things: per-step lr,
gradient accumulation, clipping, the non-finite guard, EMA, logging, evaluation, images, checkpoints
and resuming so that a killed and relaunched run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs
from tqdm.auto import tqdm

from ssl_vit.config import ConfigError
from ssl_vit.data.config import IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.engine import checkpoint as ckpt
from ssl_vit.engine import fsdp
from ssl_vit.engine.evaluate import classify
from ssl_vit.engine.process import fresh_accelerator
from ssl_vit.engine.optim import EMA, build_optimizer, cosine_schedule, param_groups, scaled_lr
from ssl_vit.engine.seeding import capture_rng, isolated_rng, mix_seed, restore_rng, seeded_loader, set_loader_epoch
from ssl_vit.engine.tracking import build_trackers, log_summary, start_trackers, tensorboard_writer
from ssl_vit.objectives.base import exported_backbone

__all__ = ["NonFiniteLossError", "Trainer", "cpu_has_native_bf16", "make_accelerator"]

log = logging.getLogger("ssl_vit.engine")

# torch.compile backend for train.compile (tests swap in "aot_eager": same tracing, no C++ build).
COMPILE_BACKEND = "inductor"


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the message names the step and the fix."""


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_accelerator(cfg: Any) -> Any:
    """A fresh Accelerator for this run: precision, accumulation, trackers (train.report_to), seeded shuffling."""
    tc = cfg.train
    if tc.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "train.mixed_precision=fp16 needs a GPU; on CPU use train.mixed_precision=bf16 (slow without "
            "native bf16) or 'no'."
        )
    accelerator = fresh_accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum_steps,
        log_with=build_trackers(cfg),  # train.report_to: TensorBoard (output_dir/tb), W&B, MLflow
        project_dir=str(cfg.output_dir),
        # Pinned host batches (data.pin_memory, on when a GPU is present) copied without blocking the host.
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=int(cfg.seed), non_blocking=torch.cuda.is_available()
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=tc.find_unused_parameters)],
        dynamo_backend=COMPILE_BACKEND if tc.compile else None,
        step_scheduler_with_optimizer=False,
    )
    fsdp.enable_on_cpu(accelerator)  # Accelerate's FSDP state for multi-process CPU runs too (as on GPUs)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        log.warning(
            "bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): it is emulated and usually much slower "
            "than fp32. Use train.mixed_precision='no' on this machine; bf16 is for GPUs."
        )
    return accelerator


def _loader_batch_size(loader: Any, default: int) -> int:
    size = getattr(loader, "batch_size", None)
    if size is None and getattr(loader, "batch_sampler", None) is not None:
        size = getattr(loader.batch_sampler, "batch_size", None)
    return int(size or default)


def _scalars(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The objective's scalar outputs (what gets logged), detached, on the loss's device (a Python number
    or a CPU tensor from an objective running on a GPU is moved there, so a log line stacks them)."""
    device = out["loss"].device
    found = {}
    for key, value in out.items():
        if torch.is_tensor(value) and value.numel() == 1:
            found[key] = value.detach().float().reshape(()).to(device, non_blocking=True)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[key] = torch.tensor(float(value), device=device)
    return found


class _MetricWindow:
    """The objective's scalars over the optimizer steps since the last log line, and the throughput.

    Micro-batches add to the current step; a step that is taken keeps them (and its gradient norm,
    left on the device until the log line), a skipped (non-finite) step drops them.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0
        self.step_sums: dict[str, torch.Tensor] = {}
        self.step_batches = 0
        self.norms: list[torch.Tensor] = []
        self.images = 0
        self.start = time.perf_counter()

    def add_batch(self, out: dict[str, Any], images: int) -> None:
        for key, value in _scalars(out).items():
            self.step_sums[key] = self.step_sums[key] + value if key in self.step_sums else value
        self.step_batches += 1
        self.images += images

    def keep_step(self, grad_norm: torch.Tensor | None) -> None:
        for key, value in self.step_sums.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.batches += self.step_batches
        if grad_norm is not None:
            self.norms.append(grad_norm.detach())
        self.drop_step()

    def drop_step(self) -> None:
        self.step_sums, self.step_batches = {}, 0

    def metrics(self, accelerator: Any) -> dict[str, float]:
        """`train/<key>` averaged over the window's micro-batches and the processes, grad norm, images/s."""
        keys = sorted(self.sums)
        metrics: dict[str, float] = {}
        if keys and self.batches:
            values = accelerator.reduce(torch.stack([self.sums[k] for k in keys]) / self.batches, reduction="mean")
            metrics = {f"train/{k}": float(v) for k, v in zip(keys, values.tolist())}
        seconds = time.perf_counter() - self.start
        metrics["train/grad_norm"] = float(torch.stack(self.norms).mean()) if self.norms else float("nan")
        metrics["train/images_per_sec"] = self.images / seconds if seconds > 0 else 0.0
        return metrics


@dataclasses.dataclass
class _Position:
    """Where training is: what a checkpoint records besides tensors."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # batches of the current epoch consumed by each process
    images_seen: int = 0
    nonfinite_skipped: int = 0
    fp16_skipped: int = 0
    seconds: float = 0.0  # training wall time over all sessions


class Trainer:
    """Train `objective` on `train_loader` with the `train.*` / `optim.*` settings of `cfg`.

    Args:
        cfg: a PretrainConfig-like dataclass with `output_dir`, `seed`, `train` (TrainConfig), `optim`
            (OptimConfig); the whole of it is saved in checkpoints and backbone.json.
        objective: `forward(batch) -> {"loss": scalar, ...}`, with `.backbone`; optional `visualize`.
        train_loader: dict batches (`pixel_values` (B, 3, H, W), `labels` (B,)); B is per process.
        eval_loader: labelled batches for top-1/top-5 of `objective.backbone`, or None.
    """

    def __init__(self, cfg: Any, objective: nn.Module, train_loader: Any, eval_loader: Any = None) -> None:
        self.cfg = cfg
        self.tc, self.oc = cfg.train, cfg.optim
        self.output_dir = Path(cfg.output_dir)
        self.accelerator = acc = make_accelerator(cfg)
        self.objective_name = getattr(getattr(cfg, "objective", None), "name", type(objective).__name__)
        backbone = getattr(objective, "backbone", None)
        if backbone is None:
            raise TypeError(f"{type(objective).__name__} has no `.backbone`: the engine exports and evaluates it.")
        if self.tc.grad_checkpointing and hasattr(backbone, "set_grad_checkpointing"):
            backbone.set_grad_checkpointing(True)
        self.fsdp = acc.distributed_type.value == "FSDP"
        if self.fsdp and self.tc.ema:
            raise ValueError("train.ema is not supported with FSDP (the EMA would need the full weights): set train.ema=false.")
        if self.tc.clip_mode == "per_tensor" and self.tc.clip_grad is None:
            raise ConfigError(
                "train.clip_mode=per_tensor clips each gradient to train.clip_grad: set train.clip_grad (DINO: 3.0)."
            )
        if self.fsdp and self.tc.clip_mode == "per_tensor":
            raise ValueError(
                "train.clip_mode=per_tensor is not supported with FSDP (each gradient is sharded across processes): "
                "use train.clip_mode=global."
            )

        self.batch_size = _loader_batch_size(train_loader, self.tc.batch_size)
        self.effective_batch = self.batch_size * self.tc.grad_accum_steps * acc.num_processes
        self.peak_lr = scaled_lr(self.oc, self.effective_batch)
        if self.fsdp:  # each block, then the root; before the optimizer, which then holds the shards
            objective = fsdp.shard(objective, acc)
        optimizer = build_optimizer(
            param_groups(objective, self.oc.weight_decay, self.oc.layer_decay), self.oc, self.peak_lr, acc.device.type
        )
        self._vis_batch = self._fixed_batch(eval_loader if eval_loader is not None else train_loader)
        train_loader = seeded_loader(train_loader, cfg.seed)
        if self.fsdp:  # the sharded objective as it is; its optimizer and the loader through Accelerate
            self.model, self.optimizer, self.train_loader = fsdp.prepare(acc, objective, optimizer, train_loader)
        else:
            self.model, self.optimizer, self.train_loader = acc.prepare(objective, optimizer, train_loader)
        self.eval_loader = acc.prepare(eval_loader) if eval_loader is not None else None
        # The plain module: its state_dict keys carry no DDP `module.` or torch.compile `_orig_mod.`. Looked up
        # once: unwrapping walks every submodule, which the per-step hooks would otherwise pay each step.
        self._unwrapped = acc.unwrap_model(self.model, keep_torch_compile=False)
        self.ema = EMA(self.unwrapped, self.tc.ema_decay) if self.tc.ema else None

        try:
            self.batches_per_epoch: int | None = len(self.train_loader)
        except TypeError:  # streamed data: no length
            self.batches_per_epoch = None
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training data gives no batch of {self.batch_size} per process on {acc.num_processes} "
                f"process(es): lower train.batch_size or use more data."
            )
        if self.batches_per_epoch is None:
            if self.tc.max_steps is None:
                raise ValueError("streamed training data has no length: set train.max_steps to say how long to train.")
            self.steps_per_epoch = None
            self.total_steps = int(self.tc.max_steps)
        else:
            self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.tc.grad_accum_steps)
            self.total_steps = self.tc.epochs * self.steps_per_epoch
            if self.tc.max_steps is not None:
                self.total_steps = min(self.total_steps, int(self.tc.max_steps))
        # Schedules follow the run: an "epoch" of every schedule (lr warm-up, an objective's momentum or
        # temperature) is total_steps / train.epochs optimizer steps (train.schedule_epochs when set), so a
        # run that train.max_steps shortens keeps each warm-up's share (40 of 400 epochs -> 10% of the steps).
        self.schedule_steps_per_epoch = self.total_steps / (self.tc.schedule_epochs or max(self.tc.epochs, 1))
        self.warmup_steps = self._warmup_steps()
        self.pos = _Position()
        self.last_checkpoint: Path | None = None
        self._last_saved_step = -1
        self._last_saved_pos: tuple[int, int, int] | None = None
        self._lr = 0.0
        self._wd = self.oc.weight_decay
        self._accounted_at = 0.0
        self._max_norm = self.tc.clip_grad if self.tc.clip_grad is not None else float("inf")

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def unwrapped(self) -> nn.Module:
        """The objective without DDP's or torch.compile's wrapper (the same module object the run trains)."""
        return self._unwrapped

    def lr_at(self, step: int) -> float:
        return cosine_schedule(
            step, base_lr=self.peak_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps, min_lr=self.oc.min_lr
        )

    def _warmup_steps(self) -> int:
        """optim.warmup_steps as given, else optim.warmup_epochs' share of the run; never the whole run."""
        if self.oc.warmup_steps is not None:
            steps, asked = int(self.oc.warmup_steps), f"optim.warmup_steps={self.oc.warmup_steps}"
        else:
            steps = round(self.oc.warmup_epochs * self.schedule_steps_per_epoch)
            of = f"train.schedule_epochs={self.tc.schedule_epochs:g}" if self.tc.schedule_epochs else f"train.epochs={self.tc.epochs}"
            asked = f"optim.warmup_epochs={self.oc.warmup_epochs:g} of {of}"
            if self.tc.schedule_epochs and steps:
                log.info("the lr warm-up is %d of %d steps (%s).", steps, self.total_steps, asked)
            elif self.steps_per_epoch is not None and self.total_steps < self.tc.epochs * self.steps_per_epoch and steps:
                log.info(
                    "train.max_steps=%d ends the run before its %d epochs: the lr warm-up keeps its share, "
                    "%d of %d steps (%s).", self.total_steps, self.tc.epochs, steps, self.total_steps, asked,
                )
        if steps and steps >= self.total_steps:
            raise ConfigError(
                f"{asked} gives a warm-up of {steps} optimizer steps, as long as the whole run "
                f"({self.total_steps} steps): the lr would never leave its warm-up. Lower optim.warmup_epochs "
                f"(or optim.warmup_steps), or train longer (train.epochs / train.max_steps)."
            )
        return steps

    def wd_at(self, step: int) -> float:
        """Weight decay of optimizer step `step`: cosine from optim.weight_decay to optim.weight_decay_end (DINO)."""
        if self.oc.weight_decay_end is None:
            return self.oc.weight_decay
        return cosine_schedule(step, base_lr=self.oc.weight_decay, total_steps=self.total_steps, min_lr=self.oc.weight_decay_end)

    def _fixed_batch(self, loader: Any) -> dict[str, torch.Tensor] | None:
        """A few samples for `visualize`, the same every time (own seed; the global RNG is untouched)."""
        if loader is None:
            return None
        n = min(8, _loader_batch_size(loader, 8))
        with isolated_rng(mix_seed(self.cfg.seed, 0x715)):
            dataset = loader.dataset
            try:
                samples = [dataset[i] for i in range(min(n, len(dataset)))]
                return loader.collate_fn(samples)
            except TypeError:  # iterable data
                return next(iter(loader))

    def _cuda_devices(self) -> list[int]:
        return [self.accelerator.device.index or 0] if self.accelerator.device.type == "cuda" else []

    # -- state -----------------------------------------------------------------------------------

    @property
    def _sharded(self) -> bool:
        """FSDP with SHARDED_STATE_DICT: checkpoints hold per-process shards (DCP), not gathered files."""
        return self.fsdp and fsdp.sharded_checkpoints(self.accelerator)

    def _full_states(self) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """(objective state_dict, optimizer state_dict), full (gathered) copies; under FSDP on the main
        process only, and no optimizer state when checkpoints are sharded (it is saved shard by shard)."""
        if self._sharded:
            return fsdp.full_model_state(self.model), None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(self.model, self.optimizer.optimizer, options=opts)
        return self.unwrapped.state_dict(), self.optimizer.optimizer.state_dict()

    def _trainer_state(self) -> dict[str, Any]:
        p = self.pos
        return {
            **dataclasses.asdict(p),
            "world_size": self.accelerator.num_processes,
            "batch_size": self.batch_size,
            "grad_accum_steps": self.tc.grad_accum_steps,
            "effective_batch": self.effective_batch,
            "total_steps": self.total_steps,
            "lr": self._lr,
            "scheduler": {
                "name": "cosine",
                "step": p.step,
                "base_lr": self.peak_lr,
                "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps,
                "min_lr": self.oc.min_lr,
            },
            "objective": self.objective_name,
            "mixed_precision": self.accelerator.mixed_precision,
        }

    def save(self) -> Path:
        """Write checkpoint-last/ (atomically) and backbone.safetensors; every process must call it.

        A failed write (disk full, ...) on any process stops every process with the same error, the
        previous checkpoint untouched, instead of leaving the others waiting at a barrier.
        """
        acc = self.accelerator
        main = acc.is_main_process
        model_state, optim_state = self._full_states()
        tmp = ckpt.temp_dir(self.output_dir)
        error: OSError | None = None
        try:
            if main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
        except OSError as err:
            error = err
        self._agree_or_raise(error)
        try:
            if self._sharded:
                fsdp.save_sharded(tmp, self.model, self.optimizer.optimizer)
            ckpt.write_checkpoint_files(
                tmp,
                model_state=model_state if (main and not self._sharded) else None,
                optimizer_state=optim_state if main else None,
                scaler_state=acc.scaler.state_dict() if (main and acc.scaler is not None) else None,
                ema_state=self.ema.state_dict() if (main and self.ema is not None) else None,
                rng_state=capture_rng(),
                rank=acc.process_index,
            )
        except OSError as err:
            error = err
        self._agree_or_raise(error)
        try:
            if main:
                ckpt.swap_in(self.output_dir, self._trainer_state())
                self.last_checkpoint = self.output_dir / ckpt.CHECKPOINT
                self._last_saved_step = self.pos.step
                self._export_backbones(model_state)
        except OSError as err:
            error = err
        self._agree_or_raise(error)
        self.last_checkpoint = self.output_dir / ckpt.CHECKPOINT
        self._last_saved_step = self.pos.step
        self._last_saved_pos = (self.pos.step, self.pos.epoch, self.pos.batch_in_epoch)
        return self.last_checkpoint

    def _agree_or_raise(self, error: OSError | None) -> None:
        """A barrier that also tells every process whether a checkpoint write failed somewhere."""
        acc = self.accelerator
        failed = torch.tensor(float(error is not None), device=acc.device)
        if acc.num_processes > 1:
            failed = acc.reduce(failed, reduction="sum")
        if float(failed) == 0:
            return
        kept = f"{self.last_checkpoint} (step {self._last_saved_step}) is intact" if self.last_checkpoint else "no earlier checkpoint exists"
        where = f": {error}" if error is not None else " on another process"
        raise ckpt.CheckpointError(
            f"could not write the checkpoint of step {self.pos.step}{where}. {kept}; free disk space (or fix "
            f"the output_dir permissions) and relaunch with train.resume=auto to continue."
        ) from error

    def _export_backbones(self, model_state: dict[str, torch.Tensor]) -> None:
        from ssl_vit.config import config_to_dict

        backbone, prefix = exported_backbone(self.unwrapped)
        meta = dict(
            objective=self.objective_name,
            step=self.pos.step,
            epoch=self.pos.epoch,
            images_seen=self.pos.images_seen,
            # Training wall time over all sessions, and its throughput (read by tools/compare.py).
            seconds=round(self.pos.seconds, 3),
            images_per_sec=self.pos.images_seen / self.pos.seconds if self.pos.seconds > 0 else 0.0,
            config=config_to_dict(self.cfg),
        )

        def backbone_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        ckpt.save_backbone(backbone, self.output_dir / "backbone.safetensors", state_dict=backbone_part(model_state), **meta)
        if self.ema is not None:
            ckpt.save_backbone(
                backbone, self.output_dir / "backbone_ema.safetensors", state_dict=backbone_part(self.ema.state_dict()),
                ema_decay=self.tc.ema_decay, **meta,
            )

    def _resume_source(self) -> Path | None:
        resume = self.tc.resume
        if resume is None or str(resume).lower() in ("never", "none", "false", ""):
            return None
        if str(resume) == "auto":
            last = self.output_dir / ckpt.CHECKPOINT
            return last if ckpt.is_complete(last) else None
        path = Path(resume)
        if (path / ckpt.CHECKPOINT).is_dir():
            path = path / ckpt.CHECKPOINT
        if not ckpt.is_complete(path):
            raise ckpt.CheckpointError(
                f"train.resume={resume}: no complete checkpoint there (a checkpoint-last folder with "
                f"trainer_state.json). Use train.resume=auto or never."
            )
        return path

    def load(self, folder: Path) -> None:
        """Restore model, optimizer, scaler, EMA, random states and data position from `folder`."""
        acc = self.accelerator
        state = ckpt.read_trainer_state(folder)
        sharded = fsdp.is_sharded(folder)  # an FSDP run's DCP shards: read by every process below
        model_state = None if sharded else ckpt.read_model_state(folder)
        optim_state = None if sharded else ckpt.read_optional(folder, "optimizer.pt")
        try:
            if self.fsdp or sharded:
                fsdp.load_states(folder, self.model, self.optimizer.optimizer, model_state, optim_state)
            else:
                self.unwrapped.load_state_dict(model_state)
                if optim_state is not None:
                    self.optimizer.load_state_dict(optim_state)
        except (RuntimeError, ValueError, KeyError) as err:
            detail = " ".join(str(err).split())  # torch lists the keys over several tab-indented lines
            raise ckpt.CheckpointError(
                f"checkpoint {folder} does not fit this run ({detail}). Was it written with another objective, "
                f"model or optimizer? Use another output_dir, or train.resume=never to start afresh there."
            ) from None
        scaler_state = ckpt.read_optional(folder, "scaler.pt")
        if acc.scaler is not None and scaler_state is not None:
            acc.scaler.load_state_dict(scaler_state)
        if self.ema is not None:
            ema_state = ckpt.read_optional(folder, "ema.safetensors")
            if ema_state is None:
                log.warning("%s has no EMA weights: the EMA restarts from the current weights.", folder)
                self.ema = EMA(self.unwrapped, self.tc.ema_decay)
            else:
                self.ema.load_state_dict({k: v.to(acc.device) for k, v in ema_state.items()})
        fields = {f.name for f in dataclasses.fields(_Position)}
        self.pos = _Position(**{k: v for k, v in state.items() if k in fields})
        same_layout = state.get("world_size") == acc.num_processes and state.get("batch_size") == self.batch_size
        if not same_layout:
            # Same place in the data, counted in the new batches; the random streams cannot carry over.
            consumed = self.pos.batch_in_epoch * state.get("batch_size", self.batch_size) * state.get("world_size", 1)
            self.pos.batch_in_epoch = consumed // (self.batch_size * acc.num_processes)
            log.warning(
                "resuming with %d process(es) x batch %d (checkpoint: %s x %s): training continues, but not "
                "bit-for-bit as an uninterrupted run would.",
                acc.num_processes, self.batch_size, state.get("world_size"), state.get("batch_size"),
            )
        rng = ckpt.read_rng(folder, acc.process_index) if same_layout else None
        if rng is not None:
            restore_rng(rng)
        else:
            self._seed(mix_seed(self.cfg.seed, self.pos.step))
        self.last_checkpoint = folder
        self._last_saved_step = self.pos.step
        self._last_saved_pos = (self.pos.step, self.pos.epoch, self.pos.batch_in_epoch)

    def _seed(self, seed: int) -> None:
        from accelerate.utils import set_seed

        set_seed(seed % (1 << 31), device_specific=True)

    # -- evaluation and images -------------------------------------------------------------------

    def evaluate(self) -> dict[str, float] | None:
        """Top-1/top-5 of the exported backbone on the eval loader (None without labels or a classifier head)."""
        backbone, _ = exported_backbone(self.unwrapped)
        if self.eval_loader is None or getattr(backbone, "num_classes", 0) <= 0:
            return None
        if self.fsdp:
            log.warning("no evaluation during FSDP training: evaluate the exported backbone with the eval recipes.")
            return None
        with torch.random.fork_rng(devices=self._cuda_devices()):
            return classify(backbone, self.eval_loader, self.accelerator)

    def visualize(self, save_png: bool) -> list[Path]:
        """Log `objective.visualize(fixed batch)` images to TensorBoard; at the end also as PNG files."""
        acc = self.accelerator
        objective = self.unwrapped
        if self._vis_batch is None or not acc.is_main_process or self.fsdp:
            return []
        from accelerate.utils import send_to_device

        from ssl_vit.viz.attention import attention_images

        was_training = objective.training
        objective.eval()
        try:
            with torch.random.fork_rng(devices=self._cuda_devices()), torch.no_grad(), acc.autocast():
                batch = send_to_device(self._vis_batch, acc.device)
                data = getattr(self.cfg, "data", None)
                mean, std = getattr(data, "mean", IMAGENET_MEAN), getattr(data, "std", IMAGENET_STD)
                images = objective.visualize(batch, mean, std) if hasattr(objective, "visualize") else {}
                attention = attention_images(objective, batch, self.cfg)  # TensorBoard only, no PNG
        finally:
            objective.train(was_training)
        writer = tensorboard_writer(acc)
        for name, image in attention.items():
            writer.add_image(f"vis/{name}", image, global_step=self.pos.step)
        written = []
        for name, image in images.items():
            image = image.detach().float().clamp(0, 1).cpu()  # (3, H, W)
            writer.add_image(f"vis/{name}", image, global_step=self.pos.step)
            if save_png:
                from PIL import Image

                path = self.output_dir / f"{name}.png"
                array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
                Image.fromarray(array).save(path)
                written.append(path)
        return written

    # -- the loop --------------------------------------------------------------------------------

    def _begin(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.recover(self.output_dir)
        acc.wait_for_everyone()
        source = self._resume_source()
        if source is not None:
            self.load(source)
            if acc.is_main_process:
                log.info("resuming from %s at step %d (epoch %d, batch %d)", source, self.pos.step, self.pos.epoch, self.pos.batch_in_epoch)
        else:
            if acc.is_main_process and (self.output_dir / ckpt.CHECKPOINT).exists():
                log.warning("train.resume=%s: starting afresh; %s/%s will be replaced.", self.tc.resume, self.output_dir, ckpt.CHECKPOINT)
            self._seed(mix_seed(self.cfg.seed, 1))
        if acc.is_main_process:
            from ssl_vit.config import save_config

            save_config(self.cfg, self.output_dir / "config.yaml")
        start_trackers(acc, self.cfg, resumed=source is not None)  # the resolved config as hyperparameters
        # This session's state: what the loop counts between optimizer steps and log lines.
        self._bar = tqdm(total=self.total_steps, initial=self.pos.step, disable=not acc.is_local_main_process, desc="train", dynamic_ncols=True)
        self._session_start, self._session_start_step, self._session_images = time.perf_counter(), self.pos.step, 0
        self._accounted_at = self._session_start
        self.window = _MetricWindow()
        self._last_metrics: dict[str, float] = {}
        self._micro_batches = 0
        self._nonfinite_losses = torch.zeros((), device=acc.device)
        # Non-finite steps since the last check, on the device (the default path syncs only at checks):
        # (any seen, steps good before the first, the first's gradient norm bad but not its loss), and
        # each step's (step, epoch, batch) on the host to name it.
        self._nonfinite = torch.zeros(3, dtype=torch.long, device=acc.device)
        self._unchecked: list[tuple[int, int, int]] = []
        self._time_is_up = False
        on_train_start = getattr(self.unwrapped, "on_train_start", None)
        if on_train_start is not None:
            on_train_start(self.total_steps, self.schedule_steps_per_epoch)

    def _epoch_loader(self) -> Any:
        set_loader_epoch(self.train_loader, self.pos.epoch)
        loader = self.train_loader
        if self.pos.batch_in_epoch:
            loader = self.accelerator.skip_first_batches(self.train_loader, self.pos.batch_in_epoch)
            set_loader_epoch(loader, self.pos.epoch)
        return loader

    def _nonfinite_message(self, what: str, step: int, epoch: int, batch: int) -> str:
        kept = f"the last good checkpoint, {self.last_checkpoint} (step {self._last_saved_step}), is kept intact" if self.last_checkpoint else "no checkpoint was written yet"
        return (
            f"non-finite {what} at step {step} (epoch {epoch}, batch {batch}); "
            f"{kept}. Fixes: a lower optim.blr / optim.lr, longer optim.warmup_epochs, train.clip_grad=1.0, "
            f"bf16 instead of fp16, or train.skip_nonfinite=true to skip such steps."
        )

    def fit(self) -> dict[str, Any]:
        """Train until train.epochs or train.max_steps, whichever comes first; returns the run's summary."""
        self._begin()
        pos = self.pos
        while pos.step < self.total_steps and self._epochs_left() and not self._time_is_up:
            stopped = self._train_epoch()
            if stopped and not self._epoch_complete():
                break
            pos.epoch += 1
            pos.batch_in_epoch = 0
            self._epoch_end()
        return self._finish()

    def _train_epoch(self) -> bool:
        """One pass over (what is left of) the epoch's data; True when the run must stop before its end."""
        pos = self.pos
        for batch in self._epoch_loader():
            if self._train_batch(batch):
                self._after_step()
                if pos.step >= self.total_steps or self._time_is_up:
                    return True
        return False

    def _train_batch(self, batch: dict[str, Any]) -> bool:
        """One micro-batch: forward, backward and, when it completes an accumulation, the optimizer step
        (then `pos.step` + 1 and True). tools/benchmark.py times this as "ours"."""
        acc = self.accelerator
        if self._micro_batches == 0:
            self._hook("on_step_start")
        with acc.accumulate(self.model):
            out = self.model(batch)
            acc.backward(out["loss"])
            self._count_batch(out)
            if acc.sync_gradients:
                self._optimizer_step()
        if acc.sync_gradients:
            self.pos.step += 1
        return acc.sync_gradients

    def _count_batch(self, out: dict[str, Any]) -> None:
        """A micro-batch done: its metrics, the images seen, the place in the data."""
        images = self.batch_size * self.accelerator.num_processes
        self.window.add_batch(out, images)
        self._nonfinite_losses = self._nonfinite_losses + (~torch.isfinite(out["loss"].detach())).float()
        self._micro_batches += 1
        self.pos.batch_in_epoch += 1
        self.pos.images_seen += images
        self._session_images += images

    def _optimizer_step(self) -> None:
        """Schedules, clipping, the non-finite guard, then the step (or its skip), with the objective's hooks."""
        acc, pos = self.accelerator, self.pos
        self._lr = self.lr_at(pos.step)
        self._wd = self.wd_at(pos.step)
        for g in self.optimizer.param_groups:
            g["lr"] = self._lr * g.get("lr_scale", 1.0)
            if self.oc.weight_decay_end is not None:
                g["weight_decay"] = self._wd * g.get("wd_scale", 1.0)
        if self.tc.clip_mode == "per_tensor":
            grad_norm = self._clip_each_gradient()
        elif self._max_norm == math.inf and not self.fsdp:
            grad_norm = self._gradient_norm()  # nothing to clip: the norm alone, for the guard and the log
        else:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self._max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = torch.as_tensor(grad_norm, device=acc.device, dtype=torch.float32)
        self._hook("on_before_optimizer_step")
        flags = torch.stack([self._nonfinite_losses, (~torch.isfinite(grad_norm)).float()])
        flags = acc.reduce(flags, reduction="sum") > 0  # (loss bad, norm bad) on any process, on the device
        fp16 = acc.mixed_precision == "fp16"
        if not (self.tc.skip_nonfinite or fp16):
            # The default: no host sync per step. A non-finite step is recorded on the device and raised
            # at the next log line, checkpoint, evaluation or the end (`_raise_if_nonfinite`), before any
            # weight after it is saved or judged.
            self._record_nonfinite(flags)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.unwrapped)
            self.window.keep_step(grad_norm)
            self._end_optimizer_step()
            return
        # Skipping (or fp16's loss scaling) needs the answer before the step: one sync per step.
        loss_bad, norm_bad = flags.tolist()
        # fp16: an infinite gradient is the loss scaler's business (it skips and rescales).
        if loss_bad or (norm_bad and not fp16):
            if not self.tc.skip_nonfinite:
                raise NonFiniteLossError(self._nonfinite_message(
                    "loss" if loss_bad else "gradient norm", self.pos.step + 1, self.pos.epoch, self.pos.batch_in_epoch))
            self.optimizer.zero_grad(set_to_none=True)
            pos.nonfinite_skipped += 1
            self.window.drop_step()
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if fp16 and acc.optimizer_step_was_skipped:
                pos.fp16_skipped += 1
            elif self.ema is not None:
                self.ema.update(self.unwrapped)
            self.window.keep_step(None if norm_bad else grad_norm)
        self._end_optimizer_step()

    @torch.no_grad()
    def _gradient_norm(self) -> torch.Tensor:
        """The global gradient norm, as clip_grad_norm_ returns it, without its (x1) rescaling pass."""
        self.accelerator.unscale_gradients()  # fp16: the norm without the loss scale, as clip_grad_norm_'s
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.accelerator.device)
        return torch.nn.utils.get_total_norm(grads)

    @torch.no_grad()
    def _clip_each_gradient(self) -> torch.Tensor:
        """DINO's utils.clip_gradients: each parameter's gradient scaled by min(1, clip / (its norm + 1e-6)).

        Returns the global norm before clipping (logged and checked as clip_grad_norm_'s).
        """
        self.accelerator.unscale_gradients()  # fp16: without the loss scale first, as clip_grad_norm_ does
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.accelerator.device)
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])  # (T,)
        scales = (self._max_norm / (norms + 1e-6)).clamp(max=1.0)  # 1: left as it is
        for g, scale in zip(grads, scales):
            g.mul_(scale.to(g.dtype))
        return torch.linalg.vector_norm(norms)

    def _end_optimizer_step(self) -> None:
        with torch.no_grad():
            self._hook("on_step_end")
        self._nonfinite_losses = torch.zeros((), device=self.accelerator.device)
        self._micro_batches = 0

    def _record_nonfinite(self, flags: torch.Tensor) -> None:
        """Count this step into the device-side record (flags: (loss bad, norm bad) bools); no host sync."""
        self._unchecked.append((self.pos.step + 1, self.pos.epoch, self.pos.batch_in_epoch))
        seen, good, norm_only = self._nonfinite.unbind()
        first = flags.any() & (seen == 0)
        self._nonfinite = torch.stack([
            seen | flags.any().long(),
            good + (~flags.any() & (seen == 0)).long(),
            torch.where(first, (flags[1] & ~flags[0]).long(), norm_only),
        ])

    def _raise_if_nonfinite(self) -> None:
        """Name the first non-finite step since the last check, if any (one host sync; called before
        anything is logged, saved or evaluated, so no weight after such a step is kept)."""
        if not self._unchecked:
            return
        seen, good, norm_only = self._nonfinite.tolist()
        if seen:
            step, epoch, batch = self._unchecked[good]
            raise NonFiniteLossError(self._nonfinite_message("gradient norm" if norm_only else "loss", step, epoch, batch))
        self._unchecked = []
        self._nonfinite = torch.zeros_like(self._nonfinite)

    def _hook(self, name: str) -> None:
        """Call the objective's optional hook `name(step, total_steps)` (see ssl_vit/objectives/base.py)."""
        hook = getattr(self.unwrapped, name, None)
        if hook is not None:
            hook(self.pos.step, self.total_steps)

    def _after_step(self) -> None:
        """Progress bar, time budget, log line and checkpoint after optimizer step `pos.step`."""
        pos, tc = self.pos, self.tc
        self._bar.update(1)
        if tc.max_seconds is not None:
            self._time_is_up = self._time_up(self._session_start)
        if pos.step % max(1, tc.log_every) == 0 or pos.step == self.total_steps or self._time_is_up:
            self._raise_if_nonfinite()
            self._last_metrics = self._log(self.window.metrics(self.accelerator))
            self._bar.set_postfix(
                loss=f"{self._last_metrics.get('train/loss', float('nan')):.4g}",
                img_s=f"{self._last_metrics['train/images_per_sec']:.0f}",
            )
            self.window = _MetricWindow()
        if tc.save_every and pos.step % tc.save_every == 0:
            self._raise_if_nonfinite()
            self._account_time(self._session_start)
            self.save()

    def _epochs_left(self) -> bool:
        return self.steps_per_epoch is None or self.pos.epoch < self.tc.epochs

    def _epoch_complete(self) -> bool:
        return self.batches_per_epoch is not None and self.pos.batch_in_epoch >= self.batches_per_epoch

    def _finish(self) -> dict[str, Any]:
        """The final checkpoint, evaluation and pictures; returns the run's summary."""
        acc, pos = self.accelerator, self.pos
        self._bar.close()
        self._raise_if_nonfinite()
        self._account_time(self._session_start)
        if (pos.step, pos.epoch, pos.batch_in_epoch) != self._last_saved_pos:
            self.save()  # the final state (also when the last step's save came before the epoch ended)
        result = self.evaluate()
        pngs = self.visualize(save_png=True)
        seconds = time.perf_counter() - self._session_start
        trained = pos.step > self._session_start_step
        summary: dict[str, Any] = {
            "output_dir": str(self.output_dir),
            "steps": pos.step,
            "epochs": pos.epoch,
            "images_seen": pos.images_seen,
            "seconds": round(seconds, 3),
            "images_per_sec": self._session_images / seconds if seconds > 0 and trained else 0.0,
            "loss": self._last_metrics.get("train/loss"),
            "nonfinite_skipped": pos.nonfinite_skipped,
            "checkpoint": str(self.output_dir / ckpt.CHECKPOINT),
            "backbone": str(self.output_dir / "backbone.safetensors"),
            "images": [str(p) for p in pngs],
        }
        if result is not None:
            summary.update(top1=result["top1"], top5=result["top5"], eval_n=result["n"])
            acc.log({"eval/top1": result["top1"], "eval/top5": result["top5"]}, step=pos.step)
        log_summary(acc, summary, step=pos.step)
        acc.end_training()
        if acc.is_main_process:
            print(self._summary_line(summary), flush=True)
        return summary

    def _time_up(self, session_start: float) -> bool:
        """train.max_seconds reached (decided together, so every process stops at the same step)."""
        elapsed = self.pos.seconds + time.perf_counter() - max(self._accounted_at, session_start)
        flag = torch.tensor(float(elapsed >= self.tc.max_seconds), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum") > 0)

    def _account_time(self, session_start: float) -> None:
        """Add the time since the last accounting to pos.seconds (kept across resumes)."""
        now = time.perf_counter()
        self.pos.seconds += now - max(self._accounted_at, session_start)
        self._accounted_at = now

    def _epoch_end(self) -> None:
        epoch = self.pos.epoch  # epochs completed
        self._raise_if_nonfinite()
        if self.tc.eval_every and epoch % self.tc.eval_every == 0 and epoch < self.tc.epochs:
            result = self.evaluate()
            if result is not None:
                self.accelerator.log({"eval/top1": result["top1"], "eval/top5": result["top5"]}, step=self.pos.step)
        if self.tc.vis_every and epoch % self.tc.vis_every == 0 and epoch < self.tc.epochs:
            self.visualize(save_png=False)

    def _log(self, window_metrics: dict[str, float]) -> dict[str, float]:
        """One log line: the window's averages (over processes) and the run's schedules and counters."""
        acc, pos = self.accelerator, self.pos
        metrics = dict(window_metrics)
        metrics.update({
            "train/lr": self._lr,
            "train/epoch": pos.epoch + (pos.batch_in_epoch / self.batches_per_epoch if self.batches_per_epoch else 0.0),
            "train/nonfinite_skipped": float(pos.nonfinite_skipped),
        })
        if self.oc.weight_decay_end is not None:
            metrics["train/weight_decay"] = self._wd
        if acc.mixed_precision == "fp16":
            metrics["train/fp16_skipped"] = float(pos.fp16_skipped)
        acc.log(metrics, step=pos.step)
        return metrics

    def _summary_line(self, s: dict[str, Any]) -> str:
        out = s["output_dir"]
        loss = f", loss {s['loss']:.4g}" if s.get("loss") is not None else ""
        evals = f", eval top-1 {s['top1']:.2f}% top-5 {s['top5']:.2f}%" if "top1" in s else ""
        data = getattr(getattr(self.cfg, "data", None), "name", None)
        data_arg = f" data.name={data}" if data and data != "synthetic" else ""
        return (
            f"[ssl_vit] done: {s['steps']} steps, {s['images_seen']} images, {s['seconds']:.0f} s "
            f"({s['images_per_sec']:.1f} img/s){loss}{evals}. Outputs in {out}: backbone.safetensors, "
            f"checkpoint-last/, config.yaml, tb/ (tensorboard --logdir {out}/tb). Next: "
            f"accelerate launch recipes/linear_probe.py checkpoint={out}{data_arg}"
        )
