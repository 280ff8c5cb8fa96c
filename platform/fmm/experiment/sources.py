"""Samples from what users have, read in blocks and checked as they are read: the input of
`fmm data prepare --from` and of `fmm fid`.

- an array file, `.npy` or `.npz` (local or s3://): N x D vectors, or images N x C x H x W,
  N x H x W x C (C in {1, 3}) or N x H x W (grey); uint8 (images on [0, 255]) or float (vectors,
  or images on fmm's sample space [-1, 1]). In an `.npz` the samples are `images`, `x`, `data`,
  `arr_0` or its only array, the labels `labels`, `label` or `y`.
- a folder of .png/.jpg/.jpeg/.bmp/.webp files, searched recursively in sorted order; when every
  image lies in a first-level sub-folder, the sub-folders are the classes (labels 0..K-1 in sorted
  order). Grey when the first image is, RGB otherwise; every image of one size.
- a Parquet table (a .parquet file or a folder of them) of which `column` holds each sample as a
  list of numbers, with `shape` (C, H, W for images; default: vectors of the row's width) and an
  optional `label_column`.
- a prepared dataset (a folder or URI holding `_manifest.json`).

Checked: an empty source, an unsupported dtype or layout, NaN or infinity, float images beyond
[-1, 1] (images on [0, 255] belong in uint8), rows of another width and images of mixed sizes are
refused naming the file and the first bad item.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmm.experiment.data import MANIFEST, ShardWriter, columns, iter_rows, read_manifest
from fmm.infra import storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SAMPLE_KEYS = ("images", "x", "data", "arr_0")
LABEL_KEYS = ("labels", "label", "y")
Block = tuple[np.ndarray, "np.ndarray | None"]


@dataclass
class Source:
    """`count` samples of `shape` at `path`, read `blocks(n)` at a time as (samples, labels or None):
    uint8 images or float32; `check()` reads it once for what would stop a pass half-way."""

    path: str
    shape: tuple[int, ...]
    count: int
    encoding: str                                   # "uint8_image" or "float32", as a manifest says
    read: Callable[[int], Iterator[Block]]
    classes: list[str] | None = None
    labelled: bool = False
    validate: Callable[[], None] | None = None      # a cheaper full check than reading (image headers)

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def blocks(self, n: int = 1024) -> Iterator[Block]:
        return self.read(n)

    def check(self) -> None:
        if self.validate is not None:
            self.validate()
            return
        for _ in self.read(4096):
            pass


def checked(block: np.ndarray, path: str, first: int, image: bool) -> np.ndarray:
    """uint8 stays (images); float becomes float32, refused at NaN, infinity, or (images) beyond
    [-1, 1] by more than rounding; every other dtype is refused. `first` is the block's first index."""
    noun = "image" if image else "row"
    if block.dtype == np.uint8 and image:
        return np.array(block)
    if not np.issubdtype(block.dtype, np.floating):
        raise ValueError(f"{path!r}: samples of dtype {block.dtype}; allowed are uint8 (images on [0, 255]) and "
                         f"float (vectors, or images on [-1, 1]).")
    x = np.array(block, dtype=np.float32)
    flat = x.reshape(len(x), math.prod(x.shape[1:]))
    finite = np.isfinite(flat).all(1)
    if not finite.all():
        raise ValueError(f"{path!r}: {noun} {first + int(np.argmin(finite))} holds NaN or infinity.")
    if image and len(x):
        peak = np.abs(flat).max(1)
        if (peak > 1.5).any():
            bad = int(np.argmax(peak > 1.5))
            raise ValueError(f"{path!r}: float images are read on [-1, 1] (fmm's sample space) but image {first + bad} "
                             f"reaches {float(peak[bad]):.4g}; store images on [0, 255] as uint8.")
    return x


def _layout(array: np.ndarray, path: str) -> np.ndarray:
    """Vectors N x D as they are; images as N x C x H x W (a view)."""
    if array.ndim == 2:
        return array
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{path!r}: samples are N x D vectors or N x C x H x W, N x H x W x C or N x H x W images; "
                         f"got shape {list(array.shape)}.")
    if array.shape[1] not in (1, 3):
        if array.shape[3] not in (1, 3):
            raise ValueError(f"{path!r}: images of shape {list(array.shape[1:])} have neither 1 nor 3 channels "
                             f"first (NCHW) or last (NHWC).")
        array = array.transpose(0, 3, 1, 2)
    return array


def _labels(labels, count: int, path: str) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path!r}: labels must be {count} integers, one per sample; got {labels.dtype} of shape "
                         f"{list(labels.shape)}.")
    return labels.astype(np.int64)


def array_source(array: np.ndarray, path: str, labels=None) -> Source:
    array = _layout(array, path)
    image = array.ndim == 4
    if len(array) == 0:
        raise ValueError(f"{path!r} holds no {'images' if image else 'samples'}.")
    checked(array[:0], path, 0, image)  # the dtype, before anything is read
    labels = _labels(labels, len(array), path)
    encoding = "uint8_image" if array.dtype == np.uint8 else "float32"

    def read(n: int):
        for start in range(0, len(array), n):
            yield (checked(array[start:start + n], path, start, image),
                   None if labels is None else labels[start:start + n])
    return Source(path, tuple(int(v) for v in array.shape[1:]), len(array), encoding, read,
                  labelled=labels is not None)


def array_file(path: str) -> Source:
    local = not storage.is_remote(path)
    if local and not os.path.isfile(path):
        raise ValueError(f"no file at {path!r}.")
    try:
        if path.endswith(".npy"):
            return array_source(np.load(path, mmap_mode="r") if local else np.load(io.BytesIO(storage.read_bytes(path))),
                                path)
        stored = np.load(path if local else io.BytesIO(storage.read_bytes(path)))
    except (OSError, EOFError) as err:
        raise ValueError(f"{path!r} cannot be read as {path.rsplit('.', 1)[-1]}: {err}") from None
    keys = [k for k in SAMPLE_KEYS if k in stored.files] or (stored.files if len(stored.files) == 1 else [])
    if not keys:
        raise ValueError(f"{path!r} holds arrays {stored.files}: name the samples one of {list(SAMPLE_KEYS)} (and "
                         f"the labels one of {list(LABEL_KEYS)}).")
    label_key = next((k for k in LABEL_KEYS if k in stored.files), None)
    return array_source(stored[keys[0]], path, stored[label_key] if label_key else None)


def image_folder(folder: str) -> Source:
    from PIL import Image  # Pillow comes with matplotlib; only folders of images need it

    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"{folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no {MANIFEST}.")
    parts = [os.path.relpath(f, folder).split(os.sep) for f in files]
    classes = sorted({p[0] for p in parts}) if all(len(p) > 1 for p in parts) else None
    labels = np.array([classes.index(p[0]) for p in parts]) if classes else None
    with Image.open(files[0]) as first:
        mode = "L" if first.mode in ("1", "L", "I", "I;16", "F") else "RGB"
        size = first.size

    def opened(path: str):
        try:
            image = Image.open(path)
        except OSError as err:
            raise ValueError(f"{path!r} cannot be read as an image: {err}") from None
        if image.size != size:
            raise ValueError(f"{path!r} is {image.size[0]} x {image.size[1]} but {files[0]!r} is "
                             f"{size[0]} x {size[1]}; a set holds images of one size.")
        return image

    def read(n: int):
        for start in range(0, len(files), n):
            block = []
            for path in files[start:start + n]:
                with opened(path) as image:
                    pixels = np.asarray(image.convert(mode), dtype=np.uint8)
                block.append(pixels[None] if mode == "L" else pixels.transpose(2, 0, 1))
            yield np.stack(block), None if labels is None else labels[start:start + n]

    def validate():  # the headers only: every file an image of the first one's size
        for path in files:
            opened(path).close()
    return Source(folder, (1 if mode == "L" else 3, size[1], size[0]), len(files), "uint8_image", read, classes,
                  labels is not None, validate)


def parquet_table(path: str, column: str | None, label_column: str | None = None,
                  shape: tuple[int, ...] | None = None) -> Source:
    if not column:
        raise ValueError(f"{path!r} is a Parquet table: name the column that holds the samples (--column).")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
    else:
        files = [path]
    count, width = 0, None
    for file in files:
        try:
            schema, rows = pq.read_schema(file), pq.ParquetFile(file).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as err:
            raise ValueError(f"{file!r} cannot be read as Parquet: {err}") from None
        for name in (column, label_column):
            if name and name not in schema.names:
                raise ValueError(f"{file!r} has no column {name!r}; its columns are {schema.names}.")
        kind = schema.field(column).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
            raise ValueError(f"{file!r}: column {column!r} is {kind}; it must hold each sample as a list of numbers.")
        count += rows
    if count == 0:
        raise ValueError(f"{path!r} holds no samples.")

    def read(n: int):
        nonlocal width
        start = 0
        for file in files:
            columns = [column] + ([label_column] if label_column else [])
            for batch in pq.ParquetFile(file).iter_batches(batch_size=n, columns=columns):
                values = batch.column(0)
                lengths = np.asarray(values.value_lengths() if hasattr(values, "value_lengths") else
                                     [values.type.list_size] * len(values))
                width = width or int(lengths[0])
                if (lengths != width).any():
                    bad = start + int(np.argmax(lengths != width))
                    raise ValueError(f"{file!r}: row {bad} of column {column!r} holds {int(lengths[bad - start])} "
                                     f"values where the first holds {width}.")
                flat = values.flatten().to_numpy(zero_copy_only=False).reshape(len(batch), width)
                want = shape or (width,)
                if math.prod(want) != width:
                    raise ValueError(f"--shape {list(want)} holds {math.prod(want)} values but the rows of {column!r} "
                                     f"hold {width}.")
                labels = batch.column(1).to_numpy(zero_copy_only=False) if label_column else None
                yield (checked(flat.reshape(len(batch), *want), path, start, len(want) == 3),
                       None if labels is None else _labels(labels, len(batch), path))
                start += len(batch)
    first = next(read(1))[0]
    encoding = "uint8_image" if first.dtype == np.uint8 else "float32"
    return Source(path, tuple(first.shape[1:]), count, encoding, read, labelled=label_column is not None)


def prepared(uri: str) -> Source:
    manifest = read_manifest(uri)
    shape = tuple(manifest["shape"])
    labelled = "label" in columns(uri)

    def read(n: int):
        labels = iter_rows(uri, n, "label") if labelled else None
        for block in iter_rows(uri, n):
            yield block.reshape(-1, *shape), None if labels is None else next(labels)
    return Source(uri, shape, int(manifest["rows"]), manifest["encoding"], read, manifest.get("classes"), labelled,
                  validate=lambda: None)  # checked when it was written


def open_source(path: str, column: str | None = None, label_column: str | None = None,
                shape: tuple[int, ...] | None = None) -> Source:
    """The samples at `path` (see the module's docstring); a ValueError saying what is accepted otherwise."""
    if path.endswith((".npy", ".npz")):
        return array_file(path)
    if storage.exists(storage.join(path, MANIFEST)):
        return prepared(path)
    local = not storage.is_remote(path)
    if local and (path.endswith(".parquet") or (os.path.isdir(path) and any(
            f.endswith(".parquet") for f in os.listdir(path)))):
        return parquet_table(path, column, label_column, shape)
    if local and os.path.isdir(path):
        return image_folder(path)
    raise ValueError(f"{path!r} holds no samples fmm reads: give a .npy or .npz file, a folder of images "
                     f"({', '.join(IMAGE_SUFFIXES)}), a Parquet table (with --column), or a prepared dataset (a "
                     f"folder or URI holding {MANIFEST}).")


def write_source(source: Source, out_uri: str, shards: int = 4, name: str | None = None, log=None) -> dict:
    """The source checked whole, then written as Parquet shards and a manifest (the manifest last): a
    refused source leaves nothing at `out_uri`."""
    source.check()
    if storage.exists(storage.join(out_uri, MANIFEST)):
        raise ValueError(f"{out_uri!r} already holds a prepared dataset; choose another --out or remove it.")
    name = name or os.path.basename(source.path.rstrip("/")).rsplit(".", 1)[0] or "data"
    extra = {"source": source.path, **({"classes": source.classes} if source.classes else {})}
    if log:
        log(f"[fmm] {source.path}: {source.count:,} rows of shape {list(source.shape)}, checked; writing to {out_uri}")
    writer = ShardWriter(out_uri, name, source.shape, source.encoding, source.count, min(shards, source.count),
                         source.labelled, log=log, **extra)
    for x, labels in source.blocks(4096):
        writer.add(x, labels)
    return writer.close()
