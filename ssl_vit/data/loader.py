"""DataLoaders over a DataBundle: lazy decoding + transforms, seeded shuffling, repeated augmentation.

Images stay as stored (bytes/paths) in the Hugging Face dataset; each batch is read in one Arrow
call, decoded with PIL, converted to RGB and transformed in the loader's workers. Nothing is written
back to disk. Batches are dicts `{"pixel_values": (B, 3, H, W) float32, "labels": (B,) int64}`.

Sharding across processes is Accelerate's job (`accelerator.prepare(loader)`): it splits the batches
of our batch sampler between processes. Our samplers draw the same seeded permutation in every
process (seed + epoch, no global RNG), so the shards are disjoint and together cover the epoch.
Streamed local shards (parquet / WebDataset tar) are the exception: each process reads its own shards
(`split_dataset_by_node`) with an equal quota per epoch, and the loader comes back already prepared.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from accelerate import PartialState
from accelerate.data_loader import prepare_data_loader
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Sampler, SequentialSampler, default_collate

from ssl_vit.data.sources import DataBundle, DataError
from ssl_vit.data.transforms import build_transform, own_transform

__all__ = ["ShuffleSampler", "decode_image", "make_loader"]

logger = logging.getLogger(__name__)

# A run of this many unreadable rows in a row means the data, not a few files, is broken.
_MAX_CONSECUTIVE_BAD = 100


class BadImage(Exception):
    """An image cell that cannot be decoded (corrupt, truncated, empty)."""


def decode_image(cell: Any) -> Image.Image:
    """A stored image cell -> fully loaded PIL image (any mode).

    Cells: {"bytes", "path"} (undecoded datasets Image), PIL images, raw bytes, or arrays
    (H, W), (H, W, C) or (C, H, W), uint8 or float in [0, 1].
    """
    try:
        if isinstance(cell, Image.Image):
            image = cell
        elif isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
            if data:
                image = Image.open(io.BytesIO(data))
            elif path:
                image = Image.open(path)
            elif data is not None:
                raise BadImage("the cell holds 0 bytes")
            else:
                raise BadImage("the cell holds neither image bytes nor a path")
        elif isinstance(cell, (bytes, bytearray)):
            if not cell:
                raise BadImage("the cell holds 0 bytes")
            image = Image.open(io.BytesIO(cell))
        elif cell is None:
            raise BadImage("the cell is empty (None)")
        else:
            image = _array_to_image(np.asarray(cell))
        image.load()  # decode now, so truncated files fail here and not inside a transform
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, TypeError) as err:
        raise BadImage(f"{type(err).__name__}: {err}") from None
    if image.width == 0 or image.height == 0:
        raise BadImage(f"the image is empty ({image.width}x{image.height} pixels)")
    return image


def _array_to_image(arr: np.ndarray) -> Image.Image:
    if arr.size == 0:
        raise BadImage(f"the image array is empty (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise BadImage(f"an image array must be (H, W), (H, W, C) or (C, H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():  # a NaN would otherwise be cast to an arbitrary pixel value
            raise BadImage(f"the image array holds {int((~np.isfinite(arr)).sum())} NaN or infinite values")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


class _Rows:
    """What both dataset wrappers share: decode + transform one row, labels, corrupt-image policy."""

    def __init__(
        self,
        bundle: DataBundle,
        split: str,
        transform: Callable,
        skip_counter: Any,
        has_labels: bool,
    ):
        self.transform = transform
        self.image_column = bundle.image_column
        self.label_column = bundle.label_column if has_labels else None
        self.label_map = bundle.label_map
        self.num_classes = bundle.num_classes
        self.skip_corrupt = bundle.cfg.skip_corrupt
        # Errors name the row of the source split (carved subsets map back through these ids).
        self.row_ids = bundle.train_rows if split == "train" else bundle.eval_rows
        name = bundle.train_split if split == "train" else bundle.eval_split
        self.where = f"split '{name}' of dataset '{bundle.name}'"
        self._skipped = skip_counter  # multiprocessing.Value shared with workers

    @property
    def skipped(self) -> int:
        """How many unreadable rows were skipped so far (all workers)."""
        return int(self._skipped.value)

    def _label(self, value: Any, row: Any) -> int:
        if self.label_map is not None:
            try:
                return self.label_map[value]
            except KeyError:
                raise DataError(
                    f"{self.where}: row {row} has label {value!r}, unseen when classes were counted."
                ) from None
        label = int(value)
        if not 0 <= label < self.num_classes:
            raise DataError(
                f"{self.where}: row {row} has label {label}, outside 0..{self.num_classes - 1} "
                f"(-1 marks unlabelled rows: choose another split; else set data.num_classes)."
            )
        return label

    def source_row(self, index: int) -> int:
        return index if self.row_ids is None else int(self.row_ids[index])

    def sample(self, image_cell: Any, label_value: Any, row: Any) -> Optional[tuple]:
        """(pixel_values (3, H, W), label or None), or None when the row was skipped as corrupt."""
        try:
            image = decode_image(image_cell)
        except BadImage as err:
            if not self.skip_corrupt:
                raise DataError(
                    f"{self.where}: cannot read the image at row {row} ({err}). Fix or remove that file, or set "
                    f"data.skip_corrupt=true to skip unreadable images."
                ) from None
            with self._skipped.get_lock():
                self._skipped.value += 1
                count = self._skipped.value
            logger.warning(
                "skipped unreadable image at row %s of %s (%s); %d skipped so far", row, self.where, err, count
            )
            return None
        pixels = self.transform(image)
        label = None if self.label_column is None else self._label(label_value, row)
        return pixels, label


class MapImages(torch.utils.data.Dataset):
    """Map-style view of a HF Dataset: rows fetched per batch in one Arrow call, transformed lazily."""

    def __init__(self, hf_dataset: Any, rows: _Rows):
        self.hf = hf_dataset
        self.rows = rows

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def skipped(self) -> int:
        return self.rows.skipped

    def _fetch(self, indices: list[int]) -> tuple[list, list]:
        batch = self.hf[indices]  # dict of columns; images undecoded (bytes/path)
        labels = batch[self.rows.label_column] if self.rows.label_column else [None] * len(indices)
        return batch[self.rows.image_column], labels

    def __getitems__(self, indices: list[int]) -> list[tuple]:
        images, labels = self._fetch(indices)
        out = []
        for idx, cell, label in zip(indices, images, labels):
            item = self.rows.sample(cell, label, self.rows.source_row(idx))
            # A skipped row is replaced by the next readable one, so batches keep their size (the
            # engine shards and gathers fixed-size batches).
            step = 0
            while item is None:
                step += 1
                if step >= _MAX_CONSECUTIVE_BAD or step >= len(self.hf):
                    raise DataError(
                        f"{self.rows.where}: {step} unreadable images in a row around row "
                        f"{self.rows.source_row(idx)}: the data "
                        f"looks broken, not a few files; check data.name."
                    )
                nxt = (idx + step) % len(self.hf)
                (cell,), (label,) = self._fetch([nxt])
                item = self.rows.sample(cell, label, self.rows.source_row(nxt))
            out.append(item)
        return out

    def __getitem__(self, index: int) -> tuple:
        return self.__getitems__([index])[0]


class StreamImages(torch.utils.data.IterableDataset):
    """Iterable view of a streamed HF IterableDataset (shuffled with a seeded buffer when training).

    Each sample's augmentation is seeded by (seed, epoch, rank, worker, its position in that worker's
    stream), so an epoch is the same sequence of samples and crops however it is read: a run resumed
    mid-epoch re-reads the epoch's stream and skips the batches it trained on (count and skip), and
    continues at the exact sample. `quota`: every worker yields exactly this many samples per epoch
    (streams split across processes: equal batch counts everywhere, so no process waits at a
    collective for one that ran out); a worker whose rows were skipped as corrupt goes round again.
    """

    def __init__(
        self,
        hf_dataset: Any,
        rows: _Rows,
        *,
        shuffle: bool,
        seed: int,
        buffer: int,
        repeats: int,
        rank: int = 0,
        quota: Optional[int] = None,
        workers: int = 0,
    ):
        self.hf = hf_dataset
        self.rows = rows
        self.shuffle = shuffle
        self.seed = seed
        self.buffer = buffer
        self.repeats = repeats
        self.rank = rank
        self.quota = quota
        self.streams = max(workers, 1)
        self.epoch = 0

    @property
    def skipped(self) -> int:
        return self.rows.skipped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples per epoch in this process (with a quota: an epoch of known length); else TypeError."""
        if self.quota is None:
            raise TypeError("a stream without per-shard row counts has no length")
        return self.quota * self.streams

    def __getitem__(self, index: int) -> tuple:
        raise TypeError("a stream is read in order, not by index")  # as for any object without indexing

    def __iter__(self) -> Iterator[tuple]:
        # Imported here: ssl_vit.engine imports ssl_vit.data.
        from ssl_vit.engine.seeding import _seed_all, isolated_rng, mix_seed

        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        epoch = self.epoch
        if info is None:
            self.epoch += 1  # a pass without set_epoch: the next one is shuffled anew
        stream = self.hf
        if self.shuffle:
            # Every worker (and process) shuffles shards the same way; datasets then deals them out.
            stream = stream.shuffle(seed=self.seed, buffer_size=self.buffer)
            stream.set_epoch(epoch)
        where = "" if info is None else f" (worker {info.id})"
        image_col, label_col = self.rows.image_column, self.rows.label_column
        position, n = 0, 0
        while True:
            made_before = n
            for row in stream:
                # Repeated augmentation on a stream: every r-th row, r views of it (DeiT keeps the epoch
                # length and sees 1/r of the images per epoch, differently each epoch).
                if self.repeats > 1 and position % self.repeats:
                    position += 1
                    continue
                for view in range(self.repeats):
                    seed = mix_seed(self.seed, epoch, self.rank, worker, position, view)
                    if info is not None:  # a worker's random streams serve the data alone: seeding is enough
                        _seed_all(seed)
                        item = self.rows.sample(row[image_col], row.get(label_col), f"{position}{where}")
                    else:  # the main process's streams belong to the model (masks, drop path): put them back
                        with isolated_rng(seed):
                            item = self.rows.sample(row[image_col], row.get(label_col), f"{position}{where}")
                    if item is None:
                        break
                    n += 1
                    yield item
                    if self.quota is not None and n >= self.quota:
                        return
                position += 1
            if self.quota is None or n == made_before:
                break
        if (n == 0 and info is None) or (self.quota is not None and n < self.quota):
            raise DataError(f"{self.rows.where} yielded no readable rows{where}: check data.name and the split.")


class ShuffleSampler(Sampler[int]):
    """A seeded permutation per epoch, the same in every process; `repeats` > 1: DeiT's repeated aug.

    With repeats r, each epoch keeps `n` samples: n/r distinct images, each r times in a row, so the
    r augmented views land in the same global batch (DeiT's RASampler spreads them over GPUs of one
    step; Accelerate's batch sharding spreads consecutive batches, the same global batch content).
    Accelerate calls `set_epoch(epoch)` before each pass; without it the epoch counts up by itself.
    """

    def __init__(self, num_samples: int, seed: int = 0, repeats: int = 1):
        if repeats < 1:
            raise ValueError(f"repeated_aug={repeats} must be >= 1.")
        self.n = num_samples
        self.seed = seed
        self.repeats = repeats
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.n, generator=gen)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)[: self.n]
        return iter(order.tolist())


def collate(samples: list[tuple]) -> dict[str, Any]:
    """[(views, label or None)] -> {"pixel_values": (B, 3, H, W), "labels": (B,) int64}.

    Views that are a dict (an objective's own `train_transform`) are merged into the batch with
    torch's `default_collate`: a list of views of different sizes becomes a list of batched tensors.
    """
    views = [s[0] for s in samples]
    if isinstance(views[0], dict):
        batch = dict(default_collate(views))
    else:
        batch = {"pixel_values": torch.stack(views)}
    if samples and samples[0][1] is not None:
        batch["labels"] = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return batch


def make_loader(
    bundle: DataBundle,
    split: str,
    kind: str | Callable,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    repeated_aug: int = 1,
    num_workers: Optional[int] = None,
) -> DataLoader:
    """A DataLoader of dict batches over `bundle.train` or `bundle.eval`.

    Args:
        split: "train" or "eval" (which dataset of the bundle).
        kind: a built-in transform, "mae" | "supervised" | "eval" (see transforms.py), or an objective's
            own training transform (a PIL RGB image -> a tensor or a dict of views; training only).
        batch_size: per process (Accelerate shards whole batches).
        train: shuffle (seeded) + drop_last + augmenting transform; False: in order, every row, eval transform.
        repeated_aug: DeiT's repeated augmentation factor (3 in DeiT); training only.
        num_workers: None: data.num_workers.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got '{split}'.")
    hf = bundle.train if split == "train" else bundle.eval
    if hf is None:
        raise DataError(
            f"dataset '{bundle.name}' has no eval split and none was carved (data.val_fraction=0): set "
            f"data.eval_split or data.val_fraction > 0."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if repeated_aug < 1:
        raise ValueError(f"repeated_aug={repeated_aug} must be >= 1.")
    cfg = bundle.cfg
    workers = cfg.num_workers if num_workers is None else num_workers
    transform = build_transform(kind, cfg, train=train) if isinstance(kind, str) else own_transform(kind)
    # An eval split may lack the label column when the run needs no labels (load_data checked).
    has_labels = bundle.label_column is not None and (hf.features is None or bundle.label_column in hf.features)
    rows = _Rows(bundle, split, transform, multiprocessing.Value("q", 0), has_labels)
    hf = _undecoded(hf, bundle)

    # torch seeds `random`, numpy and torch in each worker from this generator; timm's and
    # torchvision's random ops draw from those, so a seeded loader gives repeatable augmentations.
    generator = torch.Generator()
    generator.manual_seed(seed)
    pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
    common: dict[str, Any] = dict(
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin,
        generator=generator,
        persistent_workers=workers > 0 and train,
    )
    if bundle.streaming:
        # Workers beyond the stream's shard count would idle (datasets deals whole shards).
        workers = min(workers, max(1, getattr(hf, "n_shards", 1)))
        common.update(num_workers=workers, persistent_workers=False)
        state = PartialState()
        split_here = train and split == "train" and bundle.train_shard_rows is not None
        rank, quota = 0, None
        if split_here:
            hf, workers, quota = _split_stream(hf, bundle, state, workers, batch_size)
            rank = state.process_index
            common.update(num_workers=workers)
        elif train and state.num_processes > 1 and state.is_main_process:
            logger.info(
                "%s: streamed without per-shard row counts (a Hub stream, or an eval split carved from it): "
                "process 0 reads it and sends every process its batches", rows.where,
            )
        data = StreamImages(
            hf, rows, shuffle=train, seed=seed, buffer=cfg.shuffle_buffer, repeats=repeated_aug if train else 1,
            rank=rank, quota=quota, workers=workers,
        )
        loader = DataLoader(data, batch_size=batch_size, drop_last=train, **common)
        return _placed_on_device(loader, state, pin) if split_here else loader

    data = MapImages(hf, rows)
    if train:
        if len(data) < batch_size:
            raise DataError(
                f"split '{split}' of dataset '{bundle.name}' has {len(data)} rows, fewer than one batch "
                f"({batch_size}); training drops the last partial batch, so nothing would be trained: lower "
                f"the batch size or use more data."
            )
        sampler: Sampler[int] = ShuffleSampler(len(data), seed=seed, repeats=repeated_aug)
    else:
        sampler = SequentialSampler(data)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=train, **common)


def _split_stream(hf: Any, bundle: DataBundle, state: PartialState, workers: int, batch_size: int) -> tuple:
    """(this process's part of a stream of local shards, its worker count, samples per worker per epoch).

    `datasets.distributed.split_dataset_by_node`: with a shard count divisible by the number of processes
    each process reads its own shards; otherwise every process reads every shard and keeps 1 row in N.
    Shards have unequal sizes, so each worker's quota is what the fewest shards it can be dealt hold:
    every process then yields the same number of batches, and together they see each image at most once
    an epoch (with equal shards, every image once).
    """
    rows = bundle.train_shard_rows
    n, world = len(rows), state.num_processes
    by_shards = n % world == 0
    per_process = n // world if by_shards else n  # shards each process reads
    workers = min(workers, per_process)
    streams = max(workers, 1)
    fewest = sum(sorted(rows)[: per_process // streams]) // (1 if by_shards else world)
    quota = fewest // batch_size * batch_size
    if quota == 0:
        raise DataError(
            f"split '{bundle.train_split}' of dataset '{bundle.name}': {n} shards of {min(rows)}-{max(rows)} rows "
            f"across {world} process(es) x {streams} loader worker(s) leave a worker {fewest} rows, fewer than one "
            f"batch of {batch_size}: lower train.batch_size or data.num_workers, or use more or larger shards."
        )
    if state.is_main_process:
        total, seen = sum(rows), quota * streams * world
        how = f"{per_process} shard(s) each" if by_shards else f"all {n} shards each, keeping 1 row in {world}"
        logger.info(
            "%s: streamed across %d process(es) (%s) x %d worker(s): %d samples each per epoch%s",
            f"split '{bundle.train_split}' of dataset '{bundle.name}'", world, how, streams, quota,
            f"; {total - seen} of {total} images left out of each epoch (unequal shards)" if seen < total else "",
        )
    if world > 1:
        from datasets.distributed import split_dataset_by_node  # datasets is imported lazily (sources.py)

        hf = split_dataset_by_node(hf, rank=state.process_index, world_size=world)
    return hf, workers, quota


def _placed_on_device(loader: DataLoader, state: PartialState, pin: bool) -> Any:
    """`loader` wrapped by Accelerate for device placement only: it reads this process's part already, so
    `accelerator.prepare` must neither shard it again nor dispatch it from process 0 (Accelerate returns a
    loader marked as prepared unchanged)."""
    prepared = prepare_data_loader(
        loader, state.device, num_processes=1, process_index=0, put_on_device=True, dispatch_batches=False,
        non_blocking=pin and state.device.type == "cuda",
    )
    prepared._is_accelerate_prepared = True
    return prepared


def _undecoded(hf: Any, bundle: DataBundle) -> Any:
    """Only the columns we read, with images left as bytes/paths (we decode, to own the errors)."""
    import datasets

    if hf.features is not None:
        hf = hf.select_columns([c for c in (bundle.image_column, bundle.label_column) if c and c in hf.features])
        if isinstance(hf.features[bundle.image_column], datasets.Image):
            hf = hf.cast_column(bundle.image_column, datasets.Image(decode=False))
    return hf
