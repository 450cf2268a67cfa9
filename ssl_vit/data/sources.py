"""Open `data.name` (synthetic | local parquet / image folder / save_to_disk | Hub id) as a DataBundle.

`load_data` returns Hugging Face datasets with images still undecoded (decoding, RGB conversion and
transforms happen lazily in the loader, see loader.py), plus what every consumer needs to know:
which columns hold images and labels, how many classes and their names.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ssl_vit.data.config import DataConfig

__all__ = ["DataBundle", "DataError", "load_data", "detect_image_column", "detect_label_column"]

logger = logging.getLogger(__name__)

# Column names tried in order (then any `Image` / `ClassLabel` typed column).
IMAGE_COLUMNS = ("image", "img", "pixel_values", "images", "jpg", "jpeg", "png", "webp", "picture", "photo")
LABEL_COLUMNS = ("label", "labels", "fine_label", "cls", "class", "target", "targets", "category", "label_id")
# Split names that serve as the eval split when `data.eval_split` is not given, best first.
EVAL_SPLITS = ("validation", "valid", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}

AnyDataset = Any  # datasets.Dataset | datasets.IterableDataset (datasets is imported lazily)


class DataError(ValueError):
    """A data problem the user can fix; the message names the dataset, what is wrong and the fix."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker's DataError comes back re-raised as "Caught DataError in DataLoader worker
        # process N.\nOriginal Traceback (...):\n...\nDataError: <message>": keep the user's paragraph.
        if message.startswith("Caught DataError") and "DataError: " in message:
            message = message.rsplit("DataError: ", 1)[1].strip()
        super().__init__(message)


@dataclass
class DataBundle:
    """The data of a run: train/eval splits (HF datasets, images undecoded) and their description."""

    train: AnyDataset
    eval: Optional[AnyDataset]
    num_classes: Optional[int]  # None when the data has no label column
    class_names: list[str]
    image_column: str
    label_column: Optional[str]
    cfg: DataConfig
    # Raw label value -> class index, when labels are not already 0..K-1 integers (strings, gaps).
    label_map: Optional[dict] = None
    # True when `eval` was carved from train (no eval split in the data).
    eval_carved: bool = False
    streaming: bool = False
    name: str = ""
    # The splits' names in the source ("test", ...; the train split's name when eval was carved).
    train_split: str = "train"
    eval_split: Optional[str] = None
    # Row of the source split behind each row of `train` / `eval` when they are carved subsets
    # (None: the same rows), so that errors name the row a user can find in the files.
    train_rows: Optional[np.ndarray] = None
    eval_rows: Optional[np.ndarray] = None
    # Streamed local shards: rows per shard of `train`, in its shard order (None: unknown, e.g. a Hub
    # stream or a carved split). What lets make_loader give every process an equal share.
    train_shard_rows: Optional[list[int]] = None

    def describe(self) -> str:
        """One line for logs: source, sizes, columns and classes."""

        def size(ds: AnyDataset) -> str:
            return "streamed" if self.streaming else str(len(ds))

        ev = "none" if self.eval is None else f"{size(self.eval)}{' (carved from train)' if self.eval_carved else ''}"
        classes = "no labels" if self.num_classes is None else f"{self.num_classes} classes"
        return (
            f"data '{self.name}': train {size(self.train)}, eval {ev}, image column '{self.image_column}', "
            f"label column {self.label_column!r}, {classes}"
        )


# ---------------------------------------------------------------------------------------------------
# Opening sources: each returns {split name: Dataset or IterableDataset}


def _open_synthetic(cfg: DataConfig) -> dict[str, AnyDataset]:
    from ssl_vit.data.synthetic import make_synthetic

    splits = make_synthetic(cfg.synthetic_train_size, cfg.synthetic_eval_size, cfg.image_size, cfg.synthetic_seed)
    if cfg.streaming:
        splits = {k: v.to_iterable_dataset() for k, v in splits.items()}
    return splits


def _split_of_file(path: Path, root: Path) -> str:
    """Split a parquet file belongs to: a `train/` style folder, or a `train-0000.parquet` style name."""
    known = ("train", "validation", "valid", "val", "test")
    rel = path.relative_to(root)
    for part in rel.parts[:-1]:
        if part.lower() in known:
            return part.lower()
    match = re.match(r"^([A-Za-z]+)", path.stem)
    if match and match.group(1).lower() in known:
        return match.group(1).lower()
    return "train"


def _as_dict(loaded: Any) -> dict[str, AnyDataset]:
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return dict(loaded)
    return {"train": loaded}


# Sharded formats a local folder may hold, by file suffix: parquet, and WebDataset tar shards (one sample
# per key: `000123.jpg` + `000123.cls`, read through datasets' "webdataset" builder).
SHARD_FORMATS = {".parquet": "parquet", ".tar": "webdataset"}
# WebDataset's sample key rule: the path up to the first dot of the file name (`a/b/0001.seg.png` -> `a/b/0001`).
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _shard_files(path: Path) -> tuple[str, dict[str, list[Path]]] | None:
    """(datasets builder, {split: sorted shard files}) for a local shard file or folder, else None."""
    if path.is_file():
        fmt = SHARD_FORMATS.get(path.suffix.lower())
        return (fmt, {"train": [path]}) if fmt else None
    for suffix, fmt in SHARD_FORMATS.items():
        found = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
        if found:
            files: dict[str, list[Path]] = {}
            for f in found:
                files.setdefault(_split_of_file(f, path), []).append(f)
            return fmt, files
    return None


def _open_local(path: Path, cfg: DataConfig) -> dict[str, AnyDataset]:
    import datasets

    common = dict(cache_dir=cfg.cache_dir, streaming=cfg.streaming)
    if path.is_file() and path.suffix.lower() not in SHARD_FORMATS:
        raise DataError(
            f"data.name '{path}' is a {path.suffix or 'suffix-less'} file: a local dataset is a .parquet file or a "
            f".tar shard (WebDataset), or a folder of parquet files, of .tar shards, of images (class_name/*.jpg), "
            f"or of save_to_disk output."
        )
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = _as_dict(datasets.load_from_disk(str(path)))
        if cfg.streaming:
            loaded = {k: v.to_iterable_dataset() for k, v in loaded.items()}
        return loaded
    shards = _shard_files(path)
    if shards is not None:
        fmt, files = shards
        data_files = {split: [str(f) for f in fs] for split, fs in files.items()}
        return _as_dict(datasets.load_dataset(fmt, data_files=data_files, **common))
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
        return _as_dict(datasets.load_dataset("imagefolder", data_dir=str(path), **common))
    raise DataError(
        f"folder '{path}' holds no dataset: expected parquet files, .tar shards (WebDataset), images in class "
        f"folders (class_name/*.jpg), or the output of Dataset.save_to_disk."
    )


def _rows_in_shard(path: Path) -> int:
    """Rows of one shard, from its metadata: parquet's footer, or a tar's member headers (no data read)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    samples, last = 0, None
    with tarfile.open(path) as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if not member.isreg() or name.startswith((".", "__")):
                continue  # what datasets' tar reader skips
            match = _WDS_KEY.match(member.name)
            if match and match.group(1) != last:
                samples, last = samples + 1, match.group(1)
    return samples


def _shard_rows(cfg: DataConfig, split: str, stream: AnyDataset) -> Optional[list[int]]:
    """Rows per shard of a streamed local split, in the stream's shard order; None when not known up front.

    What lets every process be given an equal share of a stream (see loader.py): known for local parquet
    and tar shards, not for Hub streams.
    """
    path = Path(cfg.name).expanduser()
    if not cfg.streaming or cfg.name == "synthetic" or not path.exists():
        return None
    shards = _shard_files(path)
    if shards is None or split not in shards[1]:
        return None
    rows = [_rows_in_shard(f) for f in shards[1][split]]
    return rows if len(rows) == getattr(stream, "n_shards", None) else None


def _hub_offline() -> bool:
    import datasets

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or any(
        f.upper() in ("1", "ON", "YES", "TRUE") for f in flags
    )


def _hub_error(name: str, err: BaseException) -> DataError:
    text = f"{type(err).__name__}: {err}".strip()
    first = text.splitlines()[0][:300]
    lower = text.lower()
    if _hub_offline():
        why = "the Hugging Face Hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and no cached copy exists"
    elif any(s in lower for s in ("connection", "resolve", "timed out", "timeout", "network", "unreachable")):
        why = "the Hugging Face Hub could not be reached (no network?) and no cached copy exists"
    elif "doesn't exist" in lower or "not found" in lower or "404" in lower or "notfound" in lower:
        why = "the Hub has no dataset of that name (or it is gated/private: log in with `hf auth login`)"
    else:
        why = f"loading it from the Hub failed ({first})"
    return DataError(
        f"cannot load dataset '{name}': it is not a local file or folder, and {why}. Fix data.name: "
        f"a Hub id (e.g. uoft-cs/cifar10), a local parquet file/folder, an image folder, a save_to_disk "
        f"folder, or 'synthetic' (built in, no download)."
    )


def _looks_like_path(name: str) -> bool:
    # Hub ids are `name` or `owner/name`; anything else with slashes or a file suffix is a path.
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in {".parquet", ".arrow", ".tar"} | IMAGE_SUFFIXES
    )


def _open_source(cfg: DataConfig) -> dict[str, AnyDataset]:
    if cfg.name == "synthetic":
        return _open_synthetic(cfg)
    path = Path(cfg.name).expanduser()
    if path.exists():
        try:
            return _open_local(path, cfg)
        except DataError:
            raise
        except Exception as err:  # a broken local file: say which and why, without datasets' stack
            if "corresponds to no data" in str(err):  # datasets' words for 0 rows
                raise DataError(f"local dataset '{cfg.name}' is empty (0 rows): check data.name.") from None
            raise DataError(f"cannot read local dataset '{cfg.name}': {type(err).__name__}: {err}") from None
    if _looks_like_path(cfg.name):
        raise DataError(
            f"data.name '{cfg.name}' looks like a path, but there is no such file or folder "
            f"(working directory: {Path.cwd()})."
        )
    import datasets

    try:
        return _as_dict(datasets.load_dataset(cfg.name, cache_dir=cfg.cache_dir, streaming=cfg.streaming))
    except Exception as err:  # datasets raises many types (connection, 404, auth...): one clear message
        raise _hub_error(cfg.name, err) from None


# ---------------------------------------------------------------------------------------------------
# Columns, classes, splits


def _features(ds: AnyDataset) -> dict:
    """Column name -> feature; for a stream with unknown features, types from its first row."""
    if ds.features is not None:
        return dict(ds.features)
    first = next(iter(ds.take(1)), None)
    return {k: None for k in (first or {})}


def _pick_column(features: dict, override: Optional[str], names: tuple[str, ...], type_name: str) -> Optional[str]:
    if override:
        return override if override in features else None
    lowered = {c.lower(): c for c in features}
    for name in names:
        if name in features:
            return name
        if name in lowered:
            return lowered[name]
    for col, feat in features.items():
        if type(feat).__name__ == type_name:
            return col
    return None


def detect_image_column(features: dict, override: Optional[str] = None) -> Optional[str]:
    """The image column: `override`, else a known name (image, img, pixel_values, ...), else any Image column."""
    return _pick_column(features, override, IMAGE_COLUMNS, "Image")


def detect_label_column(features: dict, override: Optional[str] = None) -> Optional[str]:
    """The label column: `override`, else a known name (label, labels, fine_label, ...), else any ClassLabel."""
    return _pick_column(features, override, LABEL_COLUMNS, "ClassLabel")


def _label_values(ds: AnyDataset, column: str) -> np.ndarray:
    # Read the column straight from Arrow (no image decoding), respecting any indices mapping.
    return np.asarray(ds.with_format("numpy", columns=[column])[column])


def _carve(train: AnyDataset, label_col: Optional[str], frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, eval) of a seeded split of `frac` of train, stratified by label when there is one."""
    n = len(train)
    rng = np.random.default_rng(seed)
    if label_col is not None:
        labels = _label_values(train, label_col)
        eval_idx = []
        for value in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == value))
            # At least one per class (when it has two or more), so every class can be evaluated.
            k = int(round(len(members) * frac))
            k = min(max(k, 1 if len(members) > 1 else 0), len(members) - 1) if len(members) > 1 else 0
            eval_idx.append(members[:k])
        eval_idx = np.sort(np.concatenate(eval_idx)) if eval_idx else np.array([], dtype=int)
    else:
        eval_idx = np.sort(rng.permutation(n)[: int(round(n * frac))])
    mask = np.ones(n, dtype=bool)
    mask[eval_idx] = False
    return np.flatnonzero(mask), eval_idx


def _carve_stream(train: AnyDataset, image_col: str, frac: float, seed: int) -> tuple[AnyDataset, AnyDataset]:
    """Streamed data: a row goes to eval when a seeded hash of its image bytes falls below `frac`.

    Membership depends on the row's content only, so it is the same whatever the order, shuffle,
    sharding or number of workers (a stream cannot be counted and stratified up front).
    """
    import hashlib

    import datasets

    raw = train.cast_column(image_col, datasets.Image(decode=False)) if isinstance(
        train.features.get(image_col) if train.features else None, datasets.Image
    ) else train

    def in_eval(row: dict) -> bool:
        cell = row[image_col]
        if isinstance(cell, dict):  # an undecoded Image: its bytes, else its file path
            key = cell.get("bytes") or (cell.get("path") or "").encode()
        elif isinstance(cell, (bytes, bytearray)):
            key = bytes(cell)
        elif hasattr(cell, "tobytes"):  # PIL images and arrays: their pixels
            key = cell.tobytes()
        else:
            key = np.asarray(cell).tobytes()
        digest = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
        return int.from_bytes(digest, "little") / 2**64 < frac

    keep_eval = raw.filter(in_eval)
    keep_train = raw.filter(lambda row: not in_eval(row))
    if raw is not train:  # give the images back their decoding feature
        keep_eval = keep_eval.cast_column(image_col, train.features[image_col])
        keep_train = keep_train.cast_column(image_col, train.features[image_col])
    return keep_train, keep_eval


def _check_not_empty(ds: AnyDataset, what: str) -> None:
    if hasattr(ds, "__len__") and len(ds) == 0:
        raise DataError(
            f"{what} is empty (0 rows): check data.name and the split names (data.train_split, data.eval_split)."
        )


def _class_info(
    cfg: DataConfig, splits: list[tuple[str, AnyDataset]], label_col: str, streaming: bool, where: str
) -> tuple[int, list[str], Optional[dict]]:
    """num_classes, class names and (if needed) a raw value -> index map for `label_col`."""
    import datasets

    feature = splits[0][1].features.get(label_col) if splits[0][1].features else None
    if isinstance(feature, datasets.ClassLabel):
        if cfg.num_classes is not None and cfg.num_classes != feature.num_classes:
            raise DataError(
                f"data.num_classes={cfg.num_classes} but column '{label_col}' of {where} is a ClassLabel with "
                f"{feature.num_classes} classes: drop data.num_classes (it is read from the data)."
            )
        return feature.num_classes, list(feature.names), None
    if cfg.num_classes is not None:
        return cfg.num_classes, [str(i) for i in range(cfg.num_classes)], None
    if streaming:
        raise DataError(
            f"label column '{label_col}' of {where} is not a ClassLabel, and a stream cannot be scanned for its "
            f"distinct labels: set data.num_classes=K (labels must then be integers 0..K-1)."
        )
    values = np.unique(np.concatenate([_label_values(ds, label_col) for _, ds in splits]))
    if values.dtype.kind in "iu" and len(values) and values[0] == 0 and values[-1] == len(values) - 1:
        return len(values), [str(v) for v in values.tolist()], None
    if values.dtype.kind in "iu" and len(values) and values[0] < 0:
        raise DataError(
            f"label column '{label_col}' of {where} has negative labels ({values[0]}; -1 usually marks "
            f"unlabelled rows, e.g. a test split): choose another split (data.eval_split) or label column."
        )
    names = [str(v) for v in values.tolist()]
    logger.info("labels of %s are not 0..K-1 integers: mapping %d distinct values to class indices", where, len(names))
    return len(names), names, {v: i for i, v in enumerate(values.tolist())}


def _is_class_label(ds: AnyDataset, column: str) -> bool:
    import datasets

    return isinstance((ds.features or {}).get(column), datasets.ClassLabel)


def _check_label_range(
    ds: AnyDataset, label_col: str, num_classes: int, what: str, row_ids: Optional[np.ndarray] = None
) -> None:
    """`row_ids`: for a carved subset, the source-split row of each of its rows (errors name those)."""
    labels = _label_values(ds, label_col)
    if labels.size == 0 or labels.dtype.kind not in "iu":
        return
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        row = int(bad[0]) if row_ids is None else int(row_ids[bad[0]])
        value = int(labels[bad[0]])
        hint = (
            " (-1 marks unlabelled rows, e.g. a test split: choose another data.eval_split)"
            if value == -1
            else f": set data.num_classes to at least {int(labels.max()) + 1}, or fix the labels"
        )
        raise DataError(
            f"{what}: label {value} at row {row} is outside 0..{num_classes - 1} "
            f"({bad.size} such rows){hint}."
        )


def load_data(data_cfg: DataConfig, need_labels: bool, seed: int = 0) -> DataBundle:
    """Open `data_cfg.name`, pick train/eval splits and columns, and check them.

    Args:
        need_labels: the caller trains or evaluates on labels: no label column is then an error.
        seed: the run seed (kept for the contract; the carved split uses `data.split_seed` so that
            runs with different seeds hold out the same images, see DataConfig).
    Raises: DataError with the dataset's name, what is wrong and how to fix it.
    """
    del seed
    cfg = data_cfg
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1): the fraction of train held out.")
    splits = _open_source(cfg)
    name = cfg.name
    if cfg.train_split not in splits:
        raise DataError(
            f"dataset '{name}' has no split '{cfg.train_split}' (it has: {', '.join(splits) or 'none'}): "
            f"set data.train_split."
        )
    train = splits[cfg.train_split]
    streaming = not hasattr(train, "__len__")
    _check_not_empty(train, f"split '{cfg.train_split}' of dataset '{name}'")

    features = _features(train)
    image_col = detect_image_column(features, cfg.image_column)
    if image_col is None:
        which = f"no column '{cfg.image_column}'" if cfg.image_column else "no image column"
        raise DataError(
            f"dataset '{name}' has {which} (columns: {', '.join(features) or 'none'}): set data.image_column."
        )
    label_col = detect_label_column(features, cfg.label_column)
    if cfg.label_column and label_col is None:
        raise DataError(
            f"dataset '{name}' has no column '{cfg.label_column}' (columns: {', '.join(features)}): "
            f"fix data.label_column."
        )
    if label_col is None and need_labels:
        raise DataError(
            f"this run needs labels, but dataset '{name}' has no label column (columns: {', '.join(features)}): "
            f"set data.label_column to the column holding the class, or use an objective without labels (mae)."
        )

    # Eval split: the one asked for, else the data's own, else carved from train.
    eval_ds, carved, eval_name, train_rows, eval_rows = None, False, cfg.eval_split, None, None
    if cfg.eval_split is not None:
        if cfg.eval_split not in splits:
            raise DataError(
                f"dataset '{name}' has no split '{cfg.eval_split}' (it has: {', '.join(splits)}): set data.eval_split, "
                f"or leave it null to carve data.val_fraction of train."
            )
        eval_ds = splits[cfg.eval_split]
    else:
        own = next((s for s in EVAL_SPLITS if s in splits and s != cfg.train_split), None)
        if own is not None:
            eval_ds, eval_name = splits[own], own
            logger.info("data '%s': evaluating on its '%s' split", name, own)
        elif cfg.val_fraction > 0:
            if streaming:
                train, eval_ds = _carve_stream(train, image_col, cfg.val_fraction, cfg.split_seed)
            else:
                train_rows, eval_rows = _carve(train, label_col, cfg.val_fraction, cfg.split_seed)
                train, eval_ds = train.select(train_rows), train.select(eval_rows)
            carved, eval_name = True, cfg.train_split
            kind = "hashed (streamed)" if streaming else ("stratified" if label_col else "random")
            logger.info(
                "data '%s' has no eval split: carved a %s %.0f%% eval split from '%s' (data.split_seed=%d)",
                name, kind, 100 * cfg.val_fraction, cfg.train_split, cfg.split_seed,
            )
    if eval_ds is not None:
        _check_not_empty(eval_ds, f"eval split of dataset '{name}'")
        eval_features = _features(eval_ds)
        if image_col not in eval_features:
            raise DataError(
                f"the eval split of '{name}' has no column '{image_col}' (columns: {', '.join(eval_features)})."
            )
        if label_col is not None and label_col not in eval_features:
            if need_labels:
                raise DataError(
                    f"the eval split of '{name}' has no label column '{label_col}' (columns: "
                    f"{', '.join(eval_features)}): choose another data.eval_split."
                )

    num_classes, class_names, label_map = None, [], None
    if label_col is not None and streaming and not need_labels and cfg.num_classes is None and not _is_class_label(
        train, label_col
    ):
        # A stream's plain integer labels (WebDataset's `cls`) cannot be counted up front; a run without
        # labels does not need them.
        logger.info("data '%s': ignoring label column '%s' (a stream's plain labels; this run needs none)",
                    name, label_col)
        label_col = None
    if label_col is not None:
        parts = [("train", train)]
        if eval_ds is not None and label_col in _features(eval_ds):
            parts.append(("eval", eval_ds))
        num_classes, class_names, label_map = _class_info(cfg, parts, label_col, streaming, f"dataset '{name}'")
        if not streaming and label_map is None:
            for part, ds in parts:
                rows = train_rows if part == "train" else eval_rows  # carved: rows of the source split
                where = f"split '{cfg.train_split}'" if rows is not None else f"{part} split"
                _check_label_range(ds, label_col, num_classes, f"{where} of dataset '{name}'", rows)

    bundle = DataBundle(
        train=train,
        eval=eval_ds,
        num_classes=num_classes,
        class_names=class_names,
        image_column=image_col,
        label_column=label_col,
        cfg=cfg,
        label_map=label_map,
        eval_carved=carved,
        streaming=streaming,
        name=name,
        train_split=cfg.train_split,
        eval_split=eval_name,
        train_rows=train_rows,
        eval_rows=eval_rows,
        train_shard_rows=None if carved else _shard_rows(cfg, cfg.train_split, train),
    )
    logger.info(bundle.describe())
    return bundle
