"""A published table as a shipped study (experiments/papers/): the options it needs (a target's options,
sigma0 from the data, an MLP on raw times), the paper's numbers printed beside the study's, and the bad
input refused in one paragraph with exit 2."""

import copy
import os
import re

import pytest
import torch
import yaml

from support.experiments import ROOT, TRAIN_BASE
from fmm import cli
from fmm.experiment.schema import load_experiment
from fmm.experiment.study_schema import load_study, plan_study
from fmm.flowmap import FlowMap
from fmm.groundtruth import BoxMixture, GaussianMixture, make_target
from fmm.jobs.compare import Comparison, Curve
from fmm.nets import make_network

PAPER = os.path.join(ROOT, "experiments", "papers", "lsd_checkerboard.yaml")


def experiment(tmp_path, **sections):
    raw = copy.deepcopy(TRAIN_BASE)
    raw.update(storage={"path": str(tmp_path / "runs")}, tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"})
    raw.update(sections)
    return load_experiment(raw=raw)


def test_target_options_build_the_board_the_study_names_and_its_exact_standard_deviation():
    board = make_target("checkerboard", {"extent": 1.0})
    assert isinstance(board, BoxMixture) and float(board.lows.min()) == -1.0 and float(board.highs.max()) == 1.0
    # Each coordinate of the 4 x 4 board is uniform on [-extent, extent] marginally: std extent / sqrt(3).
    assert board.std() == pytest.approx(1 / 3**0.5, rel=1e-12)
    for target in (board, make_target("checkerboard", {"squares": 6, "extent": 3.0}), make_target("flower")):
        x = target.sample(400_000, torch.Generator().manual_seed(0))
        assert target.std() == pytest.approx(float(x.var(0).mean().sqrt()), rel=3e-3)
    assert isinstance(make_target("flower", {"radius": 2}), GaussianMixture)


@pytest.mark.parametrize("options,message", [
    ({"extent": 0}, "option 'extent' must be positive"),
    ({"extent": -1.0}, "option 'extent' must be positive"),
    ({"size": 2}, r"takes the options \{'squares': 4, 'extent': 2.0\}.*unknown \['size'\]"),
    ({"squares": 4.5}, "option 'squares' is an integer"),
    ({"extent": "wide"}, "option 'extent' is a number"),
])
def test_bad_target_options_are_one_error_naming_the_key(tmp_path, options, message):
    with pytest.raises(ValueError, match=r"data.target / data.target_options: target 'checkerboard'.*" + message):
        experiment(tmp_path, data={"target": "checkerboard", "target_options": options})


def test_sigma0_and_the_input_scale_from_the_data_and_the_exact_teacher_on_the_same_board(tmp_path):
    exp = experiment(tmp_path, data={"target": "checkerboard", "target_options": {"extent": 1.0}},
                     interpolant={"schedule": "linear", "sigma0": "data"},
                     network={"name": "mlp", "dim": 2, "width": 16, "depth": 1, "times": "raw", "input_scale": "data"},
                     objective={"name": "lmd"}, teacher={"kind": "exact", "target": "checkerboard"})
    assert exp.interpolant.sigma0 == pytest.approx(3**-0.5) and exp.network["input_scale"] == exp.interpolant.sigma0
    assert exp.teacher["target_options"] == {"extent": 1.0}  # the data's board, not the default one
    assert load_experiment(raw=exp.model_dump()) == exp       # the resolved config re-runs as it ran
    with pytest.raises(ValueError, match="sigma0: data and network.input_scale: data take the standard deviation of "
                                         "a toy target"):
        experiment(tmp_path, data={"path": str(tmp_path)}, interpolant={"sigma0": "data"})
    with pytest.raises(ValueError, match="target_options configure a toy target"):
        experiment(tmp_path, data={"path": str(tmp_path), "target_options": {"extent": 1.0}})


def test_the_raw_time_mlp_starts_as_the_identity_and_differentiates_in_both_times():
    net = make_network("mlp", dim=2, width=32, depth=2, times="raw", input_scale=0.5)
    model = FlowMap(net)
    x, s, t = torch.randn(8, 2), torch.rand(8) * 0.5, 0.5 + torch.rand(8) * 0.5
    assert torch.equal(model(s, t, x), x)
    torch.nn.init.normal_(net.out.weight)
    tangent = torch.func.jvp(lambda tt: model(s, tt, x), (t,), (torch.ones_like(t),))[1]
    eps = 1e-3
    numeric = (model(s, t + eps, x) - model(s, t - eps, x)) / (2 * eps)
    assert torch.allclose(tangent, numeric, atol=1e-3)
    assert net.inp.in_features == 4 and len(net.layers) == 2 and not hasattr(net, "embedding")
    with pytest.raises(ValueError, match="mlp: times is 'embedding'"):
        make_network("mlp", dim=2, times="fourier")
    with pytest.raises(ValueError, match="mlp: input_scale is a positive number"):
        make_network("mlp", dim=2, times="raw", input_scale=0)
    teacher = FlowMap(make_network("mlp", dim=2, width=32, depth=2, times="raw", input_scale=0.5))
    with pytest.raises(ValueError, match="this network takes raw times"):
        FlowMap(make_network("mlp", dim=2, width=32, depth=2, times="raw", input_scale=0.5)).start_from(teacher)


def test_the_paper_study_is_the_papers_configuration(tmp_path):
    study = load_study(PAPER)
    plan = plan_study(study, f"sqlite:///{tmp_path}/mlflow.db")
    assert [m.label for m in plan.methods] == ["lsd", "esd", "psd_m"]
    for member in plan.methods:
        exp = member.exp
        assert exp.data.target == "checkerboard" and exp.data.target_options == {"squares": 4, "extent": 1.0}
        assert exp.interpolant.schedule == "linear" and exp.interpolant.sigma0 == pytest.approx(3**-0.5)
        assert exp.network == {"name": "mlp", "dim": 2, "width": 512, "depth": 4, "times": "raw",
                               "input_scale": pytest.approx(3**-0.5)}
        assert (exp.optim.name, exp.optim.lr, exp.optim.decay, exp.optim.decay_start, exp.optim.grad_clip,
                exp.optim.warmup_steps) == ("radam", 1e-3, "sqrt", 35_000, 10.0, 0)
        assert (exp.train.steps, exp.train.batch_size, exp.train.ema_decay) == (150_000, 100_000, 0.999)
        assert exp.objective["diagonal_fraction"] == 0.75 and exp.init is None
    assert plan.methods[2].exp.objective["split"] == "midpoint"
    assert study.evaluation.metrics == ["histogram_kl"] and study.evaluation.steps == [1, 2, 4, 8, 16]
    assert study.published.scores["lsd"] == {1: 0.086, 2: 0.077, 4: 0.071, 8: 0.070, 16: 0.071}


def write_paper(tmp_path, **changes) -> str:
    with open(PAPER) as f:
        study = yaml.safe_load(f)
    for dotted, value in changes.items():
        node, keys = study, dotted.split("__")
        for key in keys[:-1]:
            node = node[key]
        if value is None:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    path = str(tmp_path / "paper.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(study, f)
    return path


@pytest.mark.parametrize("changes,message", [
    ({"base": None}, "study .*paper.yaml: 'base': Field required"),
    ({"base__data__target_options": {"squares": 4, "extent": 0}}, "option 'extent' must be positive"),
    ({"base__data": {"target": "flower"}, "teacher": {"exact": "flower"}},
     r"histogram_kl is the KL of a 50 x 50 histogram .* the target 'flower' \(2-D Gaussian mixture\) is not one"),
    ({"published__scores__ctm": {1: 0.1}}, r"published.scores names \['ctm'\], which are not methods"),
    ({"published__metric": "sw2"}, "published.metric is 'sw2' but the study's quality metric .* is 'histogram_kl'"),
])
def test_a_bad_paper_configuration_is_one_paragraph_and_exit_2(tmp_path, capsys, changes, message):
    assert cli.main(["study", write_paper(tmp_path, **changes), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "studies")


def test_the_papers_numbers_are_printed_beside_the_studys():
    def curve(label, means):
        return Curve(label, "run", {n: [[m, m + 0.002]] for n, m in means.items()}, {}, sampler="flow_map")

    published = {"source": "LSD 2505.18825 Table 1", "metric": "histogram_kl",
                 "scores": {"lsd": {"1": 0.086, "2": 0.077}}}
    comparison = Comparison("study paper", "histogram_kl", "64000", "sqlite://", "run",
                            [curve("lsd", {1: 0.3, 2: 0.2}), curve("esd", {1: 0.4, 2: 0.25})], {},
                            floor=[0.067, 0.068], published=published)
    text = comparison.render()
    rows = [line.split() for line in text.splitlines() if line.startswith(("lsd", "esd"))][:3]  # the quality table
    assert [r[0] for r in rows] == ["lsd", "lsd", "esd"] and rows[1][:6] == ["lsd", "(paper)", "published", "-",
                                                                             "0.086", "0.077"]
    assert "(paper): as published in LSD 2505.18825 Table 1" in text and "floor: exact samples" in text
    assert "| lsd (paper) | published | - | 0.086 | 0.077 |" in comparison.markdown()
    comparison.metric = "sw2"  # another metric: the paper's numbers are not shown against it
    assert "(paper)" not in comparison.render()


def test_a_study_whose_scores_are_all_infinite_still_draws_its_figures():
    """An untrained map leaves bins empty at every step count: the KL is infinite, the figures have no point
    for it and fall back to a linear axis instead of failing the study."""
    from fmm.evaluation.figures import close, quality_figure
    from fmm.evaluation.protocol import Report, Row

    inf = float("inf")
    comparison = Comparison("study", "histogram_kl", "64000", "sqlite://", "run",
                            [Curve("lsd", "run", {1: [[inf, inf]], 2: [[inf, inf]]}, {})], {}, floor=[0.067, 0.068])
    close(comparison.figure())
    report = Report("histogram_kl", 64000, [Row("flow_map", n, n, 1e-6, {"histogram_kl": inf}) for n in (1, 2)], {})
    close(quality_figure(report))


def test_an_infinite_score_reads_back_from_mlflow_as_infinite(tmp_path):
    """MLflow keeps inf as the largest double; `fmm compare` reads it back as inf, so a set's empty bins make
    the mean infinite instead of 6e307, and solvers with no finite run are said to have none."""
    from fmm.infra import tracking
    from fmm.jobs.compare import _per_set

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "inf"), "inf", {}, {})
    client = tracking.client(uri)
    for j, value in enumerate((float("inf"), 0.3, 0.31)):
        client.log_metric(run_id, f"histogram_kl/set{j}", value, step=1)
    cells = _per_set(client, run_id, "histogram_kl", 3)
    assert cells[1][0] == float("inf") and cells[1][1:] == [0.3, 0.31]
    curve = Curve("lsd", run_id, {1: [cells[1]]}, {})
    assert curve.estimate(1).mean == float("inf")
    comparison = Comparison("s", "histogram_kl", "64000", uri, None, [curve], {"euler": curve})
    assert "teacher ODE: no finite histogram_kl at any NFE run" in comparison.render()


def test_the_table_names_the_histogram_kls_own_sample_count(tmp_path):
    """The histogram KL is scored on its protocol's 64,000 points, whatever evaluation.samples says (the
    other metrics' count): `fmm compare`'s header says 64000, not the run's eval_samples."""
    from fmm.infra import tracking
    from fmm.jobs.compare import compare_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = tracking.ensure_experiment(uri, "n")
    run_id = tracking.start_run(uri, experiment_id, "n", {}, {"eval_samples": "4000", "eval_metric": "histogram_kl"})
    tracking.client(uri).log_metric(run_id, "histogram_kl_steps001", 0.3, step=1)
    for metric, header in (("histogram_kl", "64000 samples"), ("sw2", "4000 samples")):
        assert header in compare_experiment(uri, experiment_id, "n", metric).render()
