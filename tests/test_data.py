"""Datasets as Parquet shards: the readers of each original format, the shard layout, per-worker parts."""

import gzip
import os
import re
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fmm import cli
from fmm.experiment.data import (DEFAULT_SOURCES, DataSource, Samples, iter_rows, load, prepare, read_labels,
                                 read_manifest, read_part, write_shards)
from fmm.experiment.schema import load_experiment


def test_toy_target_round_trips_through_shards(tmp_path):
    out = str(tmp_path / "flower")
    manifest = prepare("flower", out, shards=3, samples=1000, seed=1)
    assert manifest["rows"] == 1000 and manifest["shape"] == [2] and len(manifest["files"]) == 3
    x, _ = read_part(out)
    torch.testing.assert_close(x, torch.from_numpy(load("flower", samples=1000, seed=1).x))
    table = pq.read_table(os.path.join(out, "part-00000.parquet"))
    assert table.schema.field("x").type.list_size == 2


@pytest.mark.parametrize("shards,world", [(4, 2), (3, 2), (1, 3)])
def test_each_worker_reads_its_own_disjoint_part(tmp_path, shards, world):
    out = str(tmp_path / "flower")
    prepare("flower", out, shards=shards, samples=999)
    parts = [read_part(out, rank, world)[0] for rank in range(world)]
    assert sum(len(p) for p in parts) == 999
    rows = {tuple(r.tolist()) for p in parts for r in p}
    assert len(rows) == 999  # disjoint and complete


def test_digits_are_images_in_minus_one_to_one(tmp_path):
    out = str(tmp_path / "digits")
    prepare("digits", out, shards=2)
    x, manifest = read_part(out)
    assert manifest["shape"] == [1, 8, 8] and manifest["encoding"] == "uint8_image" and x.shape == (1797, 1, 8, 8)
    assert x.min() == -1 and x.max() == 1


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader_on_files_in_the_idx_format(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(10))
    data = load("fashion_mnist", str(tmp_path))
    assert data.shape == (1, 28, 28) and np.array_equal(data.x[:, 0], images) and list(data.labels) == list(range(10))


@pytest.mark.skipif(not os.path.isdir(DEFAULT_SOURCES["fashion_mnist"]),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_from_the_debian_package():
    data = load("fashion_mnist")
    assert data.x.shape == (60000, 1, 28, 28) and sorted(set(data.labels.tolist())) == list(range(10))


def test_cifar10_pickle_reader(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"labels": [i % 10] * 4}
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f)
    data = load("cifar10", str(tmp_path))
    assert data.x.shape == (20, 3, 32, 32) and data.labels.tolist()[:4] == [1, 1, 1, 1]


def test_imagenet32_npz_reader_counts_labels_from_zero(tmp_path):
    rng = np.random.default_rng(2)
    for i in (1, 2, 10):
        np.savez(tmp_path / f"train_data_batch_{i}.npz", data=rng.integers(0, 256, (3, 3072)).astype(np.uint8),
                 labels=np.array([1, 2, 1000]))
    data = load("imagenet32", str(tmp_path))
    assert data.x.shape == (9, 3, 32, 32) and data.labels.tolist()[:3] == [0, 1, 999]


@pytest.mark.parametrize("name,source,match", [
    ("cifar10", "/nowhere/cifar", r"dataset 'cifar10': the source folder not found at '/nowhere/cifar'"),
    ("imagenet32", None, r"dataset 'imagenet32': the source folder not found at 'None'"),
    ("mnist", None, r"unknown dataset 'mnist'"),
])
def test_missing_sources_name_the_path_to_fill(name, source, match):
    with pytest.raises(ValueError, match=match):
        load(name, source)


def test_reading_an_unprepared_folder_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ValueError, match=r"fmm data prepare DATASET --out"):
        read_manifest(str(tmp_path))


def test_data_prepare_command(tmp_path):
    out = tmp_path / "checker"
    result = subprocess.run([sys.executable, "-m", "fmm.cli", "data", "prepare", "checkerboard", "--out", str(out),
                             "--samples", "500", "--shards", "2"], capture_output=True, text=True)
    assert result.returncode == 0 and "wrote 500 samples of shape [2] (float32) in 2 Parquet shards" in result.stdout
    # how far it has got, on standard error: the reading, then a line per shard
    assert "[fmm] reading checkerboard" in result.stderr and "read 500 rows of shape [2]" in result.stderr
    assert "part-00001.parquet: 2/2 shards, 500/500 rows (100%)" in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "-m", "fmm.cli", "data", "prepare", "cifar10", "--out", str(out),
                             "--source", str(tmp_path / "none")], capture_output=True, text=True)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_streamed_rows_are_the_shards_rows_in_order_in_blocks_of_the_asked_size(tmp_path):
    prepare("digits", str(tmp_path / "d"), shards=3)
    whole = read_part(str(tmp_path / "d"))[0]
    blocks = list(iter_rows(str(tmp_path / "d"), rows=500))
    assert [len(b) for b in blocks] == [500, 500, 500, 297] and blocks[0].dtype == np.uint8
    assert torch.equal(torch.from_numpy(np.concatenate(blocks)).float().reshape(-1, 1, 8, 8) / 127.5 - 1, whole)


def test_a_relative_data_path_is_made_absolute_for_workers_that_run_elsewhere(tmp_path, monkeypatch):
    """Ray Train workers and Tune trials run in Ray's folders: `fmm train` from the folder that holds
    ./data/digits must hand them the absolute path (as the digits example in the README does)."""
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(raw={"name": "rel", "data": {"path": "./data/digits"},
                               "network": {"name": "unet", "in_channels": 1, "image_size": 8, "channels": 16,
                                           "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []},
                               "objective": {"name": "lsd"}})
    assert exp.data.path == str(tmp_path / "data" / "digits")
    exp = load_experiment(raw={"name": "s3", "data": {"path": "s3://bucket/digits"},
                               "network": {"name": "unet", "in_channels": 1, "image_size": 8, "channels": 16,
                                           "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []},
                               "objective": {"name": "lsd"}})
    assert exp.data.path == "s3://bucket/digits"


# -- your own data: fmm data prepare --from ------------------------------------------------------------

def prepare_from(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["data", "prepare", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_your_own_arrays_image_folders_and_parquet_tables_become_the_same_shards(tmp_path, capsys):
    from PIL import Image

    digits = load("digits")
    x, y = digits.x[:90], digits.labels[:90]
    np.savez(tmp_path / "nhwc.npz", images=x.transpose(0, 2, 3, 1), labels=y)          # uint8, channels last
    for i, (image, label) in enumerate(zip(x, y)):                                        # class sub-folders
        os.makedirs(tmp_path / "folder" / f"c{label}", exist_ok=True)
        Image.fromarray(image[0], mode="L").save(tmp_path / "folder" / f"c{label}" / f"{i:03d}.png")
    pq.write_table(pa.table({"pixels": pa.array(list(x.reshape(90, -1))), "digit": pa.array(y)}),
                   tmp_path / "table.parquet")
    np.save(tmp_path / "points.npy", np.random.default_rng(0).normal(size=(300, 3)))          # float64 vectors
    runs = {"nhwc": ["--from", tmp_path / "nhwc.npz"], "folder": ["--from", tmp_path / "folder"],
            "table": ["--from", tmp_path / "table.parquet", "--column", "pixels", "--label-column", "digit",
                      "--shape", "1,8,8"]}
    for name, args in runs.items():
        code, out, err = prepare_from(capsys, *args, "--out", tmp_path / name, "--shards", 3)
        assert code == 0, err
        images, manifest = read_part(str(tmp_path / name))
        assert manifest["shape"] == [1, 8, 8] and manifest["encoding"] == "uint8_image" and manifest["rows"] == 90
        labels = read_labels(str(tmp_path / name))
        if name == "folder":  # files in sorted order: class by class
            assert manifest["classes"] == [f"c{k}" for k in range(10)] and labels.tolist() == sorted(labels.tolist())
            order = np.lexsort((np.arange(90), y))
            assert torch.equal(images, torch.from_numpy(x[order]).float() / 127.5 - 1)
            assert [manifest["classes"][k] for k in labels] == [f"c{k}" for k in y[order]]
        else:
            assert torch.equal(images, torch.from_numpy(x).float() / 127.5 - 1) and labels.tolist() == y.tolist()
        assert "wrote 90 samples of shape [1, 8, 8] (uint8_image" in out
        assert "90 rows of shape [1, 8, 8], checked" in err and "3/3 shards, 90/90 rows (100%)" in err
    code, out, err = prepare_from(capsys, "--from", tmp_path / "points.npy", "--out", tmp_path / "points")
    assert code == 0, err
    points, manifest = read_part(str(tmp_path / "points"))
    assert manifest["encoding"] == "float32" and manifest["shape"] == [3] and manifest["dataset"] == "points"
    assert torch.allclose(points, torch.from_numpy(np.load(tmp_path / "points.npy")).float())


def test_a_bad_source_is_refused_in_one_paragraph_naming_the_first_bad_item_and_nothing_is_written(tmp_path, capsys):
    from PIL import Image

    x = load("digits").x[:10]
    nan = x.astype(np.float32) / 127.5 - 1
    nan[4, 0, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 8, 8), np.uint8))
    np.save(tmp_path / "bools.npy", np.zeros((5, 2), bool))
    os.makedirs(tmp_path / "mixed")
    for i, size in enumerate((8, 8, 9)):
        Image.fromarray(np.zeros((size, size), np.uint8), mode="L").save(tmp_path / "mixed" / f"{i}.png")
    pq.write_table(pa.table({"v": pa.array([[1.0, 2.0], [3.0], [4.0, 5.0]])}), tmp_path / "ragged.parquet")
    cases = [
        (["--from", "nan.npy"], r"'.*nan.npy': image 4 holds NaN or infinity\."),
        (["--from", "empty.npy"], r"'.*empty.npy' holds no images\."),
        (["--from", "bools.npy"], r"'.*bools.npy': samples of dtype bool; allowed are uint8"),
        (["--from", "mixed"], r"'.*mixed/2.png' is 9 x 9 but '.*mixed/0.png' is 8 x 8"),
        (["--from", "ragged.parquet", "--column", "v"], r"'.*ragged.parquet': row 1 of column 'v' holds 1 values "
                                                         r"where the first holds 2"),
        (["--from", "ragged.parquet"], r"is a Parquet table: name the column that holds the samples \(--column\)"),
        (["--from", "ragged.parquet", "--column", "w"], r"has no column 'w'; its columns are \['v'\]"),
        (["--from", "nan.npy", "--shape", "2,2"], r"--shape takes D \(vectors\) or C,H,W \(images\)"),
        (["digits", "--from", "nan.npy"], r"takes a DATASET to read from its original files, or --from SOURCE"),
    ]
    for args, pattern in cases:
        args = [str(tmp_path / a) if a.endswith((".npy", ".parquet")) or a == "mixed" else a for a in args]
        code, out, err = prepare_from(capsys, *args, "--out", tmp_path / "out")
        assert code == 2 and err.startswith("fmm data: error: ") and err.count("\n") == 1, (args, err)
        assert re.search(pattern, err), (pattern, err)
        assert not (tmp_path / "out").exists(), args  # nothing half-written


# -- streaming: a worker's memory does not grow with the dataset ---------------------------------------

def random_images(rows: int, seed: int = 0) -> Samples:
    x = np.random.default_rng(seed).integers(0, 256, size=(rows, 1, 16, 16), dtype=np.uint8)
    return Samples(x, None, (1, 16, 16), "uint8_image")


def test_a_streamed_part_draws_every_row_of_its_own_and_no_other_workers(tmp_path):
    data = random_images(3000)
    for shards, world in ((4, 2), (1, 2)):  # shards dealt to workers; fewer shards than workers: every world-th row
        uri = str(tmp_path / f"s{shards}")
        write_shards(data, uri, shards, "random")
        seen = []
        for rank in range(world):
            source = DataSource(None, uri, rank, world, seed=rank, buffer_rows=256)
            assert source.stream is not None and len(source.stream.buffer) == 256
            drawn = torch.cat([source.batch(500) for _ in range(40)])
            assert drawn.shape == (20000, 1, 16, 16) and drawn.min() >= -1 and drawn.max() <= 1
            rows = {tuple(r) for r in ((drawn.reshape(len(drawn), -1) + 1) * 127.5).round().to(torch.uint8).numpy()}
            seen.append(rows)
        whole = {tuple(r) for r in data.x.reshape(3000, -1)}
        assert seen[0] | seen[1] == whole and not seen[0] & seen[1], (shards, world)  # all rows, each worker its own
        in_memory = DataSource(None, uri, 0, world, seed=0)  # a part that fits is held as stored
        assert in_memory.stream is None and in_memory.rows.dtype == np.uint8


PEAK_RSS = """
import sys
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024
from fmm.experiment.data import DataSource, read_part
uri, mode = sys.argv[1], sys.argv[2]
if mode == "float32":   # the whole part decoded in memory, as workers read data before streaming
    x = read_part(uri)[0]
else:
    source = DataSource(None, uri, 0, 1, seed=0, buffer_rows=4096)
    for _ in range(50):
        source.batch(256)
print(peak_mb())
"""


def peak_rss_mb(uri: str, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, uri, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.slow
def test_a_worker_on_a_dataset_ten_times_larger_holds_no_more_memory(tmp_path):
    """20,000 against 200,000 images of 1 x 16 x 16 (5 MB and 51 MB stored; 20 MB and 205 MB decoded to
    float32): a worker streams either through a buffer of 4096 rows, and its peak RSS differs by less
    than 25 MB (measured: 371 and 367 MB), where holding the part decoded takes 478 MB more."""
    write_shards(random_images(20_000), str(tmp_path / "small"), 4, "small")
    write_shards(random_images(200_000, 1), str(tmp_path / "large"), 4, "large")
    small, large = peak_rss_mb(str(tmp_path / "small"), "stream"), peak_rss_mb(str(tmp_path / "large"), "stream")
    decoded = peak_rss_mb(str(tmp_path / "large"), "float32") - peak_rss_mb(str(tmp_path / "small"), "float32")
    print(f"peak RSS streaming: {small} MB (20k rows), {large} MB (200k rows); decoded in memory: +{decoded} MB")
    assert large - small < 25 and decoded > 150, (small, large, decoded)
