"""Image sets for FID, read in batches from what users have: an array file, a folder of images, a
prepared Parquet dataset, or precomputed statistics.

- `.npy` / `.npz` (local or s3://): N x C x H x W or N x H x W x C (C in {1, 3}), or N x H x W
  (grey); uint8 on [0, 255], or float on fmm's sample space [-1, 1] (what `fmm sample` writes). An
  `.npz` holding `mu` and `sigma` is statistics (fmm.evaluation.fid.Statistics); otherwise its
  array is `images`, `x`, `arr_0` or its only one.
- a folder of .png/.jpg/.jpeg/.bmp/.webp files, searched recursively, in sorted order; grey when the
  first image is, RGB otherwise; every image of one size.
- a prepared dataset (a folder or URI holding `_manifest.json`; `fmm data prepare`): every row.

Each set is checked as it is read: an empty set, an unsupported dtype or layout, NaN or infinity,
float images on [0, 255], or images of mixed sizes are refused with the file and the first bad item.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from fmm.evaluation.fid import Statistics
from fmm.experiment.data import MANIFEST, iter_rows, read_manifest
from fmm.infra import storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ARRAY_KEYS = ("images", "x", "arr_0")


@dataclass
class ImageSet:
    """`count` images of `shape` (C, H, W) at `source`, read `batches(n)` at a time in [-1, 1];
    `check()` reads the set once for what would stop it half-way (values, sizes) before any compute."""

    source: str
    shape: tuple[int, int, int]
    count: int
    read: Callable[[int], Iterator[torch.Tensor]]
    check: Callable[[], None] = lambda: None

    def batches(self, n: int = 64) -> Iterator[torch.Tensor]:
        return self.read(n)


def _layout(array: np.ndarray, source: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The array as N x C x H x W (a view where possible) and its image shape."""
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{source!r}: an image array is N x C x H x W, N x H x W x C or N x H x W; got shape "
                         f"{list(array.shape)}.")
    if array.shape[1] not in (1, 3):
        if array.shape[3] not in (1, 3):
            raise ValueError(f"{source!r}: images of shape {list(array.shape[1:])} have neither 1 nor 3 channels "
                             f"first (NCHW) or last (NHWC).")
        array = array.transpose(0, 3, 1, 2)
    if len(array) == 0:
        raise ValueError(f"{source!r} holds no images.")
    return array, tuple(int(v) for v in array.shape[1:])


def to_model_space(block: np.ndarray, source: str, first: int) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images as float32 on [-1, 1]; NaN, infinity, float images on
    [0, 255] and other dtypes are refused naming the first bad item (`first` is the block's index)."""
    if block.dtype == np.uint8:
        return torch.from_numpy(np.array(block)).float().div_(127.5).sub_(1.0)
    if not np.issubdtype(block.dtype, np.floating):
        raise ValueError(f"{source!r}: images of dtype {block.dtype}; FID reads uint8 on [0, 255] or float on "
                         f"[-1, 1].")
    x = torch.from_numpy(np.array(block, dtype=np.float32))
    finite = torch.isfinite(x).flatten(1).all(1)
    if not finite.all():
        bad = first + int((~finite).nonzero()[0])
        raise ValueError(f"{source!r}: image {bad} holds NaN or infinity.")
    peak = x.flatten(1).abs().amax(1)
    if (peak > 1.5).any():
        bad = first + int((peak > 1.5).nonzero()[0])
        raise ValueError(f"{source!r}: float images are read on [-1, 1] (fmm's sample space) but image {bad} reaches "
                         f"{float(peak[bad - first]):.4g}; store images on [0, 255] as uint8.")
    return x


def _array_set(array: np.ndarray, source: str) -> ImageSet:
    array, shape = _layout(array, source)
    to_model_space(array[:0], source, 0)  # the dtype check, before anything is computed

    def read(n: int):
        for start in range(0, len(array), n):
            yield to_model_space(array[start:start + n], source, start)

    def check():
        for _ in read(4096):
            pass
    return ImageSet(source, shape, len(array), read, check)


def _array_file(source: str) -> ImageSet | Statistics:
    local = not storage.is_remote(source)
    data = None if local else storage.read_bytes(source)
    if source.endswith(".npy"):
        try:
            array = np.load(source, mmap_mode="r") if local else np.load(io.BytesIO(data))
        except (OSError, ValueError) as err:
            raise ValueError(f"{source!r} cannot be read as .npy: {err}") from None
        return _array_set(array, source)
    try:
        stored = np.load(source if local else io.BytesIO(data))
    except (OSError, ValueError) as err:
        raise ValueError(f"{source!r} cannot be read as .npz: {err}") from None
    if "mu" in stored.files and "sigma" in stored.files:
        return Statistics.load(source, data if data is not None else storage.read_bytes(source))
    keys = [k for k in ARRAY_KEYS if k in stored.files] or (stored.files if len(stored.files) == 1 else [])
    if not keys:
        raise ValueError(f"{source!r} holds arrays {stored.files}: name the images one of {list(ARRAY_KEYS)}, or "
                         f"store mu and sigma for statistics.")
    return _array_set(stored[keys[0]], source)


def _image_folder(folder: str) -> ImageSet:
    from PIL import Image  # Pillow comes with matplotlib; only folders of images need it

    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"{folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no {MANIFEST}.")
    with Image.open(files[0]) as first:
        mode = "L" if first.mode in ("1", "L", "I", "I;16", "F") else "RGB"
        size = first.size
    shape = (1 if mode == "L" else 3, size[1], size[0])

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
            yield to_model_space(np.stack(block), folder, start)

    def check():  # the headers only: every file an image of the first one's size
        for path in files:
            opened(path).close()
    return ImageSet(folder, shape, len(files), read, check)


def _dataset(uri: str) -> ImageSet:
    manifest = read_manifest(uri)
    shape = tuple(manifest["shape"])
    if len(shape) != 3:
        raise ValueError(f"the dataset at {uri!r} holds samples of shape {list(shape)}; FID needs images.")

    def read(n: int):
        start = 0
        for block in iter_rows(uri, n):
            yield to_model_space(block.reshape(-1, *shape), uri, start)
            start += len(block)
    return ImageSet(uri, shape, int(manifest["rows"]), read)


def open_set(source: str) -> ImageSet | Statistics:
    """The image set (or the statistics) at `source`; a ValueError saying what is accepted otherwise."""
    if source.endswith((".npy", ".npz")):
        if not storage.is_remote(source) and not os.path.isfile(source):
            raise ValueError(f"no file at {source!r}.")
        return _array_file(source)
    if storage.exists(storage.join(source, MANIFEST)):
        return _dataset(source)
    if not storage.is_remote(source) and os.path.isdir(source):
        return _image_folder(source)
    raise ValueError(f"{source!r} is no image set: give a .npy or .npz file (images, or statistics with mu and "
                     f"sigma), a folder of images ({', '.join(IMAGE_SUFFIXES)}), or a prepared dataset (a folder or "
                     f"URI holding {MANIFEST}).")
