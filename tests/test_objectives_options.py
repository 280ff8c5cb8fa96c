"""Objective configuration: the registry, shared time sampling and weighting, gradient semantics of the
stop-gradient options, and clear errors for bad input before any training step."""

import pytest
import torch

from fmm.flowmap import FlowMap
from fmm.groundtruth import BoxMixture, ExactVelocity, GaussianMixture
from fmm.interpolants import Interpolant
from fmm.nets import TwoTimeMLP
from fmm.objectives import OBJECTIVES, TimeSampling, describe, make_objective
from fmm.experiment.teachers import make_teacher

EXPECTED = {"flow_matching", "lmd", "emd", "trajectory", "pfmm", "two_map", "eulerian_direct", "lsd", "esd", "psd",
            "cd", "ct", "ict", "scd", "sct", "ayf_emd", "ctm", "pd", "shortcut", "meanflow"}


def test_every_objective_is_registered_with_paper_and_equation():
    assert set(OBJECTIVES) == EXPECTED
    for row in describe():
        assert row["paper"] and row["equation"] and row["teacher"] in ("yes", "no")
    assert {r["name"] for r in describe() if r["teacher"] == "yes"} == {"lmd", "emd", "trajectory", "pfmm", "cd", "scd",
                                                                            "ayf_emd", "ctm", "pd"}


def test_objectives_are_built_from_yaml_mappings():
    import yaml

    spec = yaml.safe_load("""
name: lsd
diagonal_fraction: 0.5
weighting: learned
time_sampling: {kind: logit_normal, mean: -0.4, std: 1.2, t_max: 0.99}
""")
    obj = make_objective(spec, Interpolant("linear"))
    assert obj.options.diagonal_fraction == 0.5 and obj.weight is not None
    assert obj.options.time_sampling.kind == "logit_normal" and obj.options.time_sampling.t_max == 0.99


@pytest.mark.parametrize("kind", ["uniform_square", "upper_triangle", "diagonal_anneal", "logit_normal"])
def test_time_sampling_respects_range_and_order(kind):
    torch.manual_seed(0)
    ts = TimeSampling(kind=kind, t_min=0.1, t_max=0.9, anneal_steps=100)
    s, t = ts.pair(20000, step=10)
    assert s.min() >= 0.1 - 1e-6 and t.max() <= 0.9 + 1e-6
    if kind == "uniform_square":
        assert (s > t).float().mean() > 0.4  # both orders: the backward maps are sampled
    else:
        assert bool((s <= t).all())
    single = ts.single(1000)
    assert single.min() >= 0.1 - 1e-6 and single.max() <= 0.9 + 1e-6


def test_diagonal_anneal_widens_the_gap_over_steps():
    torch.manual_seed(0)
    ts = TimeSampling(kind="diagonal_anneal", anneal_start=0.05, anneal_steps=1000)
    early = (lambda st: (st[1] - st[0]).abs().max())(ts.pair(5000, step=0))
    late = (lambda st: (st[1] - st[0]).abs().max())(ts.pair(5000, step=1000))
    assert early <= 0.05 + 1e-6 and late > 0.5


def test_upper_triangle_is_uniform_on_the_triangle():
    torch.manual_seed(1)
    s, t = TimeSampling(kind="upper_triangle").pair(200000)
    # Uniform on s < t: the gap t - s has density 2(1 - g), mean 1/3; s has mean 1/3, t 2/3.
    assert abs((t - s).mean() - 1 / 3) < 0.005 and abs(s.mean() - 1 / 3) < 0.005 and abs(t.mean() - 2 / 3) < 0.005


def test_max_gap_caps_every_gap():
    s, t = TimeSampling(kind="uniform_square").pair(10000, max_gap=0.125)
    assert (t - s).abs().max() <= 0.125 + 1e-6


def small_model(dim=2):
    torch.manual_seed(0)
    model = FlowMap(TwoTimeMLP(dim=dim, width=32, depth=2, emb_dim=16, time_scale=20.0))
    torch.nn.init.normal_(model.net.out.weight, std=0.2)
    return model


def gradient(objective, model, teacher, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    x1 = GaussianMixture.flower(modes=4, radius=2.0).sample(256, torch.Generator().manual_seed(seed)).float()
    loss, _ = objective(model, x1, teacher=teacher, step=0)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name,option", [("lmd", "stop_gradient"), ("emd", "semigradient")])
def test_stop_gradient_options_change_the_gradient_not_the_loss(name, option):
    interp = Interpolant("linear")
    teacher = ExactVelocity(GaussianMixture.flower(modes=4, radius=2.0), interp)
    model = small_model()
    with_sg = make_objective({"name": name, option: True}, interp)
    without = make_objective({"name": name, option: False}, interp)
    torch.manual_seed(3)
    x1 = torch.randn(64, 2)
    torch.manual_seed(4)
    loss_a, _ = with_sg(model, x1, teacher=teacher)
    torch.manual_seed(4)
    loss_b, _ = without(model, x1, teacher=teacher)
    torch.testing.assert_close(loss_a, loss_b)
    g_a, g_b = gradient(with_sg, model, teacher), gradient(without, model, teacher)
    assert (g_a - g_b).norm() > 1e-3 * g_a.norm()


def test_learned_weight_is_trained_with_the_model():
    interp = Interpolant("linear")
    objective = make_objective({"name": "lsd", "weighting": "learned"}, interp)
    model = small_model()
    torch.manual_seed(0)
    loss, logs = objective(model, torch.randn(128, 2))
    loss.backward()
    assert objective.weight.out.weight.grad is not None and objective.weight.out.weight.grad.abs().sum() > 0
    assert set(logs) >= {"loss", "mse_diagonal", "mse_offdiagonal"}


@pytest.mark.parametrize("spec,match", [
    ({"name": "consistency"}, r"unknown objective 'consistency'; choose one of"),
    ({"name": "lsd", "diagonal_fraction": 1.5}, r"objective 'lsd': 'diagonal_fraction': .*less than or equal to 1"),
    ({"name": "two_map", "invertibility_weight": -1.0}, r"objective 'two_map': 'invertibility_weight'"),
    ({"name": "lmd", "stop_grad": True}, r"objective 'lmd': unknown key 'stop_grad' \(allowed: .*stop_gradient"),
    ({"name": "psd", "split": "random"}, r"objective 'psd': 'split'"),
    ({"name": "lsd", "time_sampling": {"kind": "beta"}}, r"'time_sampling.kind'"),
    ({"name": "lsd", "time_sampling": {"t_min": 0.8, "t_max": 0.2}}, r"t_min \(0.8\) must be below t_max"),
    ({"diagonal_fraction": 0.5}, r"mapping with a 'name'"),
])
def test_bad_objective_configs_are_refused_with_the_key_named(spec, match):
    with pytest.raises(ValueError, match=match):
        make_objective(spec, Interpolant("linear"))


def test_distillation_without_teacher_is_refused_before_training():
    for name in ("lmd", "emd", "pfmm"):
        with pytest.raises(ValueError, match=rf"objective '{name}' distils a velocity teacher"):
            make_objective({"name": name}, Interpolant("linear")).prepare(small_model(), None)


def test_teacher_with_another_data_shape_is_refused():
    interp = Interpolant("linear")
    teacher = make_teacher({"kind": "exact", "target": "flower"}, interp)  # 2-D
    with pytest.raises(ValueError, match=r"teacher works on samples of shape \[2\] but the model on \[3\]"):
        make_objective({"name": "lmd"}, interp).prepare(small_model(dim=3), teacher)


def test_singular_teacher_needs_times_below_its_end():
    interp = Interpolant("linear")
    teacher = ExactVelocity(BoxMixture.checkerboard(), interp)
    with pytest.raises(ValueError, match=r"singular beyond t = 0.9999; set time_sampling.t_max <= 0.9999"):
        make_objective({"name": "lmd"}, interp).prepare(small_model(), teacher)
    make_objective({"name": "lmd", "time_sampling": {"t_max": 0.9999}}, interp).prepare(small_model(), teacher)


@pytest.mark.parametrize("spec,match", [
    ({"kind": "exact"}, "needs 'target'"),
    ({"kind": "checkpoint"}, "needs 'path'"),
    ({"kind": "checkpoint", "path": "/nonexistent/model.pt"}, r"no flow-map checkpoint at '/nonexistent/model.pt'"),
    ({"kind": "oracle"}, r"teacher: 'kind'"),
])
def test_bad_teacher_configs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        make_teacher(spec, Interpolant("linear"))


def test_a_saved_flow_matching_model_serves_as_teacher(tmp_path):
    from fmm.checkpoint import save_flow_map
    from fmm.nets import make_network

    model = FlowMap(make_network("mlp", dim=2, width=16, depth=1))
    torch.nn.init.normal_(model.net.out.weight)
    path = str(tmp_path / "teacher.pt")
    save_flow_map(path, model)
    teacher = make_teacher({"kind": "checkpoint", "path": path}, Interpolant("linear"))
    x, t = torch.randn(8, 2), torch.rand(8)
    torch.testing.assert_close(teacher(t, x), model.velocity(t, x))
    assert teacher.sample_shape == (2,)


@pytest.mark.parametrize("spec", [{"name": "lmd"}, {"name": "emd"}, {"name": "lsd"}, {"name": "esd"},
                                  {"name": "eulerian_direct"}, {"name": "two_map"}])
def test_slope_gradient_keeps_the_loss_value_and_moves_the_gradient_onto_v(spec):
    interp = Interpolant("linear")
    teacher = ExactVelocity(GaussianMixture.flower(modes=4, radius=2.0), interp)
    model = small_model()
    paper = make_objective(dict(spec), interp)
    slope = make_objective(dict(spec, gradient="slope"), interp)
    x1 = torch.randn(128, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    loss_a, _ = paper(model, x1, teacher=teacher)
    torch.manual_seed(4)
    loss_b, _ = slope(model, x1, teacher=teacher)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    g_a, g_b = gradient(paper, model, teacher), gradient(slope, model, teacher)
    assert torch.isfinite(g_b).all() and (g_a - g_b).norm() > 1e-3 * g_a.norm()


@pytest.mark.parametrize("spec,match", [
    ({"name": "lmd", "gradient": "slope", "stop_gradient": False}, "needs stop_gradient true"),
    ({"name": "emd", "gradient": "slope", "semigradient": False}, "needs semigradient true"),
    ({"name": "psd", "gradient": "slope"}, r"unknown key 'gradient'"),
])
def test_slope_gradient_refuses_combinations_it_cannot_honour(spec, match):
    with pytest.raises(ValueError, match=match):
        make_objective(spec, Interpolant("linear"))
