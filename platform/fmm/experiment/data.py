"""Datasets as Parquet shards on local disk or S3: preparation from the original files, and reading
one part per worker.

`prepare(name, out_uri)` writes `part-NNNNN.parquet` shards (ShardWriter: one shard in memory at a
time, row groups of about 1 MB) and, last, a `_manifest.json` naming them with their row counts and
sha256, so a half-written folder never looks complete. Each row holds one sample, flattened in a
fixed-size list column `x` (uint8 for images, float32 for vectors) and an optional `label`; the
manifest records the sample shape and the encoding. Images stay uint8 until a batch is drawn and
are mapped to [-1, 1] then. A worker holds its part in memory up to `data.buffer_rows` rows and
streams a larger one through a shuffle buffer (RowStream); `iter_rows` reads a whole dataset in
order, a block at a time (FID statistics). Your own data: fmm.experiment.sources.

Sources (nothing is downloaded; a missing file is an error naming the path to fill):
- flower, checkerboard: exact samples of the toy targets (fmm.groundtruth);
- digits: scikit-learn's bundled 8x8 digits;
- fashion_mnist: the IDX files (gzipped or not) of Debian's dataset-fashion-mnist, by default
  /usr/share/datasets/fashion-mnist;
- cifar10: the python-pickle archive's data_batch_1..5 in a folder (cifar-10-batches-py);
- imagenet32: the downsampled ImageNet npz batches train_data_batch_1..10 in a folder.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fmm.groundtruth import make_target
from fmm.infra import storage

DATASETS = ("flower", "checkerboard", "digits", "fashion_mnist", "cifar10", "imagenet32")
DEFAULT_SOURCES = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
MANIFEST = "_manifest.json"


@dataclass
class Samples:
    x: np.ndarray              # [N, *shape], uint8 images or float32 vectors
    labels: np.ndarray | None  # [N] int64
    shape: tuple[int, ...]
    encoding: str              # "uint8_image" or "float32"


def _missing(name: str, path: str, expected: str) -> ValueError:
    return ValueError(f"dataset {name!r}: {expected} not found at {path!r}. Put the files there or pass "
                      f"--source with the folder that holds them; nothing is downloaded.")


def _read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format): magic 0x0000 08 NDIM, big-endian dimensions, then uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path!r} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(folder: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def load(name: str, source: str | None = None, samples: int = 100_000, seed: int = 0) -> Samples:
    """Read a dataset from its original files (or draw a toy target) into memory."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}.")
    if name in ("flower", "checkerboard"):
        x = make_target(name).sample(samples, torch.Generator().manual_seed(seed)).numpy().astype(np.float32)
        return Samples(x, None, (x.shape[1],), "float32")
    if name == "digits":
        from sklearn.datasets import load_digits  # scikit-learn's import costs a second; only digits need it

        digits = load_digits()
        x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        return Samples(x, digits.target.astype(np.int64), (1, 8, 8), "uint8_image")
    folder = source or DEFAULT_SOURCES.get(name)
    if folder is None or not os.path.isdir(folder):
        raise _missing(name, str(folder), "the source folder")
    if name == "fashion_mnist":
        images, labels = _find(folder, "train-images-idx3-ubyte"), _find(folder, "train-labels-idx1-ubyte")
        if images is None or labels is None:
            raise _missing(name, folder, "train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)")
        x = _read_idx(images)[:, None]
        return Samples(x, _read_idx(labels).astype(np.int64), (1, 28, 28), "uint8_image")
    if name == "cifar10":
        paths = [os.path.join(folder, f"data_batch_{i}") for i in range(1, 6)]
        if not all(os.path.isfile(p) for p in paths):
            raise _missing(name, folder, "data_batch_1 ... data_batch_5 (the python-pickle archive)")
        xs, ys = [], []
        for path in paths:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return Samples(np.concatenate(xs), np.concatenate(ys), (3, 32, 32), "uint8_image")
    paths = sorted((p for p in os.listdir(folder) if p.startswith("train_data_batch_")),
                   key=lambda p: int(p.split("_")[-1].split(".")[0]))
    if not paths:
        raise _missing(name, folder, "train_data_batch_1 ... train_data_batch_10 (npz)")
    xs, ys = [], []
    for path in paths:
        with np.load(os.path.join(folder, path)) as batch:
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch["labels"], dtype=np.int64) - 1)  # the npz labels count from 1
    return Samples(np.concatenate(xs), np.concatenate(ys), (3, 32, 32), "uint8_image")


class ShardWriter:
    """Rows appended in blocks, written as `shards` Parquet shards of `rows / shards` rows each (one shard
    held in memory at a time), and the manifest last, so a half-written folder never looks complete."""

    def __init__(self, out_uri: str, name: str, shape: tuple[int, ...], encoding: str, rows: int, shards: int,
                 labelled: bool, log=None, **extra):
        if shards < 1:
            raise ValueError(f"shards must be a positive integer; got {shards}.")
        self.out_uri, self.name, self.shape, self.encoding, self.extra = out_uri, name, tuple(shape), encoding, extra
        self.rows, self.labelled = rows, labelled
        self.sizes = [len(part) for part in np.array_split(np.arange(rows), shards) if len(part)]
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.held, self.files, self.written = 0, [], 0
        self.log, self.started = log, time.perf_counter()

    def add(self, x: np.ndarray, labels: np.ndarray | None = None) -> None:
        self.pending.append((x.reshape(len(x), -1), labels))
        self.held += len(x)
        while len(self.files) < len(self.sizes) and self.held >= self.sizes[len(self.files)]:
            self._flush(self.sizes[len(self.files)])

    def _flush(self, n: int) -> None:
        flat = np.concatenate([x for x, _ in self.pending])
        labels = np.concatenate([y for _, y in self.pending]) if self.labelled else None
        self.pending = [(flat[n:], None if labels is None else labels[n:])]
        self.held -= n
        values = pa.array(flat[:n].reshape(-1))
        columns = {"x": pa.FixedSizeListArray.from_arrays(values, flat.shape[1])}
        if labels is not None:
            columns["label"] = pa.array(labels[:n])
        buffer = io.BytesIO()
        row_bytes = flat.shape[1] * flat.dtype.itemsize  # row groups of about 1 MB: what a stream reads at once
        pq.write_table(pa.table(columns), buffer, row_group_size=max(256, (1 << 20) // max(1, row_bytes)))
        file = f"part-{len(self.files):05d}.parquet"
        storage.write_bytes(storage.join(self.out_uri, file), buffer.getvalue())
        self.files.append({"file": file, "rows": int(n), "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()})
        self.written += n
        if self.log:
            self.log(f"[fmm] {file}: {len(self.files)}/{len(self.sizes)} shards, {self.written:,}/{self.rows:,} rows "
                     f"({100 * self.written / self.rows:.0f}%), {time.perf_counter() - self.started:.0f} s")

    def close(self) -> dict:
        if self.written != self.rows or self.held:
            raise ValueError(f"{self.out_uri!r}: {self.written + self.held} rows were given for {self.rows}.")
        manifest = {"dataset": self.name, "shape": list(self.shape), "encoding": self.encoding, "rows": self.rows,
                    "files": self.files, **self.extra}
        storage.write_bytes(storage.join(self.out_uri, MANIFEST), json.dumps(manifest, indent=1).encode())
        return manifest


def write_shards(data: Samples, out_uri: str, shards: int, name: str, log=None) -> dict:
    """Write `data` as Parquet shards plus the manifest, the manifest last (`log`: a line per shard)."""
    writer = ShardWriter(out_uri, name, data.shape, data.encoding, len(data.x), shards, data.labels is not None,
                         log=log)
    writer.add(data.x, data.labels)
    return writer.close()


def columns(uri: str) -> list[str]:
    """The columns of a prepared dataset's shards (x, and label when it has labels)."""
    manifest = read_manifest(uri)
    fs, base = storage.filesystem(uri)
    with fs.open_input_file(f"{base.rstrip('/')}/{manifest['files'][0]['file']}") as f:
        return pq.ParquetFile(f).schema_arrow.names


def prepare(name: str, out_uri: str, *, source: str | None = None, shards: int = 4, samples: int = 100_000,
            seed: int = 0, log=None) -> dict:
    """A named dataset read from its original files (or drawn), written as shards; `log` says how far."""
    started = time.perf_counter()
    if log:
        log(f"[fmm] reading {name}{f' from {source}' if source else ''}")
    data = load(name, source, samples, seed)
    if log:
        log(f"[fmm] read {len(data.x):,} rows of shape {list(data.shape)} in {time.perf_counter() - started:.0f} s; "
            f"writing {shards} shards to {out_uri}")
    return write_shards(data, out_uri, shards, name, log=log)


def read_manifest(uri: str) -> dict:
    return storage.read_json(storage.join(uri, MANIFEST),
                             f"no prepared dataset at {uri!r} (missing {MANIFEST}): write one with "
                             f"'fmm data prepare DATASET --out {uri}'.")


def content_key(uri: str) -> str:
    """The first 16 hex digits of the sha256 of the dataset's manifest, which lists every shard's sha256:
    a key that changes with the data (for manifests written before shards carried their hash, with the
    file names, row counts, shape and encoding only)."""
    read_manifest(uri)  # a clear error when there is none
    return hashlib.sha256(storage.read_bytes(storage.join(uri, MANIFEST))).hexdigest()[:16]


def iter_rows(uri: str, rows: int = 1024, column: str = "x"):
    """Every row of the dataset in order, `rows` at a time, as stored ([rows, width] uint8 for images),
    reading one Parquet record batch at a time: memory is bounded by the batch, not the dataset."""
    manifest = read_manifest(uri)
    fs, base = storage.filesystem(uri)
    pending, held = [], 0
    for entry in manifest["files"]:
        with fs.open_input_file(f"{base.rstrip('/')}/{entry['file']}") as f:
            parquet = pq.ParquetFile(f)
            if column not in parquet.schema_arrow.names:
                raise ValueError(f"the dataset at {uri!r} has no {column!r} column.")
            for batch in parquet.iter_batches(batch_size=rows, columns=[column]):
                values = batch.column(0)
                if column == "x":
                    values = values.values.to_numpy(zero_copy_only=False).reshape(len(batch), -1)
                else:
                    values = values.to_numpy(zero_copy_only=False)
                pending.append(values)
                held += len(values)
                while held >= rows:
                    joined = np.concatenate(pending)
                    yield joined[:rows]
                    pending, held = [joined[rows:]], held - rows
    if held:
        yield np.concatenate(pending)


def _read_rows(uri: str, column: str, rank: int, world: int) -> tuple[np.ndarray, dict]:
    """One column of this worker's rows. Shards are dealt round-robin to workers; with fewer shards
    than workers every worker reads all of them and keeps every world-th row, so no two workers
    hold the same sample."""
    manifest = read_manifest(uri)
    files = [f["file"] for f in manifest["files"]]
    by_shard = len(files) >= world
    mine = files[rank::world] if by_shard else files
    fs, base = storage.filesystem(uri)
    arrays = []
    for file in mine:
        with fs.open_input_file(f"{base.rstrip('/')}/{file}") as f:
            table = pq.read_table(f)
        if column not in table.column_names:
            raise ValueError(f"the dataset at {uri!r} has no {column!r} column.")
        values = table.column(column).combine_chunks()
        if column == "x":
            values = values.values.to_numpy(zero_copy_only=False).reshape(len(table), -1)
        else:
            values = values.to_numpy(zero_copy_only=False)
        arrays.append(values)
    rows = np.concatenate(arrays)
    return (rows if by_shard else rows[rank::world]), manifest


def decode(rows: np.ndarray, manifest: dict) -> torch.Tensor:
    """Stored rows [n, width] as float32 samples in model space ([-1, 1] for uint8 images)."""
    x = torch.from_numpy(np.ascontiguousarray(rows)).reshape(-1, *manifest["shape"])
    return x.float() / 127.5 - 1 if manifest["encoding"] == "uint8_image" else x.float()


def read_part(uri: str, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, dict]:
    """This worker's part of the shards, decoded to float32 model space ([-1, 1] for images)."""
    flat, manifest = _read_rows(uri, "x", rank, world)
    return decode(flat, manifest), manifest


def read_labels(uri: str, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The labels of the same rows as read_part."""
    return torch.from_numpy(np.ascontiguousarray(_read_rows(uri, "label", rank, world)[0])).long()


class RowStream:
    """This worker's rows, streamed through a shuffle buffer of `capacity` rows kept as stored (uint8
    for images): a batch draws distinct slots of the buffer uniformly, and each drawn slot is refilled
    with the next row of the stream. The stream visits this worker's row groups (shards dealt round-robin as in
    `read_part`; every world-th row when there are fewer shards than workers) in a new seeded order on
    every pass, reading 1024 rows at a time. Memory: the buffer and one read, whatever the dataset's
    size."""

    def __init__(self, uri: str, rank: int, world: int, capacity: int, generator: torch.Generator):
        self.manifest = read_manifest(uri)
        self.generator = generator
        self.fs, self.base = storage.filesystem(uri)
        files = [f["file"] for f in self.manifest["files"]]
        self.by_shard = len(files) >= world
        self.rank, self.world = rank, world
        self.units = []  # (file, row group, index of its first row in the dataset)
        offset = 0
        for entry in self.manifest["files"]:
            with self.fs.open_input_file(self._path(entry["file"])) as f:
                meta = pq.ParquetFile(f).metadata
            if not self.by_shard or files.index(entry["file"]) % world == rank:
                for g in range(meta.num_row_groups):
                    self.units.append((entry["file"], g, offset))
                    offset += meta.row_group(g).num_rows
            else:
                offset += entry["rows"]
        self.blocks, self.block = self._stream(), np.empty((0, 0))
        self.buffer = self.take(capacity)

    def _path(self, file: str) -> str:
        return f"{self.base.rstrip('/')}/{file}"

    def _stream(self):
        """Blocks of up to 1024 rows, pass after pass over this worker's row groups in a new order."""
        while True:
            order = torch.randperm(len(self.units), generator=self.generator).tolist()
            for i in order:
                file, group, first = self.units[i]
                with self.fs.open_input_file(self._path(file)) as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, row_groups=[group], columns=["x"]):
                        rows = batch.column(0).values.to_numpy(zero_copy_only=False).reshape(len(batch), -1)
                        if not self.by_shard:
                            index = first + np.arange(len(rows))
                            rows = rows[index % self.world == self.rank]
                            first += len(batch)
                        if len(rows):
                            yield rows

    def take(self, k: int) -> np.ndarray:
        """The next k rows of the stream."""
        parts = []
        while k > 0:
            if not len(self.block):
                self.block = next(self.blocks)
            parts.append(self.block[:k])
            self.block, k = self.block[k:], k - len(parts[-1])
        return np.concatenate(parts)

    def batch(self, n: int) -> torch.Tensor:
        """n rows, drawn from distinct slots (at most `capacity` at a time), so that every row that enters
        the buffer leaves it in exactly one batch: each pass over the stream yields every row once."""
        out = []
        while n > 0:
            slots = torch.randperm(len(self.buffer), generator=self.generator)[:n].numpy()
            out.append(self.buffer[slots])
            self.buffer[slots] = self.take(len(slots))
            n -= len(slots)
        return decode(np.concatenate(out), self.manifest)


class DataSource:
    """Random batches from one worker's part of the Parquet shards, or exact draws of a toy target. A
    part of at most `buffer_rows` rows is held in memory as stored (uint8 for images) and sampled
    uniformly; a larger one is streamed (RowStream), so memory does not grow with the dataset."""

    def __init__(self, target: str | None, path: str | None, rank: int, world: int, seed: int,
                 buffer_rows: int = 65536, target_options: dict | None = None):
        self.generator = torch.Generator().manual_seed(seed)
        self.target = self.rows = self.stream = None
        if target is not None:
            self.target = make_target(target, target_options)
            self.shape: tuple[int, ...] = (self.target.dim,)
            return
        self.manifest = read_manifest(path)
        self.shape = tuple(self.manifest["shape"])
        files = self.manifest["files"]
        mine = sum(f["rows"] for f in files[rank::world]) if len(files) >= world else self.manifest["rows"] // world
        if mine <= buffer_rows:
            self.rows = _read_rows(path, "x", rank, world)[0]
        else:
            self.stream = RowStream(path, rank, world, buffer_rows, self.generator)

    def batch(self, n: int) -> torch.Tensor:
        if self.target is not None:
            return self.target.sample(n, self.generator).float()
        if self.stream is not None:
            return self.stream.batch(n)
        return decode(self.rows[torch.randint(len(self.rows), (n,), generator=self.generator).numpy()], self.manifest)
