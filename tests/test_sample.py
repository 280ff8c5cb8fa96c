"""`fmm sample`: deterministic given the noise, both output formats, clear errors. In-process through
`cli.main`, with one run of the installed command."""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import pyarrow.parquet as pq
import torch

from fmm.checkpoint import save_flow_map
from fmm.cli import main
from fmm.flowmap import FlowMap
from fmm.nets import make_network
from fmm.sampling import flow_map_sample


@pytest.fixture
def run(capsys):
    def sample(*args):
        try:
            code = main(["sample", *args])
        except SystemExit as exit:  # argparse's own refusals
            code = exit.code
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
    return sample


def run_installed(*args):
    return subprocess.run([sys.executable, "-m", "fmm.cli", "sample", *args], capture_output=True, text=True)


def test_same_noise_gives_the_same_samples_in_both_formats(tmp_path, run):
    torch.manual_seed(0)
    model = FlowMap(make_network("mlp", dim=2, width=16, depth=1))
    torch.nn.init.normal_(model.net.out.weight)
    ckpt = str(tmp_path / "map.pt")
    save_flow_map(ckpt, model)
    noise = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    for out, command in (("a.npy", run_installed), ("b.npy", run), ("c.parquet", run)):
        result = command(ckpt, "--steps", "4", "--noise", str(tmp_path / "noise.npy"), "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    c = np.stack(pq.read_table(tmp_path / "c.parquet").column("x").to_numpy(zero_copy_only=False))
    with torch.no_grad():
        expected = flow_map_sample(model, torch.from_numpy(noise), steps=4).samples.numpy()
    assert np.array_equal(a, b) and np.allclose(a, expected, atol=1e-6) and np.allclose(c, a)


def test_bad_sample_requests_are_clear_errors(tmp_path, run):
    model = FlowMap(make_network("mlp", dim=2, width=16, depth=1))
    ckpt = str(tmp_path / "map.pt")
    save_flow_map(ckpt, model)
    np.save(tmp_path / "noise3.npy", np.zeros((4, 3), dtype=np.float32))
    result = run(ckpt, "--steps", "2", "--noise", str(tmp_path / "noise3.npy"), "--out", str(tmp_path / "x.npy"))
    assert result.returncode == 2 and "has samples of shape [3], but the model takes [2]" in result.stderr
    result = run(ckpt, "--steps", "0", "--out", str(tmp_path / "x.npy"))
    assert result.returncode == 2 and "must be a positive integer" in result.stderr
    result = run(ckpt, "--steps", "2", "--out", str(tmp_path / "x.csv"))
    assert result.returncode == 2 and "must end in .npy or .parquet" in result.stderr
    result = run(str(tmp_path / "none.pt"), "--steps", "2", "--out", str(tmp_path / "x.npy"))
    assert result.returncode == 2 and "no flow-map checkpoint" in result.stderr


def test_a_consistency_model_is_sampled_with_its_own_sampler_unless_told_otherwise(tmp_path, run):
    from fmm.experiment.schema import load_experiment
    from fmm.interpolants import Interpolant
    from fmm.sampling import gamma_sample

    torch.manual_seed(0)
    model = FlowMap(make_network("mlp", dim=2, width=16, depth=1))
    torch.nn.init.normal_(model.net.out.weight)
    exp = load_experiment(raw={"name": "cd", "data": {"target": "flower"}, "network": model.net.config,
                               "objective": {"name": "cd"}, "teacher": {"kind": "exact", "target": "flower"}})
    ckpt = str(tmp_path / "cd.pt")
    save_flow_map(ckpt, model, extra={"config": exp.model_dump()})
    noise = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    outs = {}
    for name, extra in (("own", []), ("again", []), ("chain", ["--sampler", "flow_map"])):
        result = run(ckpt, "--steps", "3", "--noise", str(tmp_path / "noise.npy"), "--seed", "4",
                     "--out", str(tmp_path / f"{name}.npy"), *extra)
        assert result.returncode == 0, result.stderr
        outs[name] = np.load(tmp_path / f"{name}.npy")
    with torch.no_grad():
        chain = flow_map_sample(model, torch.from_numpy(noise), steps=3).samples.numpy()
        consistency = gamma_sample(model, torch.from_numpy(noise), Interpolant("linear"), gamma=1.0, steps=3,
                                   generator=torch.Generator().manual_seed(6)).samples.numpy()
    assert np.array_equal(outs["own"], outs["again"]) and np.allclose(outs["own"], consistency, atol=1e-6)
    assert np.allclose(outs["chain"], chain, atol=1e-6) and not np.allclose(outs["own"], chain)


MARK = ""


class Payload:
    """A class pickled into a checkpoint: loading it would run code from the file."""

    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


def test_a_checkpoint_that_unpickles_code_is_refused_before_any_code_runs(tmp_path, run, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "MARK", str(tmp_path / "code-ran"))
    model = FlowMap(make_network("mlp", dim=2, width=16, depth=1))
    ckpt = str(tmp_path / "map.pt")
    save_flow_map(ckpt, model, extra={"note": Payload()})
    result = run(ckpt, "--steps", "2", "--out", str(tmp_path / "x.npy"))
    assert result.returncode == 2 and "holds Python objects" in result.stderr and "weights_only=True" in result.stderr
    assert not (tmp_path / "code-ran").exists() and not (tmp_path / "x.npy").exists()
