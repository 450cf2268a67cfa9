"""Images/s the data loader delivers, per transform and worker count, against what a training step eats.

    python tools/benchmark_data.py --max-batches 20 --out outputs/benchmark_data.json

Measures `make_loader` (decode + transform + collate, batch 64) on CIFAR-10
(../shared/data/cifar10/train-00000-of-00001.parquet, skipped when absent) and on the built-in
`synthetic` data, for the mae / supervised / eval transforms with 0, 1 and 2 workers; then the
images/s that a `vit_tiny_patch4_32` training step (forward + backward + AdamW, fp32) consumes.
Data never bounds training when the loader delivers several times the step's rate.

    python tools/benchmark_data.py --streaming --datasets cifar10 --transforms mae --workers 0,2

`--streaming`: the same images written as `--shards` parquet shards and as many WebDataset tar shards
(in a temporary folder), each read map-style (`data.streaming=false`) and streamed (`data.streaming=true`,
every worker its own shards): the streamed path's images/s against the map-style path's on the same data.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from ssl_vit.data import DataConfig, load_data, make_loader  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar10" / "train-00000-of-00001.parquet"


def measure_loader(bundle, kind: str, workers: int, batch_size: int, max_batches: int, warmup: int) -> float:
    """Images/s over `max_batches` batches, after `warmup` batches (worker start-up excluded)."""
    loader = make_loader(
        bundle, "train", kind, batch_size, train=kind != "eval", seed=0, num_workers=workers
    )
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start, images = time.perf_counter(), 0
    for _ in range(max_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        images += batch["pixel_values"].shape[0]
    seconds = time.perf_counter() - start
    del it, loader  # stop the workers before the next measurement
    return images / seconds


def write_shards(bundle, folder: Path, shards: int) -> dict[str, Path]:
    """`bundle.train` as `shards` parquet files and as many WebDataset tar files (`<key>.png` + `<key>.cls`)."""
    import datasets

    train = bundle.train
    parquet, tars = folder / "parquet", folder / "tar"
    parquet.mkdir(parents=True)
    tars.mkdir(parents=True)
    raw = train.cast_column(bundle.image_column, datasets.Image(decode=False))
    for i in range(shards):
        part = raw.shard(num_shards=shards, index=i, contiguous=True)
        part.cast_column(bundle.image_column, datasets.Image()).to_parquet(str(parquet / f"train-{i:05d}.parquet"))
        with tarfile.open(tars / f"train-{i:05d}.tar", "w") as tar:
            for k, row in enumerate(part):
                cell = row[bundle.image_column]
                data = cell["bytes"] if cell.get("bytes") else Path(cell["path"]).read_bytes()
                suffix = "png" if data[:4] == b"\x89PNG" else "jpg"
                label = str(row[bundle.label_column]).encode() if bundle.label_column else b"0"
                for ext, payload in ((suffix, data), ("cls", label)):
                    info = tarfile.TarInfo(f"{i:05d}{k:07d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return {"parquet shards": parquet, "tar shards": tars}


def measure_train_step(model_name: str, batch_size: int, image_size: int, steps: int, warmup: int) -> float:
    """Images/s a training step (forward + backward + AdamW step, fp32, CPU) consumes."""
    from ssl_vit.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone(model_name, num_classes=10, img_size=image_size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="cifar10,synthetic", help="comma list: cifar10, synthetic")
    p.add_argument("--transforms", default="mae,supervised,eval")
    p.add_argument("--workers", default="0,1,2", help="comma list of DataLoader worker counts")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int, default=30, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches/steps first")
    p.add_argument("--model", default="vit_tiny_patch4_32", help="backbone of the training-step measurement")
    p.add_argument("--step-batches", type=int, default=5, help="timed training steps ('0' skips the step)")
    p.add_argument("--cache-dir", default=None, help="datasets cache for CIFAR-10's Arrow copy (default: HF's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--streaming", action="store_true",
                   help="compare the streamed path with the map-style one on the same data written as shards")
    p.add_argument("--shards", type=int, default=8, help="--streaming: shards of each format")
    args = p.parse_args(argv)

    results: dict = {
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "batch_size": args.batch_size,
        "loader": [],
    }
    rows = []
    for name in args.datasets.split(","):
        if name == "cifar10":
            if not CIFAR.exists():
                print(f"skipping cifar10: {CIFAR} not found (the benchmark uses it when present)")
                continue
            cfg = DataConfig(name=str(CIFAR), image_size=32, cache_dir=args.cache_dir)
        elif name == "synthetic":
            cfg = DataConfig(name="synthetic", image_size=32)
        else:
            p.error(f"unknown dataset '{name}': use cifar10 or synthetic")
        bundle = load_data(cfg, need_labels=True)
        sources = [(name, bundle)]
        if args.streaming:  # the same images as shards, read map-style and streamed
            tmp = Path(tempfile.mkdtemp(prefix="benchmark_data_"))
            for fmt, folder in write_shards(bundle, tmp, args.shards).items():
                for streaming in (False, True):
                    sharded = DataConfig(name=str(folder), image_size=32, streaming=streaming, val_fraction=0.0,
                                         cache_dir=str(tmp / "cache"), num_classes=bundle.num_classes)
                    path = "streamed" if streaming else "map-style"
                    sources.append((f"{name} {fmt} {path}", load_data(sharded, need_labels=False)))
        for label, data in sources:
            for kind in args.transforms.split(","):
                for workers in (int(w) for w in args.workers.split(",")):
                    ips = measure_loader(data, kind, workers, args.batch_size, args.max_batches, args.warmup)
                    results["loader"].append(
                        {"dataset": label, "transform": kind, "workers": workers, "images_per_s": ips})
                    rows.append((label, kind, workers, ips))
                    print(f"  {label:10s} {kind:10s} workers={workers}: {ips:8.0f} images/s", flush=True)

    step_ips = None
    if args.step_batches > 0:
        step_ips = measure_train_step(args.model, args.batch_size, 32, args.step_batches, args.warmup)
        results["train_step"] = {"model": args.model, "precision": "fp32", "images_per_s": step_ips}

    print(f"\n| dataset | transform | workers | loader images/s |{' x step |' if step_ips else ''}")
    print(f"|---|---|---|---|{'---|' if step_ips else ''}")
    for name, kind, workers, ips in rows:
        ratio = f" {ips / step_ips:.1f}x |" if step_ips else ""
        print(f"| {name} | {kind} | {workers} | {ips:.0f} |{ratio}")
    if step_ips:
        print(f"\n{args.model} training step (fwd+bwd+AdamW, fp32, batch {args.batch_size}): {step_ips:.1f} images/s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
