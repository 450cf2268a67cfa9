"""classify: top-1 / top-5 over a loader, each sample counted once."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from toys import toy_config

from ssl_vit.engine import classify
from ssl_vit.engine.trainer import make_accelerator


class Scores(Dataset):
    """Image i's 'logits' are its first pixels; label i is the class ranked `ranks[i]` (0 = best)."""

    def __init__(self, ranks: list[int], classes: int = 7) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(len(ranks), 3, 4, 4, generator=g)
        order = self.x.flatten(1)[:, :classes].argsort(dim=1, descending=True)  # (n, C)
        self.y = order[torch.arange(len(ranks)), torch.tensor(ranks)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class FirstPixels(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :7]  # (B, 7)


def test_classify__top1_top5_over_an_uneven_last_batch(tmp_path):
    ranks = [0, 0, 0, 1, 2, 4, 4, 5, 6, 0]  # top-1: 4 of 10 (rank 0); top-5: 8 of 10 (rank < 5)
    loader = DataLoader(Scores(ranks), batch_size=4)  # batches of 4, 4, 2
    accelerator = make_accelerator(toy_config(tmp_path))
    model = FirstPixels().train()
    result = classify(model, loader, accelerator)
    assert result == {"top1": pytest.approx(40.0), "top5": pytest.approx(80.0), "n": 10}
    assert model.training  # mode restored


def test_classify__unlabelled_data_is_a_clear_error(tmp_path):
    loader = DataLoader([{"pixel_values": torch.zeros(3, 4, 4)}] * 2, batch_size=2)
    with pytest.raises(ValueError, match="labels"):
        classify(FirstPixels(), loader, make_accelerator(toy_config(tmp_path)))
