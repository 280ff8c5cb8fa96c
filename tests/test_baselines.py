"""The baselines (consistency models, CTM, progressive distillation, shortcut, MeanFlow, AYF) against
exact answers: the closed-form consistency function, a Gaussian target's moments at one and two
steps with each method's own sampler, and progressive distillation's round-by-round contract.
The samplers the baselines need are checked on the exact Gaussian map, where every one of them
must reproduce the target for any step count."""

import pytest
import torch

from fmm.flowmap import FlowMap, make_flow_map
from fmm.groundtruth import ExactVelocity, GaussianFlowMap, GaussianTarget
from fmm.interpolants import Interpolant
from fmm.nets import TwoTimeMLP
from fmm.objectives import make_objective, sampler_for
from fmm.sampling import flow_map_sample, gamma_sample, make_sampler, solve_ode
from fmm.training import train_step, trainable_parameters

GAUSSIAN = GaussianTarget(torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.5], [0.5, 0.8]]))
LINEAR = Interpolant("linear")
TRIG = Interpolant("trig")


def moments(y: torch.Tensor) -> tuple[float, float]:
    y = y.double()
    return ((y.mean(0) - GAUSSIAN.mean).abs().max().item(),
            (torch.cov(y.T) - GAUSSIAN.covariance).abs().max().item())


# -- samplers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "trig", "vp"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_gamma_sampling_with_the_exact_map_reproduces_the_target(schedule, gamma):
    interp = Interpolant(schedule)
    exact = GaussianFlowMap(GAUSSIAN, interp)
    x0 = torch.randn(100_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (1, 2, 4):
        out = gamma_sample(exact, x0, interp, gamma=gamma, steps=steps, generator=torch.Generator().manual_seed(1))
        assert out.nfe == steps
        mean_err, cov_err = moments(out.samples)
        assert mean_err < 0.02 and cov_err < 0.03, (schedule, gamma, steps, mean_err, cov_err)


def test_gamma_zero_is_the_flow_map_chain_and_stochastic_samplers_are_seeded():
    exact = GaussianFlowMap(GAUSSIAN, LINEAR)
    x0 = torch.randn(500, 2, dtype=torch.float64)
    chain = flow_map_sample(exact, x0, steps=3).samples
    assert torch.equal(gamma_sample(exact, x0, LINEAR, gamma=0.0, steps=3).samples, chain)
    consistency = make_sampler("consistency", LINEAR, seed=5)
    a, b = consistency(exact, x0, 3).samples, consistency(exact, x0, 3).samples
    assert torch.equal(a, b) and not torch.allclose(a, chain)
    with pytest.raises(ValueError, match="gamma"):
        gamma_sample(exact, x0, LINEAR, gamma=1.5, steps=2)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("ddim")


def test_each_method_names_its_authors_sampler():
    kinds = {name: sampler_for({"name": name}, LINEAR)[1] for name in ("lmd", "cd", "ct", "ict", "scd", "sct",
                                                                     "ctm", "pd", "shortcut", "meanflow", "ayf_emd")}
    assert kinds == {"lmd": "flow_map", "cd": "consistency", "ct": "consistency", "ict": "consistency",
                     "scd": "consistency", "sct": "consistency", "ctm": "gamma", "pd": "flow_map",
                     "shortcut": "flow_map", "meanflow": "flow_map", "ayf_emd": "flow_map"}


# -- the discrete machinery ----------------------------------------------------------------------

def test_karras_grid_and_curricula_follow_the_papers():
    cd = make_objective({"name": "cd"}, LINEAR)
    times = cd.grid_times(18)
    sigma = LINEAR.noise_to_signal(times)
    assert torch.allclose(sigma[[0, -1]], torch.tensor([80.0, 0.002], dtype=torch.float64))
    assert bool((times.diff() > 0).all())
    ct = make_objective({"name": "ct", "curriculum_steps": 1000}, LINEAR)
    sizes = [ct.grid_size(k) for k in (0, 500, 1000)]
    assert sizes[0] == 2 and sizes[-1] == 151 and sizes[0] < sizes[1] < sizes[2]
    assert ct.decay(0) == pytest.approx(0.9) and ct.decay(1000) == pytest.approx(0.9 ** (2 / 151))
    ict = make_objective({"name": "ict", "curriculum_steps": 1200}, LINEAR)
    assert [ict.grid_size(k) for k in (0, 150, 300, 1199)] == [11, 21, 41, 1281]


def test_target_network_is_an_ema_updated_once_per_step():
    torch.manual_seed(0)
    model = FlowMap(TwoTimeMLP(dim=2, width=16, depth=1))
    cd = make_objective({"name": "cd", "target_decay": 0.5}, LINEAR)
    teacher = ExactVelocity(GAUSSIAN, LINEAR)
    cd.prepare(model, teacher)
    start = [p.clone() for p in cd.target.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    cd(model, GAUSSIAN.sample(8).float(), teacher=teacher, step=1)
    cd(model, GAUSSIAN.sample(8).float(), teacher=teacher, step=1)  # the same step again: no second update
    for old, new, live in zip(start, cd.target.parameters(), model.parameters()):
        assert torch.allclose(new, 0.5 * old + 0.5 * live)
    assert not any(p.requires_grad for p in cd.target.parameters())
    assert all(p is not q for p in trainable_parameters(model, cd) for q in cd.target.parameters())


@pytest.mark.parametrize("spec,match", [
    ({"name": "cd", "steps": 1}, "steps"),
    ({"name": "ct", "steps_start": 1}, "steps_start"),
    ({"name": "ct", "steps_start": 20, "steps_end": 10}, "steps_end"),
    ({"name": "pd", "initial_steps": 12}, "initial_steps"),
    ({"name": "pd", "initial_steps": 8, "final_steps": 8}, "final_steps"),
    ({"name": "shortcut", "min_gap": 0.3}, "min_gap"),
    ({"name": "ctm", "sampling_gamma": 2.0}, "sampling_gamma"),
    ({"name": "scd", "warmup_max": 0.0}, "warmup_max"),
])
def test_bad_baseline_options_are_refused_with_the_key_named(spec, match):
    with pytest.raises(ValueError, match=match):
        make_objective(spec, LINEAR)


def test_a_grid_the_schedule_cannot_reach_is_refused():
    with pytest.raises(ValueError, match="sigma_max"):
        make_objective({"name": "cd", "sigma_max": 500.0}, Interpolant("vp"))
    with pytest.raises(ValueError, match="inverse_gap"):
        make_objective({"name": "ct", "grid": "uniform", "time_weighting": "inverse_gap"}, LINEAR)


# -- training to the known answer ----------------------------------------------------------------

def train(spec, steps, *, batch=512, width=128, seed=0, interpolant=LINEAR):
    """Adam with cosine decay, the step counter running on (rounds and curricula depend on it); the map
    in the form its objective trains (TrigFlow for sCM on the trig schedule)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    objective = make_objective(spec, interpolant)
    model = make_flow_map(TwoTimeMLP(dim=2, width=width, depth=3), objective.map_form)
    teacher = ExactVelocity(GAUSSIAN, interpolant) if objective.needs_teacher else None
    objective.prepare(model, teacher)
    optimiser = torch.optim.Adam(trainable_parameters(model, objective), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for step in range(steps):
        train_step(model, objective, optimiser, GAUSSIAN.sample(batch, generator).float(), teacher=teacher,
                   step=step, grad_clip=1.0)
        schedule.step()
    return model.eval(), objective


@pytest.fixture(scope="module")
def consistency_distilled():
    return train({"name": "cd"}, 1000)


@pytest.mark.slow
def test_consistency_distillation_approaches_the_closed_form_consistency_function(consistency_distilled):
    """The optimal consistency function of a Gaussian is its exact map to the data end, X_{s,1}
    (docs/science.md §8.3); CD from the exact velocity must approach it at every time of its grid."""
    model, objective = consistency_distilled
    times = objective.grid_times(18)[:-1]
    g = torch.Generator().manual_seed(3)
    x1 = GAUSSIAN.sample(4000, g)
    errors = []
    for s in times.tolist():
        x_s = LINEAR.interpolate(s, torch.randn(x1.shape, generator=g, dtype=torch.float64), x1).x_t
        exact = GAUSSIAN.flow_map(LINEAR, s, 1.0, x_s)
        with torch.no_grad():
            learned = model(s, 1.0, x_s.float()).double()
        errors.append((learned - exact).pow(2).sum(1).mean().sqrt().item())
    print("CD consistency-function RMSE per grid time:", [round(e, 4) for e in errors])
    assert max(errors) < THRESHOLD_CD, [round(e, 3) for e in errors]


THRESHOLD_CD = 0.03  # measured: at most 0.016 over the grid (1000 steps)
# (spec, training steps, tolerance on mean / covariance entries at one and two steps), each set at
# about twice the error these settings reached here. Short runs need two departures from the paper
# defaults, named in the spec: EMA decays meant for 10^5 steps are lowered so the target network
# moves within the run, and sCM's learned weight (which rescales every loss to order one and so
# never lets a 600-step run settle) is replaced by the uniform one.
BASELINES = [
    ({"name": "ict", "curriculum_steps": 600}, 600, (0.04, 0.04)),
    ({"name": "ct", "curriculum_steps": 600, "target_decay": 0.0}, 600, (0.03, 0.25)),
    # sCD: covariance error 0.058 at two steps since times are proposed in noise level (0.03 before)
    ({"name": "scd", "warmup_steps": 100, "weighting": "uniform"}, 600, (0.035, 0.11)),
    ({"name": "sct", "warmup_steps": 100, "weighting": "uniform"}, 600, (0.03, 0.1)),
    ({"name": "ayf_emd", "warmup_steps": 100, "diagonal_fraction": 0.25}, 400, (0.05, 0.17)),
    ({"name": "ctm", "target_decay": 0.9, "steps": 10}, 400, (0.07, 0.16)),
    ({"name": "shortcut", "target_decay": 0.95, "diagonal_fraction": 0.5}, 600, (0.04, 0.25)),
    ({"name": "meanflow"}, 400, (0.18, 0.25)),
]


def check_moments(model, spec, tolerance, interpolant=LINEAR):
    sampler, kind = sampler_for(spec, interpolant, seed=2)
    x0 = torch.randn(20000, 2, generator=torch.Generator().manual_seed(1))
    for n in (1, 2):
        with torch.no_grad():
            mean_err, cov_err = moments(sampler(model, x0, n).samples)
        print(f"{spec['name']} ({kind}) at {n} step(s): mean {mean_err:.3f}, covariance {cov_err:.3f}")
        assert mean_err < tolerance[0] and cov_err < tolerance[1], \
            f"{spec['name']} ({kind}) at {n} step(s): mean {mean_err:.3f}, covariance {cov_err:.3f}"


@pytest.mark.slow
def test_consistency_distillation_reproduces_a_gaussian_at_one_and_two_steps(consistency_distilled):
    check_moments(consistency_distilled[0], {"name": "cd"}, (0.015, 0.025))


@pytest.mark.slow
@pytest.mark.parametrize("spec,steps,tolerance", BASELINES, ids=[b[0]["name"] for b in BASELINES])
def test_baseline_reproduces_a_gaussian_at_one_and_two_steps(spec, steps, tolerance):
    check_moments(train(spec, steps)[0], spec, tolerance)


# sCM as published: TrigFlow's map and F-space loss, the default on the trig schedule. Measured at
# these settings: sCD mean 0.009 / covariance 0.008 (0.005 / 0.005 at 600 steps), sCT 0.020 / 0.017
# (worst of 1 and 2 steps); the flow-map form on the same schedule reached 0.024 / 0.035 (sCD) and
# 0.019 / 0.027 (sCT) at 600 steps.
TRIGFLOW = [
    ({"name": "scd", "warmup_steps": 100, "weighting": "uniform"}, 400, (0.015, 0.015)),
    ({"name": "sct", "warmup_steps": 100, "weighting": "uniform"}, 600, (0.04, 0.04)),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec,steps,tolerance", TRIGFLOW, ids=[b[0]["name"] for b in TRIGFLOW])
def test_trigflow_scm_reproduces_a_gaussian_at_one_and_two_steps(spec, steps, tolerance):
    model, objective = train(spec, steps, interpolant=TRIG)
    assert objective.map_form == "trig" and model.form == "trig"
    check_moments(model, spec, tolerance, TRIG)


@pytest.mark.slow
def test_progressive_distillation_halves_the_steps_each_round():
    """After each round the student's N/2-step samples match, from the same noise, the N-step samples
    of that round's teacher: the Euler teacher in round 0, the frozen last student afterwards."""
    rounds, per_round = 4, 300
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = FlowMap(TwoTimeMLP(dim=2, width=128, depth=3))
    objective = make_objective({"name": "pd", "initial_steps": 16, "final_steps": 1, "round_steps": per_round},
                               LINEAR)
    teacher = ExactVelocity(GAUSSIAN, LINEAR)
    objective.prepare(model, teacher)
    optimiser = torch.optim.Adam(trainable_parameters(model, objective), lr=2e-3)
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    step = 0
    for r in range(rounds):
        for group in optimiser.param_groups:
            group["lr"] = 2e-3
        for k in range(per_round):
            for group in optimiser.param_groups:  # cosine decay within each round
                group["lr"] = 1e-3 * (1 + torch.cos(torch.tensor(torch.pi * k / per_round)).item())
            train_step(model, objective, optimiser, GAUSSIAN.sample(512, generator).float(), teacher=teacher,
                       step=step, grad_clip=1.0)
            step += 1
        n_teacher = 16 // 2**r
        with torch.no_grad():
            if r == 0:
                reference = solve_ode(teacher, x0.double(), "euler", steps=n_teacher).samples.float()
            else:
                reference = flow_map_sample(objective.teacher_map, x0, steps=n_teacher).samples
            student = flow_map_sample(model, x0, steps=n_teacher // 2).samples
        rmse = (student - reference).pow(2).sum(1).mean().sqrt().item()
        print(f"round {r}: {n_teacher // 2}-step student vs {n_teacher}-step teacher, RMSE {rmse:.4f}")
        assert rmse < 0.03, f"round {r}: {n_teacher // 2}-step student vs {n_teacher}-step teacher, RMSE {rmse:.3f}"
        if n_teacher // 2 <= 2:  # the 2-step student of round 2 and the 1-step student of round 3
            mean_err, cov_err = moments(student)
            print(f"  {n_teacher // 2}-step moments: mean {mean_err:.3f}, covariance {cov_err:.3f}")
            assert mean_err < 0.1 and cov_err < 0.2, (n_teacher // 2, mean_err, cov_err)
