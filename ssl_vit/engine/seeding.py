"""Reproducibility: per-sample data randomness, RNG state capture, and rebuilt training loaders.

Why per-sample seeds: a resumed run skips the batches it already saw without loading them, and a
2-process run loads each sample in another process than a 1-process run. If augmentations drew from
one shared random stream, both would see different crops. Here every sample's augmentation is seeded
by (run seed, epoch, position of the sample in the epoch), and the caller's random state is restored
afterwards, so the global random stream belongs to the model alone (masking noise, drop path) and is
saved with checkpoints.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Sampler

__all__ = [
    "EpochPermutation",
    "Positioned",
    "PositionedBatches",
    "SeededSamples", "capture_rng", "isolated_rng", "mix_seed", "restore_rng", "seeded_loader", "set_loader_epoch"]

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


def _seed_all(seed: int) -> None:
    """Seed the CPU torch, python and numpy streams (CUDA untouched: see `isolated_rng`)."""
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with CPU torch / random / numpy seeded by `seed`, then restore the previous states.

    CUDA generators are left alone: data transforms run on the CPU, and the model's CUDA stream must
    not move when a sample is loaded.
    """
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    _seed_all(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class SeededSamples(Dataset):
    """A map-style dataset read with `(index, position)` keys: item `index`, its randomness seeded by
    (seed, epoch, position), where position is the sample's place in the epoch's sample stream.

    Seeding by position rather than index gives repeated augmentation (the same index several times
    in an epoch) different views. The epoch lives in a shared-memory tensor so loader workers
    (persistent or not) see `set_epoch`.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, position = key
        seed = mix_seed(self.seed, int(self._epoch), int(position))
        if torch.utils.data.get_worker_info() is not None:
            # A loader worker's random streams serve the data alone: seeding is enough (and cheaper).
            _seed_all(seed)
            return self.dataset[index]
        with isolated_rng(seed):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        # Only called for missing attributes; `dataset` itself may be missing while unpickling, and
        # dunders (`__getitems__`: batched fetching by plain indices) must not reach the inner dataset.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochPermutation(Sampler[int]):
    """A permutation of range(n) seeded by (seed, epoch): the same in every process, no syncing needed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=generator).tolist())


class Positioned(Sampler[tuple[int, int]]):
    """Yields (index, position in the epoch) from a sampler of indices."""

    # No set_epoch of its own: `set_loader_epoch` reaches the wrapped sampler (once).
    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, position) for position, index in enumerate(self.sampler))


class PositionedBatches(Sampler[list[tuple[int, int]]]):
    """Yields batches of (index, position in the epoch) from a batch sampler."""

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = 0
        for batch in self.batch_sampler:
            yield [(index, position + k) for k, index in enumerate(batch)]
            position += len(batch)


def seeded_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The same loader over `SeededSamples(loader.dataset)`: reproducible wherever a sample is loaded.

    A shuffling loader gets an `EpochPermutation` of (seed, epoch); other samplers are kept and
    numbered. The loader's own generator keeps worker seeding off the global random stream.
    Iterable (streamed) datasets have no sample index and are returned unchanged.
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
    if loader.batch_size is None:  # a custom batch sampler: keep it, number its samples
        return DataLoader(wrapped, batch_sampler=PositionedBatches(loader.batch_sampler), **kwargs)
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler._num_samples is None:
        sampler = EpochPermutation(len(dataset), mix_seed(seed, 0x5A3))  # shuffle=True
    return DataLoader(
        wrapped, batch_size=loader.batch_size, sampler=Positioned(sampler), drop_last=loader.drop_last, **kwargs
    )


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
