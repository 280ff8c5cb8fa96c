"""Image sets for FID: any image source fmm reads (fmm.experiment.sources: an array file, a folder
of images, a Parquet table, a prepared dataset), or precomputed statistics (an `.npz` holding `mu`
and `sigma`, fmm.evaluation.fid.Statistics), read in batches on [-1, 1]."""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fmm.evaluation.fid import Statistics
from fmm.experiment.sources import Source, open_source
from fmm.infra import storage


@dataclass
class ImageSet:
    """`count` images of `shape` (C, H, W) at `source`, read `batches(n)` at a time on [-1, 1];
    `check()` reads the set once for what would stop it half-way (values, sizes) before any compute."""

    samples: Source

    @property
    def source(self) -> str:
        return self.samples.path

    @property
    def shape(self) -> tuple[int, ...]:
        return self.samples.shape

    @property
    def count(self) -> int:
        return self.samples.count

    def check(self) -> None:
        self.samples.check()

    def batches(self, n: int = 64) -> Iterator[torch.Tensor]:
        for x, _ in self.samples.blocks(n):
            x = torch.from_numpy(x)
            yield x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x


def open_set(path: str) -> ImageSet | Statistics:
    """The image set (or the statistics) at `path`; a ValueError saying what is accepted otherwise."""
    if path.endswith(".npz"):
        if not storage.is_remote(path) and not os.path.isfile(path):
            raise ValueError(f"no file at {path!r}.")
        local = not storage.is_remote(path)
        data = None if local else storage.read_bytes(path)
        try:  # an .npz opens lazily: listing its arrays reads none of them
            with np.load(path if local else io.BytesIO(data)) as stored:
                statistics = "mu" in stored.files and "sigma" in stored.files
        except (OSError, ValueError, zipfile.BadZipFile):
            statistics = False  # open_source says what is wrong with it
        if statistics:
            return Statistics.load(path, data)
    samples = open_source(path)
    if not samples.is_image:
        raise ValueError(f"{path!r} holds vectors of shape {list(samples.shape)}; FID needs images.")
    return ImageSet(samples)
