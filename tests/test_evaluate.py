"""`fmm evaluate`: the protocol on exact ground truth, bad input, and a trained run's MLflow record."""

import copy
import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from fmm.evaluation.protocol import Row, Scorer, speedup
from fmm.jobs.evaluate import evaluate, parse_steps
from fmm.groundtruth import ExactVelocity, make_target, reference_flow_map
from fmm.interpolants import Interpolant
from fmm.sampling import solve_ode

LINEAR = Interpolant("linear")

F64 = torch.float64


@pytest.mark.parametrize("text", ["0,1,2", "1,-2", "1,2.5", "a"])
def test_bad_step_lists_are_refused(text):
    with pytest.raises(ValueError, match="--steps takes positive integers"):
        parse_steps(text)


def test_metrics_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match=r"metric\(s\) \['fid'\] do not apply to 2-D vectors"):
        Scorer((2,), torch.zeros(10, 2), wanted=["fid"])


@pytest.fixture(scope="module")
def flower_protocol():
    interp = Interpolant("linear")
    target = make_target("flower")
    teacher = ExactVelocity(target, interp)
    noise = torch.randn(1500, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    reference = target.sample(1500, torch.Generator().manual_seed(1))
    ref_map = reference_flow_map(teacher, 0.0, 1.0, noise)
    return teacher, noise, Scorer((2,), reference, ref_map), target


def test_the_reference_map_scores_zero_error_and_exact_sample_quality(flower_protocol):
    teacher, noise, scorer, target = flower_protocol
    scores = scorer(scorer.reference_map)
    assert scores["rmse_vs_ode"] < 1e-12
    # Exact draws of the same size spread the sampling floor; the transported noise must sit inside it.
    floors = [scorer(target.sample(1500, torch.Generator().manual_seed(2 + k))) for k in range(5)]
    for key in ("sw2", "energy", "mmd"):
        assert scores[key] <= 1.25 * max(f[key] for f in floors), (key, scores[key], [f[key] for f in floors])


def test_euler_on_the_exact_velocity_improves_monotonically_with_steps(flower_protocol):
    teacher, noise, scorer, _ = flower_protocol
    scores = [scorer(solve_ode(teacher, noise, "euler", steps=n).samples) for n in (1, 2, 4, 8, 16, 32)]
    for key in ("sw2", "energy", "rmse_vs_ode"):
        values = [s[key] for s in scores]
        assert all(a > b for a, b in zip(values, values[1:])), (key, values)


def test_speedup_finds_the_first_nfe_within_ten_percent():
    rows = [Row("euler", n, n, 0.001 * n, {"sw2": v}) for n, v in ((1, 3.0), (2, 1.0), (4, 0.5), (8, 0.2), (16, 0.1))]
    rows += [Row("rk4-le", k, n, 0.001 * n, {"sw2": v}) for k, n, v in ((1, 1, 3.0), (2, 5, 0.105), (4, 13, 0.1))]
    rows += [Row("flow_map", n, n, 0.002 * n, {"sw2": v}) for n, v in ((1, 0.12), (2, 0.108), (4, 0.105))]
    out = speedup(rows, "sw2")
    assert out["rk4-le"]["nfe"] == 5 and out["euler"]["nfe"] == 16 and out["flow_map"]["nfe"] == 2
    assert out["summary"]["teacher_solver"] == "rk4-le" and out["summary"]["nfe_ratio"] == 2.5


@pytest.mark.slow
def test_evaluating_a_trained_run_logs_the_curve_figure_and_table(tmp_path, ray_cluster, gpu_node, capsys,
                                                                   monkeypatch):
    """A run trained in this process (the loop through LocalSession, which leaves what `fmm train` leaves:
    the run's record, checkpoints and MLflow run), then evaluated at three sets; then again as a Ray
    task asking for a GPU (`fmm evaluate --resources GPU=1`)."""
    from fmm import cli
    from fmm.experiment.schema import load_experiment
    from fmm.jobs.train import open_run
    from fmm.worker.loop import run_loop
    from fmm.worker.sessions import LocalSession
    from fmm.worker.trainer import loop_config

    from support.experiments import TRAIN_BASE as BASE

    raw = copy.deepcopy(BASE)
    raw.update(name="evaluated", storage={"path": str(tmp_path / "runs")},
               tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tests"})
    exp = load_experiment(raw=raw)
    record = open_run(exp)
    config = loop_config(exp, record)
    run_dir = config["run_dir"]
    run_loop(config, LocalSession(run_dir))
    report = evaluate(run_dir, [1, 2, 4, 8], samples=400, teacher_max_nfe=8, log=lambda *_: None, sets=3)
    assert {r.steps for r in report.rows if r.method == "flow_map"} == {1, 2, 4, 8}
    client = MlflowClient(record.tracking_uri)
    history = client.get_metric_history(record.mlflow_run_id, "sw2")
    assert sorted(m.step for m in history) == [1, 2, 4, 8]
    # Three evaluation sets: the mean at step = NFE, its interval and each set's score beside it.
    run = client.get_run(record.mlflow_run_id)
    assert run.data.tags["eval_sets"] == "3"
    row = next(r for r in report.rows if r.method == "flow_map" and r.steps == 1)
    logged = {k: client.get_metric_history(record.mlflow_run_id, k)[0].value
              for k in ("sw2", "sw2/low", "sw2/high", "sw2/set0", "sw2/set1", "sw2/set2")}
    assert logged["sw2"] == pytest.approx(sum(row.sets["sw2"][0]) / 3) and logged["sw2/set2"] == row.sets["sw2"][0][2]
    assert logged["sw2/low"] < logged["sw2"] < logged["sw2/high"]
    assert "teacher/rk4-le/sw2/set2" in run.data.metrics and "floor/sw2/set1" in run.data.metrics
    assert len(client.get_metric_history(record.mlflow_run_id, "teacher/rk4-le/sw2")) >= 1
    assert "seconds_per_sample" in client.get_run(record.mlflow_run_id).data.metrics
    artifacts = {a.path for a in client.list_artifacts(record.mlflow_run_id, "evaluation")}
    assert artifacts == {"evaluation/evaluation.csv", "evaluation/evaluation.json", "evaluation/sw2_vs_steps.png",
                         "evaluation/samples.png"}
    assert run.data.tags["eval_worker"] == "driver"

    # As a Ray task that asks for a GPU: on the one node that declares one (not the head), on its CPU
    # there (no CUDA here), logged into the run from there; a request no node holds is refused first.
    address = ray_cluster.get_runtime_context().gcs_address
    capsys.readouterr()
    assert cli.main(["evaluate", run_dir, "--steps", "1,2", "--samples", "200", "--teacher-max-nfe", "4",
                     "--resources", "GPU=8", "--address", address]) == 2
    assert "evaluation.resources {'GPU': 8.0}: no node of this cluster holds that much" in capsys.readouterr().err
    assert cli.main(["evaluate", os.path.relpath(run_dir), "--steps", "1,2", "--samples", "200", "--teacher-max-nfe",
                     "4", "--resources", "GPU=1", "--address", address]) == 0
    assert "flow_map" in capsys.readouterr().out  # the table, printed here
    tags = client.get_run(record.mlflow_run_id).data.tags
    assert (tags["eval_worker"], tags["eval_device"], tags["eval_node"], tags["eval_samples"]) == \
        ("task", "cpu", gpu_node, "200")

    # Named by its MLflow run (runs:/<id>), the run is logged into too, and says so.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", record.tracking_uri)
    assert cli.main(["evaluate", f"runs:/{record.mlflow_run_id}", "--steps", "1", "--samples", "100",
                     "--no-teacher", "--metrics", "sw2"]) == 0
    assert f"logged into MLflow run {record.mlflow_run_id}" in capsys.readouterr().out
    tags = client.get_run(record.mlflow_run_id).data.tags
    assert (tags["eval_worker"], tags["eval_samples"]) == ("driver", "100")


def test_evaluation_sets_are_independent_draws_and_set_zero_is_the_one_set_protocol(tmp_path):
    """Toy target: each set its own noise, exact reference and floor; set 0 is what sets: 1 builds. Dataset:
    disjoint reference subsets, and more than the data holds is refused naming evaluation.sets."""
    from fmm.evaluation.protocol import build_protocol
    from fmm.experiment.data import prepare
    from fmm.experiment.schema import load_experiment

    from support.experiments import TRAIN_BASE

    exp = load_experiment(raw=copy.deepcopy(TRAIN_BASE))
    one = build_protocol(exp, LINEAR, (2,), 300, metrics_wanted=["sw2"], log=lambda *_: None)
    three = build_protocol(exp, LINEAR, (2,), 300, metrics_wanted=["sw2"], log=lambda *_: None, sets=3)
    assert torch.equal(one.noise, three.sets[0].noise) and torch.equal(one.scorer.reference, three.sets[0].scorer.reference)
    assert one.floors == three.sets[0].floors and 0 < one.floors["sw2"] < 0.5
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert not torch.equal(three.sets[a].noise, three.sets[b].noise)
        assert not torch.equal(three.sets[a].scorer.reference, three.sets[b].scorer.reference)
    prepare("digits", str(tmp_path / "digits"), shards=1)
    images = load_experiment(raw={**copy.deepcopy(TRAIN_BASE), "data": {"path": str(tmp_path / "digits")},
                                  "objective": {"name": "lsd"}, "teacher": None,
                                  "network": {"name": "unet", "in_channels": 1, "image_size": 8, "channels": 16,
                                              "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}})
    protocol = build_protocol(images, LINEAR, (1, 8, 8), 500, metrics_wanted=["fd_classifier"], sets=3)
    flat = [ev.scorer.reference.reshape(500, -1) for ev in protocol.sets]
    for a, b in ((0, 1), (1, 2), (0, 2)):  # digits has no two identical images, so equal rows mean shared images
        assert not (torch.cdist(flat[a], flat[b]) == 0).any()
    with pytest.raises(ValueError, match=r"evaluation.sets: 4 disjoint reference subsets .* allowed are sets <= 3"):
        build_protocol(images, LINEAR, (1, 8, 8), 500, metrics_wanted=["fd_classifier"], sets=4)


def test_image_scorer_uses_the_classifier_distance_and_refuses_vector_metrics(tmp_path):
    from fmm.experiment.data import prepare, read_labels, read_part

    prepare("digits", str(tmp_path / "digits"), shards=1)
    x, y = read_part(str(tmp_path / "digits")), read_labels(str(tmp_path / "digits"))
    images = x[0]
    scorer = Scorer((1, 8, 8), images[:500], wanted=["fd_classifier"], labelled=(images, y, "digits-test"))
    real = scorer(images[500:1000])["fd_classifier"]
    noise = scorer(torch.rand(500, 1, 8, 8) * 2 - 1)["fd_classifier"]
    assert 0 < real < noise / 5
    with pytest.raises(ValueError, match=r"metric\(s\) \['sw2'\] do not apply to images"):
        Scorer((1, 8, 8), images[:10], wanted=["sw2"])


def test_fmm_evaluate_refuses_a_device_this_machine_lacks_before_reading_anything(tmp_path, capsys):
    from fmm import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["evaluate", str(tmp_path / "no-run"), "--device", "cuda", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err == "fmm evaluate: error: device 'cuda': this machine has no CUDA device; use cpu.\n", err


@pytest.mark.parametrize("argv,message", [
    (["--resources", "GPU"], "--resources takes NAME=AMOUNT pairs separated by commas"),
    (["--resources", "GPU=0"], "each amount positive"),
    (["--resources", "GPU=1,CPU=many"], "got 'CPU=many'"),
    (["--address", "127.0.0.1:6379"], "--address is where the evaluation task of --resources runs"),
])
def test_fmm_evaluate_refuses_bad_resources_before_reading_anything(tmp_path, capsys, argv, message):
    from fmm import cli

    assert cli.main(["evaluate", str(tmp_path / "no-run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmm evaluate: error: ") and message in err and err.count("\n") == 1, err
