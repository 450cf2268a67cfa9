"""Streaming at scale, with two real processes on the CPU (torchrun, gloo): local WebDataset tar shards
and parquet shards as `data.streaming=true` sources, split across processes so that each image is seen
once an epoch, a seeded shuffle buffer, and a run SIGKILLed mid-epoch that resumes at the exact sample.

One launch does the reading checks and the uninterrupted and killed runs (recipe_runs.py runs them one
after another in one process group), a second one the resumed run: imports cost more than these runs.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from dist_launch import RECIPE_RUNS, assert_same_tensors, backbone, free_port, run, trainer_state
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PROBE = Path(__file__).with_name("stream_probe.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
SHARDS, PER_SHARD = 4, 16  # 64 images of 16 px


def image_bytes(i: int) -> bytes:
    """A 16 px PNG whose top-left pixel encodes `i` (red = i % 256, green = i // 256), the rest noise-free colour."""
    buf = io.BytesIO()
    image = Image.new("RGB", (16, 16), ((37 * i) % 256, (11 * i) % 256, (5 * i) % 256))
    image.putpixel((0, 0), (i % 256, i // 256, 0))
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_tar_shards(folder: Path, shards: int = SHARDS, per_shard: int = PER_SHARD) -> Path:
    """WebDataset shards: `train-0000N.tar` holding `<key>.png` + `<key>.cls` per sample."""
    folder.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(folder / f"train-{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                for ext, data in (("png", image_bytes(i)), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def write_parquet_shards(folder: Path, shards: int, per_shard: int = PER_SHARD) -> Path:
    """Parquet shards as the Hub writes them (an `Image` column, a `ClassLabel` column)."""
    import datasets

    folder.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    for s in range(shards):
        ids = range(s * per_shard, (s + 1) * per_shard)
        rows = {"image": [{"bytes": image_bytes(i), "path": None} for i in ids], "label": [i % 10 for i in ids]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"train-{s:05d}.parquet"))
    return folder


def launch(plan: list[dict], where: Path, name: str):
    path = where / f"{name}.json"
    path.write_text(json.dumps(plan))
    return run([*TORCHRUN, "--master_port", str(free_port()), str(RECIPE_RUNS), str(path)], timeout=300)


def probe(out: Path, data: Path, batch: int, workers: int, epochs: int) -> dict:
    return {"recipe": str(PROBE), "args": [str(out), str(data), str(batch), str(workers), str(epochs)]}


def mae(data: Path, out: Path, **extra) -> dict:
    """Tiny MAE on the streamed shards: batch 4 a process, 8 steps an epoch (32 images a process), 2 epochs."""
    return {"recipe": "mae_pretrain.py", "args": [
        f"data.name={data}", "data.streaming=true", "data.val_fraction=0", "data.image_size=16",
        "data.num_workers=1", "data.shuffle_buffer=8",
        "model.args={depth: 1, embed_dim: 32, num_heads: 2}", "mae.decoder_dim=16", "mae.decoder_depth=1",
        "mae.decoder_heads=2", "train.batch_size=4", "train.epochs=2", "train.save_every=3", "train.log_every=4",
        "train.vis_every=0", f"output_dir={out}",
    ], **extra}


def per_rank(out: Path) -> list[dict]:
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]


def test_streamed_shards__split_over_two_processes_each_image_once_an_epoch_and_a_killed_run_resumes_exactly(
    tmp_path,
):
    tars = write_tar_shards(tmp_path / "tar")
    parquet = write_parquet_shards(tmp_path / "parquet", shards=3)  # 3 shards: not divisible by 2 processes
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = launch([
        probe(tmp_path / "tar_seen", tars, batch=4, workers=1, epochs=2),
        probe(tmp_path / "parquet_seen", parquet, batch=4, workers=0, epochs=1),
        mae(tars, reference),
        # Killed (SIGKILL, every process) inside step 11's forward: epoch 1, its 3rd batch. The last
        # checkpoint is step 9 (epoch 1, 1 batch in), so the resumed run skips one batch of epoch 1.
        mae(tars, killed, kill_forward=11),
    ], tmp_path, "first")
    assert proc.returncode != 0, "the last run of the launch was to be killed"
    assert "Signals.SIGKILL" in proc.stderr or "exitcode  : -9" in proc.stderr, proc.stderr[-3000:]

    # Tar shards, 4 over 2 processes: 2 shards each, through one loader worker each.
    ranks = per_rank(tmp_path / "tar_seen")
    assert all(r["unchanged"] for r in ranks), "accelerator.prepare must return the self-split loader as it is"
    assert [r["length"] for r in ranks] == [8, 8]  # batches an epoch: 32 images of a process / 4
    everything = list(range(SHARDS * PER_SHARD))
    for epoch in range(2):
        ids = [r["epochs"][epoch]["ids"] for r in ranks]
        assert len(ids[0]) == len(ids[1]) == 32
        assert sorted(ids[0] + ids[1]) == everything, f"epoch {epoch}: each image once over the two processes"
        assert [len({i // PER_SHARD for i in r}) for r in ids] == [2, 2], "whole shards: each process reads 2"
    for r in ranks:
        first, second = (e["ids"] for e in r["epochs"])
        assert first != second, "a new shuffle each epoch (seed + epoch)"
    assert ranks[0]["epochs"][0]["draws"] != ranks[1]["epochs"][0]["draws"], "each process its own augmentations"

    # Parquet shards, 3 over 2 processes: every process reads every shard and keeps 1 row in 2.
    ranks = per_rank(tmp_path / "parquet_seen")
    ids = [r["epochs"][0]["ids"] for r in ranks]
    assert len(ids[0]) == len(ids[1]) == 24
    assert sorted(ids[0] + ids[1]) == list(range(3 * PER_SHARD))

    # The uninterrupted run: 16 steps, all 64 images an epoch over the 2 processes.
    assert trainer_state(reference)["step"] == 16 and trainer_state(reference)["world_size"] == 2
    assert trainer_state(killed)["step"] == 9 and trainer_state(killed)["batch_in_epoch"] == 1

    proc = launch([mae(tars, killed)], tmp_path, "resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "at step 9 (epoch 1, batch 1)" in proc.stderr, proc.stderr[-3000:]
    assert_same_tensors(backbone(killed), backbone(reference))


def test_a_folder_of_tar_shards__is_read_through_datasets_webdataset_with_its_rows_counted_from_the_headers(tmp_path):
    from ssl_vit.data import DataConfig, load_data

    tars = write_tar_shards(tmp_path / "tar", shards=2, per_shard=5)
    bundle = load_data(DataConfig(name=str(tars), streaming=True, val_fraction=0.0), need_labels=False)
    assert bundle.train_shard_rows == [5, 5] and bundle.image_column == "png" and bundle.label_column is None
    assert sum(1 for _ in bundle.train) == 10
    labelled = load_data(DataConfig(name=str(tars), streaming=True, val_fraction=0.0, num_classes=10), need_labels=True)
    assert labelled.label_column == "cls" and labelled.num_classes == 10
    carved = load_data(DataConfig(name=str(tars), streaming=True, val_fraction=0.2), need_labels=False)
    assert carved.train_shard_rows is None  # a hashed eval split: the train rows per shard are not known up front
