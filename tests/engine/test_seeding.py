"""Per-sample seeding: augmentations independent of workers, processes, skipping; RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler
from toys import ToyImages

from ssl_vit.engine.seeding import EpochPermutation, capture_rng, restore_rng, seeded_loader, set_loader_epoch


def batches(loader, epoch=0):
    set_loader_epoch(loader, epoch)
    return [b["pixel_values"] for b in loader]


class Repeat3(Sampler[int]):
    """Each index three times in a row (DeiT's repeated augmentation)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n * 3

    def __iter__(self):
        return iter([i for i in range(self.n) for _ in range(3)])


def test_seeded_loader__repeated_index_gets_a_different_view_each_time():
    loader = seeded_loader(DataLoader(ToyImages(4), batch_size=3, sampler=Repeat3(4)), seed=0)
    first = batches(loader)[0]  # three views of image 0
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])


def test_seeded_loader__same_samples_with_workers_and_in_process():
    plain = DataLoader(ToyImages(16), batch_size=4, shuffle=True)
    workers = DataLoader(ToyImages(16), batch_size=4, shuffle=True, num_workers=2)
    a, b = batches(seeded_loader(plain, 7), epoch=1), batches(seeded_loader(workers, 7), epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_seeded_loader__order_and_views_change_with_epoch_and_seed_and_repeat_within_one():
    loader = seeded_loader(DataLoader(ToyImages(16), batch_size=4, shuffle=True), seed=0)
    e0, e0_again, e1 = batches(loader, 0), batches(loader, 0), batches(loader, 1)
    assert all(torch.equal(x, y) for x, y in zip(e0, e0_again))
    assert not torch.equal(torch.cat(e0), torch.cat(e1))
    other_seed = batches(seeded_loader(DataLoader(ToyImages(16), batch_size=4, shuffle=True), seed=1), 0)
    assert not torch.equal(torch.cat(e0), torch.cat(other_seed))


def test_seeded_loader__loading_leaves_the_global_random_streams_alone():
    loader = seeded_loader(DataLoader(ToyImages(8), batch_size=4, shuffle=True), seed=0)
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    batches(loader)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_seeded_loader__custom_sampler_and_batch_sampler_are_kept_and_told_the_epoch():
    class Recording(SequentialSampler):
        epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

    data = ToyImages(8, augment=False)
    sampler = Recording(data)
    loader = seeded_loader(DataLoader(data, batch_size=4, sampler=sampler), seed=0)
    assert torch.equal(torch.cat(batches(loader, 5)), data.images)
    assert sampler.epochs == [5]
    by_batches = seeded_loader(DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 3, False)), seed=0)
    assert [len(b) for b in batches(by_batches)] == [3, 3, 2]


def test_epoch_permutation__seeded_per_epoch():
    p = EpochPermutation(10, seed=0)
    first = list(p)
    assert sorted(first) == list(range(10)) and list(p) == first
    p.set_epoch(1)
    assert list(p) != first


def test_capture_rng__round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (torch.rand(2), random.random(), np.random.rand())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]
