"""Reproducibility: per-sample data randomness, RNG state capture, and rebuilt training loaders.

Why per-sample seeds: a resumed run skips the batches it already saw without loading them, and a
2-process run loads each sample in another process than a 1-process run. If augmentations drew from
one shared random stream, both would see different crops. Here every sample's augmentation is seeded
by (run seed, epoch, sample index), and the caller's random state is restored afterwards, so the
global random stream belongs to the model alone (masking noise, drop path), saved with checkpoints.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

__all__ = ["SeededSamples", "capture_rng", "isolated_rng", "mix_seed", "restore_rng", "seeded_loader", "set_loader_epoch"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (nearby inputs give unrelated seeds)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << 63) - 1)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with CPU torch / random / numpy seeded by `seed`, then restore the previous states.

    CUDA generators are left alone: data transforms run on the CPU, and the model's CUDA stream must
    not move when a sample is loaded.
    """
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class SeededSamples(Dataset):
    """A map-style dataset whose item i is computed with RNG seeded by (seed, epoch, i).

    The epoch lives in a shared-memory tensor so loader workers (persistent or not) see `set_epoch`.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with isolated_rng(mix_seed(self.seed, int(self._epoch), int(index))):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        # Only called for missing attributes; `dataset` itself may be missing while unpickling.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def seeded_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The same loader over `SeededSamples(loader.dataset)`, with its own generator.

    Its own generator keeps worker seeding and shuffling off the global random stream. Iterable
    (streamed) datasets have no sample index and are returned unchanged.
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or isinstance(dataset, SeededSamples):
        return loader
    wrapped = SeededSamples(dataset, seed)
    generator = torch.Generator().manual_seed(mix_seed(seed, 0x5EED))
    kwargs: dict[str, Any] = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=generator,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    if loader.batch_size is None:  # a custom batch sampler: keep it
        return DataLoader(wrapped, batch_sampler=loader.batch_sampler, **kwargs)
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler._num_samples is None:
        # shuffle=True: Accelerate swaps it for a sampler seeded by (data_seed + epoch).
        return DataLoader(wrapped, batch_size=loader.batch_size, shuffle=True, drop_last=loader.drop_last, **kwargs)
    if isinstance(sampler, SequentialSampler):
        return DataLoader(wrapped, batch_size=loader.batch_size, shuffle=False, drop_last=loader.drop_last, **kwargs)
    return DataLoader(wrapped, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last, **kwargs)


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Tell every sampler and `SeededSamples` inside a (prepared, maybe skipping) loader the epoch."""
    seen: set[int] = set()
    stack = [loader]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if obj is not loader and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
        for attr in ("batch_sampler", "sampler", "dataset", "base_dataloader"):
            child = obj.__dict__.get(attr) if hasattr(obj, "__dict__") else None
            if child is not None:
                stack.append(child)
    if hasattr(loader, "iteration"):  # Accelerate's DataLoaderShard: the epoch it passes on
        loader.iteration = epoch


# ---------------------------------------------------------------------------------------------------
# RNG state (what a checkpoint saves per process)


def capture_rng() -> dict[str, Any]:
    """This process's random states as plain types and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
