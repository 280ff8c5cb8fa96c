"""Baselines trained the way their papers train them: students that start from their teacher (`init`),
and target or tangent branches that share the student's dropout masks."""

import os
import sys

import pytest
import torch

from fmm.checkpoint import load_flow_map, save_flow_map
from fmm.cli import main
from fmm.experiment.builders import build_interpolant, build_model, build_teacher, initial_map, resolve_init
from fmm.experiment.checks import check_config, check_environment
from fmm.flowmap import FlowMap, TrigFlowMap
from fmm.interpolants import Interpolant
from fmm.nets import TwoTimeMLP, make_network
from fmm.objectives import OBJECTIVES, describe, make_objective
from fmm.objectives.base import SharedRandomness, TargetNetwork
from fmm.tensor_checks import expand_like
from support.experiments import NETWORK, experiment, teacher_file, trained_looking

LINEAR = Interpolant("linear")


# -- init --------------------------------------------------------------------------------------------------

def test_the_papers_that_start_from_the_teacher_do_so_by_default(tmp_path):
    assert {n for n, cls in OBJECTIVES.items() if cls.init_from_teacher} == {"cd", "pd", "ctm", "scd", "ayf_emd"}
    assert {row["name"]: row["init"] for row in describe()}["cd"] == "teacher"
    path = teacher_file(tmp_path)
    cd = experiment(tmp_path, objective={"name": "cd"}, teacher={"kind": "checkpoint", "path": path}, network=NETWORK)
    lmd = experiment(tmp_path, teacher={"kind": "checkpoint", "path": path}, network=NETWORK)
    exact_cd = experiment(tmp_path, objective={"name": "cd"})  # an exact teacher has no weights to copy
    assert (resolve_init(cd), resolve_init(lmd), resolve_init(exact_cd)) == ("teacher", "none", "none")
    off = experiment(tmp_path, objective={"name": "cd"}, teacher={"kind": "checkpoint", "path": path},
                     network=NETWORK, init="none")
    assert resolve_init(off) == "none"


def test_a_student_started_from_its_teacher_has_the_teachers_velocity_and_euler_map_at_step_zero(tmp_path):
    exp = experiment(tmp_path, objective={"name": "cd"}, network=NETWORK,
                     teacher={"kind": "checkpoint", "path": teacher_file(tmp_path)})
    teacher = build_teacher(exp, build_interpolant(exp))
    student = build_model(exp)
    student.start_from(initial_map(exp, teacher))
    x, t = torch.randn(64, 2), torch.rand(64)
    with torch.no_grad():
        torch.testing.assert_close(student.velocity(t, x), teacher(t, x), rtol=1e-4, atol=1e-5)  # float32
        s = torch.rand(64) * 0.5
        one = torch.ones(64)
        # off the diagonal the student is the teacher's Euler step, X_{s,1}(x) = x + (1 - s) b_s(x)
        torch.testing.assert_close(student(s, one, x), x + (1 - s)[:, None] * teacher(s, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change,message", [
    ({"init": "teacher"}, r"init: teacher starts the student from its teacher's weights, but this experiment has "
                          r"the exact velocity"),
    ({"init": "teacher", "teacher": None, "objective": {"name": "lsd"}}, r"but this experiment has no teacher"),
])
def test_init_teacher_without_a_trained_teacher_is_refused_statically(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        check_config(experiment(tmp_path, **change))


def test_init_from_a_teacher_of_another_network_names_both_networks(tmp_path):
    exp = experiment(tmp_path, objective={"name": "cd"}, network=NETWORK, init="teacher",
                     teacher={"kind": "checkpoint", "path": teacher_file(tmp_path, width=16, dim=2)})
    with pytest.raises(ValueError, match=r"'width': 32.*'width': 16|'width': 16.*'width': 32"):
        check_environment(exp)


def test_init_from_an_unreadable_checkpoint_through_the_cli_is_one_error_and_nothing_trains(tmp_path, monkeypatch,
                                                                                         capsys):
    import yaml

    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    raw = {"name": "from-broken", "data": {"target": "flower"}, "network": NETWORK, "objective": {"name": "lsd"},
           "init": str(bad), "storage": {"path": str(tmp_path / "runs")},
           "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(tmp_path / "exp.yaml")]) == 2
    err = capsys.readouterr().err
    assert "init:" in err and "broken.pt" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "runs" / "from-broken")


# -- shared dropout masks -----------------------------------------------------------------------------------

def dropout_map(seed: int = 0) -> FlowMap:
    """An MLP flow map with dropout 0.3, in training mode, and an output layer that is not zero."""
    torch.manual_seed(seed)
    model = FlowMap(TwoTimeMLP(dim=2, width=64, depth=3, dropout=0.3))
    torch.nn.init.normal_(model.net.out.weight, std=0.3)
    return model.train()


def test_two_target_calls_on_the_same_input_see_the_same_masks():
    target = TargetNetwork(dropout_map())
    x, s = torch.randn(128, 2), torch.rand(128) * 0.9
    one = torch.ones(128)
    shared = SharedRandomness(x.device)
    with shared.replay():
        a = target(s, one, x)
    with shared.replay():
        b = target(s, one, x)
    assert torch.equal(a, b)
    assert not torch.equal(target(s, one, x), target(s, one, x))  # dropout is on: unshared calls differ


def test_a_shared_mask_lets_the_consistency_residual_shrink_with_the_grid_gap():
    """CT on a fine grid with theta^- = theta: the residual X_{t_n,1}(x_n) - X^-_{t_n+1,1}(x_n+1) is of the
    order of the gap when both sides draw one mask, and of the order of the mask noise when they do not."""
    model = dropout_map()
    objective = make_objective({"name": "ct", "curriculum": "fixed", "steps": 4000, "grid": "uniform",
                                "target_decay": 0.0, "adaptive_decay": False}, LINEAR)
    objective.prepare(model)
    x1 = torch.randn(512, 2)
    torch.manual_seed(1)
    shared = objective.terms(model, x1)["offdiagonal"].residual.norm(dim=1).mean()
    x0 = torch.randn(512, 2)
    times = objective.grid_times(4000).float()
    idx = torch.randint(0, 3999, (512,))
    s, u, one = times[idx], times[idx + 1], torch.ones(512)
    with torch.no_grad():
        independent = (model(s, one, LINEAR.interpolate(s, x0, x1).x_t)
                       - model(u, one, LINEAR.interpolate(u, x0, x1).x_t)).norm(dim=1).mean()
    assert shared < 0.05 * independent, (float(shared), float(independent))


@pytest.mark.parametrize("name", ["sct", "sct_trigflow", "meanflow"])
def test_the_tangent_branch_sees_the_students_mask(name):
    """The tangent of sCT, in both forms (and MeanFlow's target), comes from a JVP of the network with the
    student's masks: it equals the finite difference of the map along the trajectory with those masks held
    fixed (TrigFlow's F-space residual is -g = (2/pi) cos(tau) dX_{s,1}/ds at full warm-up)."""
    model = dropout_map()
    path = Interpolant("trig") if name == "sct_trigflow" else LINEAR
    objective = make_objective({"name": name.split("_")[0], **({"tangent_norm": None, "warmup_steps": 0}
                                                               if name != "meanflow" else {"diagonal_fraction": 0.0,
                                                                                           "adaptive_power": 0.0})},
                               path)
    objective.prepare(model)
    x0, x1 = torch.randn(256, 2), torch.randn(256, 2)
    torch.manual_seed(3)
    residual = objective.offdiagonal(model, x0, x1, None, None, step=10**6).residual.detach()
    torch.manual_seed(3)
    if name != "meanflow":
        s = objective.options.time_sampling.single(256, interpolant=path).clamp(max=1 - 1e-5)
        t = torch.ones(256)
    else:
        s, t = objective.options.time_sampling.pair(256, 10**6, interpolant=LINEAR)
    masks = SharedRandomness(x0.device)
    point = path.interpolate(s, x0, x1)
    h = 1e-3
    with torch.no_grad():
        with masks.replay():
            here = model(s, t, point.x_t)
        with masks.replay():
            there = model(s + h, t, point.x_t + h * point.dx_t)
    derivative = (there - here) / h  # dX_{s,t}(x_s)/ds along the trajectory, masks fixed
    if name == "sct":
        expected = -derivative                       # residual = X - sg(X + g), g = dX/ds
    elif name == "sct_trigflow":
        expected = 2 / torch.pi * torch.cos(torch.pi / 2 * (1 - s))[:, None] * derivative
    else:
        expected = derivative  # the Eulerian residual in its slope form has the value dX_{s,t}/ds along b
    torch.testing.assert_close(residual, expected, rtol=0, atol=2e-2)


# -- shortcut's clip ----------------------------------------------------------------------------------------

def test_shortcut_clips_images_only_so_the_exact_map_of_wide_data_stays_its_fixed_point():
    from fmm.groundtruth import GaussianFlowMap, GaussianTarget

    wide = GaussianTarget(torch.tensor([5.0, -4.0], dtype=torch.float64), 9.0 * torch.eye(2, dtype=torch.float64))
    exact = GaussianFlowMap(wide, LINEAR)
    x1 = wide.sample(2048, torch.Generator().manual_seed(0))
    residuals = {}
    for clip in ("auto", 4.0):
        objective = make_objective({"name": "shortcut", "clip": clip, "diagonal_fraction": 0.0}, LINEAR)
        objective.prepare(exact)
        torch.manual_seed(0)
        residuals[clip] = objective.terms(exact, x1)["offdiagonal"].residual.abs().max()
    assert residuals["auto"] < 1e-9 < 0.1 < residuals[4.0]  # the authors' clip pulls the exact map off
    image = make_objective({"name": "shortcut"}, LINEAR)
    image.prepare(FlowMap(make_network("unet", in_channels=1, image_size=8, channels=8, channel_mult=[1],
                                       num_blocks=1, attn_resolutions=[])))
    assert image.clip == 4.0


# -- evaluation that means something for every family ---------------------------------------------------------

def test_a_consistency_model_gets_no_teacher_of_its_own_diagonal(tmp_path):
    from fmm.evaluation.protocol import build_protocol
    from fmm.experiment.data import prepare
    from fmm.jobs.evaluate import own_teacher

    prepare("flower", str(tmp_path / "flower"), shards=1, samples=2000)
    common = dict(data={"path": str(tmp_path / "flower")}, network=NETWORK)
    cd = experiment(tmp_path, objective={"name": "cd"}, **common)  # distils an exact velocity: no network
    model = build_model(cd)
    protocol = build_protocol(cd, LINEAR, (2,), 200)
    teacher, note = own_teacher(model, cd, protocol)
    assert teacher is None and "cd never trains its diagonal" in note and "--teacher" in note
    lsd = experiment(tmp_path, objective={"name": "lsd"}, teacher=None, **common)
    teacher, note = own_teacher(model, lsd, protocol)
    assert teacher is not None and note == ""
    given, _ = own_teacher(model, cd, protocol, teacher_file(tmp_path))
    assert given is not None


def test_map_error_is_reported_for_deterministic_samplers_only():
    from fmm.evaluation.protocol import Scorer, run_protocol
    from fmm.groundtruth import ExactVelocity, make_target, reference_flow_map
    from fmm.sampling import make_sampler

    target = make_target("flower")
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    reference = reference_flow_map(ExactVelocity(target, LINEAR), 0.0, 1.0, noise.double())
    scorer = Scorer((2,), target.sample(300, torch.Generator().manual_seed(1)), reference, wanted=["sw2"])
    model = trained_looking()
    for kind, has_error_at_two in (("flow_map", True), ("consistency", False)):
        report = run_protocol(model, None, noise, [1, 2], scorer, sampler=make_sampler(kind, LINEAR), progress=False,
                              log=lambda *_: None)
        by_steps = {row.steps: row.scores for row in report.rows}
        assert "rmse_vs_ode" in by_steps[1] and ("rmse_vs_ode" in by_steps[2]) == has_error_at_two


def test_the_checkerboard_kl_follows_the_lsd_protocol_with_its_floor(tmp_path):
    from fmm.evaluation.protocol import KL_BINS, KL_SAMPLES, build_protocol, run_protocol

    exp = experiment(tmp_path, data={"target": "checkerboard"}, teacher={"kind": "exact", "target": "checkerboard"})
    protocol = build_protocol(exp, LINEAR, (2,), 500, metrics_wanted=["sw2", "histogram_kl"])
    assert (KL_SAMPLES, KL_BINS) == (64_000, 50) and protocol.kl_noise.shape == (64_000, 2)
    floor = protocol.floors["histogram_kl"]
    assert 0.06 < floor < 0.075, floor  # the paper: about 0.066 for exact samples at this size (here 0.067 to 0.069)
    identity = FlowMap(make_network(**NETWORK))  # the untrained map leaves the noise where it is
    report = run_protocol(identity, None, protocol.noise, [1], protocol.scorer, kl_noise=protocol.kl_noise,
                          floors=protocol.floors, progress=False, log=lambda *_: None)
    assert report.rows[0].scores["histogram_kl"] > 10 * floor and report.floors == protocol.floors


def test_an_infinite_metric_is_logged_as_such_with_a_warning(tmp_path):
    from mlflow.tracking import MlflowClient

    from fmm.evaluation.protocol import Row
    from fmm.infra import tracking
    from fmm.jobs.evaluate import log_rows

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "inf"), "inf", {}, {})
    logger = tracking.RunLogger(uri, run_id)
    with pytest.warns(UserWarning, match="histogram_kl is inf at NFE 1"):
        log_rows(logger, [Row("flow_map", 1, 1, 1e-6, {"sw2": 0.1, "histogram_kl": float("inf")})])
    logger.flush()
    logged = [m.value for m in MlflowClient(uri).get_metric_history(run_id, "histogram_kl")]
    assert logged == [sys.float_info.max]  # MLflow stores an infinite value as the largest double


def test_a_method_that_departs_from_its_paper_is_labelled_so():
    from fmm.jobs.compare import method_label

    assert method_label("lsd", {"objective.gradient": "slope"}) == "lsd[slope]"
    assert method_label("lsd", {"objective.gradient": "jvp"}) == "lsd"
    assert method_label("cd", {}) == "cd"
    assert method_label("scd", {"objective.name": "scd", "map_form": "linear"}) == "scd[flowmap]"
    assert method_label("scd", {"objective.name": "scd", "map_form": "trig"}) == "scd"
    assert method_label("lsd", {"objective.name": "lsd", "map_form": "linear", "objective.gradient": "slope"}) \
        == "lsd[slope]"


@pytest.mark.slow
def test_consistency_distillation_from_its_teacher_beats_cd_from_the_identity_at_a_small_budget():
    """On the flower mixture: a flow-matching teacher, then CD for the same 300 steps from the identity map
    and from the teacher (its Euler step); the one-step map is compared with the teacher's own ODE map."""
    from fmm.flowmap import ModelVelocity
    from fmm.groundtruth import make_target
    from fmm.metrics import map_rmse
    from fmm.sampling import solve_ode
    from fmm.training import fit

    target = make_target("flower")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher_map = FlowMap(TwoTimeMLP(dim=2, width=128, depth=3))
    fit(teacher_map, make_objective({"name": "flow_matching"}, LINEAR), lambda n: target.sample(n, gen).float(),
        steps=800, batch=512, lr=3e-3)
    teacher = ModelVelocity(teacher_map)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ode = solve_ode(teacher, noise, "dopri5", rtol=1e-5, atol=1e-5).samples
    errors = {}
    for start in ("identity", "teacher"):
        torch.manual_seed(2)
        student = FlowMap(TwoTimeMLP(dim=2, width=128, depth=3))
        if start == "teacher":
            student.start_from(teacher_map)
        data = torch.Generator().manual_seed(3)
        fit(student, make_objective({"name": "cd", "target_decay": 0.9}, LINEAR),
            lambda n: target.sample(n, data).float(), steps=300, batch=512, lr=1e-3, teacher=teacher)
        with torch.no_grad():
            errors[start] = map_rmse(student(torch.zeros(2000), torch.ones(2000), noise), ode)
    print("one-step RMSE against the teacher's ODE map:", errors)
    assert errors["teacher"] < 0.8 * errors["identity"], errors


@pytest.mark.parametrize("name,mean,std", [("scd", -1.0, 1.4), ("sct", -1.0, 1.4), ("meanflow", -0.4, 1.0)])
def test_scm_and_meanflow_propose_times_in_noise_level_whatever_sigma0(name, mean, std):
    """log sigma ~ N(mean, std) for sigma the noise-to-signal ratio of the drawn time, at any sigma0."""
    levels = []
    for sigma0 in (0.5, 1.0, 2.0):
        interpolant = Interpolant("linear", sigma0=sigma0)
        sampling = make_objective({"name": name}, interpolant).options.time_sampling
        torch.manual_seed(0)
        times = sampling.single(20000, interpolant=interpolant, dtype=torch.float64)
        levels.append(interpolant.noise_to_signal(times).log())
    torch.testing.assert_close(levels[0], levels[2], rtol=0, atol=1e-9)
    assert abs(float(levels[1].mean()) - mean) < 0.05 and abs(float(levels[1].std()) - std) < 0.05


def test_scm_tangent_clipping_bounds_every_entry():
    model = dropout_map().eval()
    objective = make_objective({"name": "sct", "tangent_norm": None, "tangent_clip": 0.05, "warmup_steps": 0},
                               LINEAR)
    objective.prepare(model)
    torch.manual_seed(0)
    residual = objective.offdiagonal(model, torch.randn(256, 2), torch.randn(256, 2) * 3, None, None, 10).residual
    assert 0.04 < float(residual.abs().max()) <= 0.05 + 1e-5  # X - (X + g) rounds in float32


# -- sCM as published: TrigFlow ------------------------------------------------------------------------------

TRIG = Interpolant("trig", sigma0=0.5)


def test_the_trigflow_map_is_trigflows_ddim_step_with_the_velocity_on_its_diagonal():
    torch.manual_seed(0)
    model = TrigFlowMap(make_network(**NETWORK)).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    s = 0.9 * torch.rand(64, dtype=torch.float64)
    t = s + (1 - s) * torch.rand(64, dtype=torch.float64)
    with torch.no_grad():
        u = model.net(s, t, x)
        d = expand_like(torch.pi / 2 * (t - s), x)
        torch.testing.assert_close(model(s, t, x), torch.cos(d) * x + 2 / torch.pi * torch.sin(d) * u)
        torch.testing.assert_close(model.slope(s, t, x), (model(s, t, x) - x) / (t - s)[:, None])
        assert torch.equal(model(s, s, x), x)
    _, dt = model.time_jvp(s, s, x)  # d/dt X_{s,t} at t = s: the velocity, which is the diagonal u_{s,s}
    torch.testing.assert_close(dt, model.net(s, s, x))
    torch.testing.assert_close(model.velocity(s, x), model.net(s, s, x))
    teacher = trained_looking().double()  # a flow-matching teacher's weights start a TrigFlow student
    model.start_from(teacher)
    torch.testing.assert_close(model.velocity(s, x), teacher.velocity(s, x))


def test_scm_trains_trigflow_on_the_trig_schedule_and_its_checkpoint_says_so(tmp_path):
    trig = {"schedule": "trig", "sigma0": 0.5}
    assert type(build_model(experiment(tmp_path, objective={"name": "sct"}, interpolant=trig))) is TrigFlowMap
    assert type(build_model(experiment(tmp_path, objective={"name": "sct"}))) is FlowMap  # linear: flowmap
    assert type(build_model(experiment(tmp_path, objective={"name": "sct", "form": "flowmap"},
                                       interpolant=trig))) is FlowMap
    assert type(build_model(experiment(tmp_path, interpolant=trig))) is FlowMap  # FMM's own map
    with pytest.raises(ValueError, match="form 'trigflow'.*schedule is 'linear'"):
        make_objective({"name": "scd", "form": "trigflow"}, LINEAR)
    torch.manual_seed(0)
    model, path = TrigFlowMap(make_network(**NETWORK)), str(tmp_path / "trig.pt")
    save_flow_map(path, model)
    loaded = load_flow_map(path)
    x, s, one = torch.randn(16, 2), 0.5 * torch.rand(16), torch.ones(16)
    assert type(loaded) is TrigFlowMap
    torch.testing.assert_close(loaded(s, one, x), model(s, one, x), rtol=0, atol=0)


def test_the_trigflow_loss_is_scms_tangent_written_in_f():
    """sCM's tangent written out in its own variables (2410.11081 eq. (8), §4.2), independently of the
    objective's algebra on X: F = -2 u / (pi sigma_d) from the network, dF/dtau by a JVP in TrigFlow time,
    g = -cos^2 (sigma_d F - dx/dtau) - r sin cos (x + sigma_d dF/dtau), normalised. The F-space residual
    F - sg(F + g) has the value -g."""
    torch.manual_seed(0)
    model, sigma_d = TrigFlowMap(make_network(**NETWORK)).double(), TRIG.sigma0
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    objective = make_objective({"name": "sct", "warmup_steps": 100}, TRIG)
    objective.prepare(model)
    x0, x1 = 0.5 * torch.randn(256, 2, dtype=torch.float64), torch.randn(256, 2, dtype=torch.float64)
    torch.manual_seed(3)
    residual = objective.offdiagonal(model, x0, x1, None, None, step=30).residual.detach()
    torch.manual_seed(3)
    s = objective.options.time_sampling.single(256, interpolant=TRIG, dtype=torch.float64).clamp(max=1 - 1e-5)
    point, r = TRIG.interpolate(s, x0, x1), 0.3
    tau, x, one = torch.pi / 2 * (1 - s), point.x_t, torch.ones(256, dtype=torch.float64)
    dx_dtau = -2 / torch.pi * point.dx_t

    def big_f(tau_, x_):
        return -2 / (torch.pi * sigma_d) * model.net(1 - 2 * tau_ / torch.pi, one, x_)

    with torch.no_grad():
        f, df = torch.func.jvp(big_f, (tau, x), (one, dx_dtau))
    cos, sin = torch.cos(tau)[:, None], torch.sin(tau)[:, None]
    g = -cos**2 * (sigma_d * f - dx_dtau) - r * sin * cos * (x + sigma_d * df)
    g = g / (g.norm(dim=1, keepdim=True) + 0.1)
    torch.testing.assert_close(residual, -g, rtol=0, atol=1e-9)


def test_a_teacher_trained_on_another_path_is_moved_to_the_students(tmp_path):
    """sCD as published runs on TrigFlow's path; a flow-matching teacher trained on the linear path serves
    it through VelocityOnPath, whose velocity is the trig path's (checked here on the teacher's own field)."""
    linear = experiment(tmp_path, network=NETWORK, interpolant={"schedule": "linear", "sigma0": 0.5})
    path = str(tmp_path / "linear_teacher.pt")
    save_flow_map(path, trained_looking(), extra={"config": linear.model_dump()})
    trig = {"schedule": "trig", "sigma0": 0.5}
    exp = experiment(tmp_path, objective={"name": "scd"}, network=NETWORK, interpolant=trig,
                     teacher={"kind": "checkpoint", "path": path})
    teacher = build_teacher(exp, build_interpolant(exp))
    direct = trained_looking()
    t, x = torch.rand(64), torch.randn(64, 2)
    # on the trig path at time t the linear path's time is t' = tan / (1 + tan) of pi t / 2, and the scale c = cos + sin
    a, b = torch.cos(torch.pi * t / 2)[:, None], torch.sin(torch.pi * t / 2)[:, None]
    c, t_lin = a + b, (b / (a + b))[:, 0]
    dc, dt_lin = torch.pi / 2 * (a - b), torch.pi / 2 / (a + b) ** 2
    with torch.no_grad():
        expected = dc / c * x + c * dt_lin * direct.velocity(t_lin, x / c)
        torch.testing.assert_close(teacher(t, x), expected, rtol=1e-4, atol=1e-5)
    student = build_model(exp)  # TrigFlow, started from the moved teacher's network
    student.start_from(initial_map(exp, teacher))
    torch.testing.assert_close(student.velocity(t, x), direct.velocity(t, x), rtol=1e-4, atol=1e-5)  # float32
    other = experiment(tmp_path, objective={"name": "scd"}, network=NETWORK,
                       interpolant={"schedule": "trig", "sigma0": 1.0}, teacher={"kind": "checkpoint", "path": path})
    with pytest.raises(ValueError, match="trained on Interpolant.*sigma0 is 0.5"):
        build_teacher(other, build_interpolant(other))
