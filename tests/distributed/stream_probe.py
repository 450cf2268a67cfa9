"""Read a streamed training loader the way the engine does, in each of several processes (torchrun), and
write which images each process got per epoch: `python stream_probe.py OUT DATA BATCH WORKERS EPOCHS`
(written to OUT.rank<r>; also runs as an entry of recipe_runs.py's plans, sharing its launch).

Each image encodes its id in its top-left pixel (red = id % 256, green = id // 256); the transform returns
that id and a random number (the sample's augmentation randomness), so the test sees order and seeding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from ssl_vit.data import DataConfig, load_data, make_loader  # noqa: E402
from ssl_vit.engine.seeding import set_loader_epoch  # noqa: E402


class ImageId:
    """PIL image -> (id from its top-left pixel, a random draw): a class, so loader workers can pickle it."""

    def __call__(self, image):
        red, green, _ = image.getpixel((0, 0))
        return torch.tensor([red + 256 * green, torch.rand(()).item()], dtype=torch.float64)


def main(out: str, data: str, batch: str, workers: str, epochs: str) -> None:
    import datasets

    # datasets sleeps 5 s after each pass over parquet shards (an Arrow thread-shutdown guard): not here.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    accelerator = Accelerator(cpu=True)
    cfg = DataConfig(name=data, streaming=True, val_fraction=0.0, image_size=16, shuffle_buffer=8)
    bundle = load_data(cfg, need_labels=False)
    loader = make_loader(bundle, "train", ImageId(), int(batch), train=True, seed=0, num_workers=int(workers))
    prepared = accelerator.prepare(loader)  # as the Trainer does: must come back unchanged
    seen = {"unchanged": prepared is loader, "length": len(prepared), "epochs": []}
    for epoch in range(int(epochs)):
        set_loader_epoch(prepared, epoch)
        rows = [row.tolist() for batch_ in prepared for row in batch_["pixel_values"]]
        seen["epochs"].append({"ids": [int(r[0]) for r in rows], "draws": [r[1] for r in rows]})
    rank = accelerator.process_index
    Path(f"{out}.rank{rank}").write_text(json.dumps(seen))
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
