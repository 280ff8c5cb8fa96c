"""Every objective evaluated at the exact Gaussian flow map: deterministic residuals vanish, residuals
against the noisy dI_t vanish in the batch mean, and all of them move off zero at a wrong map."""

import pytest
import torch

from fmm.groundtruth import ExactVelocity, GaussianFlowMap, GaussianTarget
from fmm.interpolants import Interpolant, WarpedSchedule
from fmm.objectives import make_objective

F64 = torch.float64

INTERPOLANTS = {
    "linear": lambda: Interpolant("linear"),
    "trig": lambda: Interpolant("trig", sigma0=1.4),
    "warped": lambda: Interpolant(WarpedSchedule(1.0, -0.5), sigma0=0.8),
    "latent": lambda: Interpolant("linear", latent_noise=0.3),
}

# (objective spec, which terms are deterministic at the exact map)
DETERMINISTIC = {
    "lmd": {"name": "lmd", "diagonal_fraction": 0.25},
    "lmd_no_sg": {"name": "lmd", "diagonal_fraction": 0.25, "stop_gradient": False},
    "emd": {"name": "emd", "diagonal_fraction": 0.25},
    "emd_full": {"name": "emd", "diagonal_fraction": 0.25, "semigradient": False},
    "pfmm": {"name": "pfmm", "diagonal_fraction": 0.25, "round_steps": 10},
    "lsd": {"name": "lsd"},
    "esd": {"name": "esd"},
    "psd_uniform": {"name": "psd", "split": "uniform"},
    "psd_midpoint": {"name": "psd", "split": "midpoint"},
    "lmd_slope": {"name": "lmd", "diagonal_fraction": 0.25, "gradient": "slope"},
    "emd_slope": {"name": "emd", "diagonal_fraction": 0.25, "gradient": "slope"},
    "lsd_slope": {"name": "lsd", "gradient": "slope"},
    "esd_slope": {"name": "esd", "gradient": "slope"},
    # baselines whose target is exact at the true map (full tangent, no clipping, rounds past the first)
    "scd": {"name": "scd", "warmup_steps": 0},
    "ayf_emd": {"name": "ayf_emd", "warmup_steps": 0, "warmup_max": 1.0, "diagonal_fraction": 0.25},
    "shortcut": {"name": "shortcut", "clip": None, "diagonal_fraction": 0.25},
    "pd": {"name": "pd", "initial_steps": 16, "round_steps": 10},
}


def gaussian() -> GaussianTarget:
    cov = torch.tensor([[1.5, 0.6, 0.0], [0.6, 1.0, -0.2], [0.0, -0.2, 0.4]], dtype=F64)
    return GaussianTarget(torch.tensor([2.0, -1.0, 0.5], dtype=F64), cov)


class WrongMap(GaussianFlowMap):
    """The exact map bent by 0.3 (t - s)(1 + tanh(x)): smooth, right on the diagonal, but no flow
    (neither a semigroup nor invertible) and off the true trajectories."""

    def _map(self, s, t, x):
        return super()._map(s, t, x) + 0.3 * (t - s)[:, None] * (1 + torch.tanh(x))

    def _slope(self, s, t, x):
        return super()._slope(s, t, x) + 0.3 * (1 + torch.tanh(x))


def terms_at(wrong, interp, spec, batch=512, seed=0, step=25):
    truth = gaussian()
    model = (WrongMap if wrong else GaussianFlowMap)(truth, interp)
    teacher = ExactVelocity(truth, interp)
    objective = make_objective(dict(spec), interp)
    objective.prepare(model, teacher)
    torch.manual_seed(seed)
    x1 = truth.sample(batch, torch.Generator().manual_seed(seed))
    return objective.terms(model, x1, teacher, step=step)


@pytest.mark.parametrize("interp_name", list(INTERPOLANTS))
@pytest.mark.parametrize("key", list(DETERMINISTIC))
def test_deterministic_residuals_vanish_at_the_exact_map(key, interp_name):
    interp = INTERPOLANTS[interp_name]()
    spec = DETERMINISTIC[key]
    terms = terms_at(False, interp, spec)
    off = terms["offdiagonal"].residual
    assert off.abs().max().item() < 1e-10
    if spec["name"] in ("lmd", "emd", "pfmm", "ayf_emd"):  # distillation: the diagonal regresses onto the teacher
        assert terms["diagonal"].residual.abs().max().item() < 1e-12


@pytest.mark.parametrize("key", list(DETERMINISTIC))
@pytest.mark.parametrize("step", [0, 25])
def test_deterministic_residuals_move_off_zero_at_a_wrong_map(key, step):
    off = terms_at(True, Interpolant("linear"), DETERMINISTIC[key], step=step)["offdiagonal"].residual
    assert off.abs().max().item() > 1e-3


def test_two_map_invertibility_term_vanishes_and_its_flow_term_is_unbiased():
    interp = INTERPOLANTS["trig"]()
    spec = {"name": "two_map", "invertibility_weight": 2.0}
    residual = terms_at(False, interp, spec, batch=40000)["offdiagonal"].residual
    flow, inverse = residual[:, :3], residual[:, 3:]
    assert inverse.abs().max().item() < 1e-10
    mean, se = flow.mean(0), flow.std(0) / flow.shape[0] ** 0.5
    assert bool((mean.abs() < 4 * se).all()), (mean, se)
    wrong = terms_at(True, interp, spec, batch=40000)["offdiagonal"].residual
    assert wrong[:, 3:].abs().max().item() > 1e-2


@pytest.mark.parametrize("interp_name", ["linear", "trig", "latent"])
@pytest.mark.parametrize("spec", [{"name": "flow_matching"}, {"name": "eulerian_direct"},
                                  {"name": "eulerian_direct", "gradient": "slope"}, {"name": "meanflow"},
                                  {"name": "lsd", "diagonal_fraction": 1.0}])
def test_noisy_target_residuals_vanish_in_the_batch_mean(spec, interp_name):
    """Residuals against dI_t have an irreducible variance: at the true map their mean is zero (within
    4 standard errors at a large batch), at a wrong map it is not."""
    interp = INTERPOLANTS[interp_name]()
    key = "diagonal" if spec.get("diagonal_fraction", 0) == 1.0 or spec["name"] == "flow_matching" else "offdiagonal"
    r = terms_at(False, interp, spec, batch=40000)[key].residual
    mean, se = r.mean(0), r.std(0) / r.shape[0] ** 0.5
    assert bool((mean.abs() < 4 * se).all()), (mean, se)
    wrong = terms_at(True, interp, spec, batch=40000)[key].residual
    assert wrong.mean(0).abs().max() > 10 * se.max()


def test_pfmm_round_zero_teacher_is_one_euler_step_of_the_velocity():
    """In round 0 the teacher is x + (t - s) b_s(x): at the exact map the residual is the Euler error,
    O(gap^2), not zero; from round 1 on the teacher is the (here exact) map and it vanishes."""
    interp = Interpolant("linear")
    truth = gaussian()
    model = GaussianFlowMap(truth, interp)
    teacher = ExactVelocity(truth, interp)
    objective = make_objective({"name": "pfmm", "round_steps": 10, "initial_gap": 0.125}, interp)
    objective.prepare(model, teacher)
    x1 = truth.sample(2000, torch.Generator().manual_seed(1))
    r0 = objective.terms(model, x1, teacher, step=0)["offdiagonal"]
    gap = (r0.t - r0.s)
    assert gap.max() <= 0.25 + 1e-12
    assert r0.residual.abs().max() > 1e-6
    assert (r0.residual.norm(dim=1) / gap.clamp(min=1e-3) ** 2).max() < 10  # second order in the gap
    r1 = objective.terms(model, x1, teacher, step=10)["offdiagonal"]
    assert r1.residual.abs().max() < 1e-10
    assert int(objective.round) == 1 and (r1.t - r1.s).max() <= 0.5 + 1e-12


def trajectory_residual(steps, wrong=False, endpoint_fraction=0.0):
    spec = {"name": "trajectory", "trajectories": 256, "solver": "rk4", "solver_steps": steps,
            "endpoint_fraction": endpoint_fraction}
    return terms_at(wrong, Interpolant("linear", sigma0=0.8), spec)["offdiagonal"]


def test_trajectory_regression_residual_at_the_exact_map_is_the_solvers_error():
    """Its targets are RK4 solutions of the exact velocity: at the exact map the residual is RK4's global
    error, fourth order (doubling the steps divides it by about 16), and a wrong map moves it off."""
    coarse, fine = (trajectory_residual(k).residual.abs().max().item() for k in (8, 16))
    assert fine < 1e-5 and 10 < coarse / fine < 25, (coarse, fine)
    assert trajectory_residual(16, wrong=True).residual.abs().max().item() > 1e-2
    ends = trajectory_residual(16, endpoint_fraction=0.5)
    half = ends.s.shape[0] // 2
    assert bool((ends.s[:half] == 0).all() and (ends.t[:half] == 1).all())
    assert bool((ends.s < ends.t).all())  # every pair off the diagonal


def test_pseudo_huber_distance_is_icts_and_trajectory_regression_can_use_it():
    """sqrt(|r|^2 + c^2) - c over the whole sample (iCT 2310.14189 §3.3), c = 0.00054 sqrt(D) by default
    (iCT's own objective keeps it); trajectory regression's residuals take it when asked, the square
    otherwise."""
    from fmm.objectives.base import Term, per_sample_distance

    r = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-6, 0.0]], dtype=F64)
    assert torch.allclose(per_sample_distance(r, "pseudo_huber", 1.0), torch.tensor([26**0.5 - 1, 0, 0], dtype=F64))
    c = 0.00054 * 2**0.5
    assert per_sample_distance(r, "pseudo_huber")[0].item() == pytest.approx((25 + c * c) ** 0.5 - c)
    assert torch.allclose(per_sample_distance(r, "l2"), torch.tensor([12.5, 0, 5e-13], dtype=F64))
    term = trajectory_residual(16, wrong=True)
    for spec, expected in (({}, term.residual.pow(2).mean(1)),
                           ({"distance": "pseudo_huber", "huber_c": 0.01},
                            (term.residual.pow(2).sum(1) + 1e-4).sqrt() - 0.01)):
        objective = make_objective({"name": "trajectory", **spec}, Interpolant("linear", sigma0=0.8))
        assert torch.allclose(objective.per_sample_loss(term), expected)
    ict = make_objective({"name": "ict"}, Interpolant("linear"))
    assert torch.allclose(ict.per_sample_loss(Term(r, r[:, 0], r[:, 0])), per_sample_distance(r, "pseudo_huber"))


def test_trajectory_regression_ends_a_singular_teacher_with_an_euler_step():
    """The checkerboard's velocity is singular at t = 1: the teacher's solutions end with one Euler step
    and land on the board, so no t_max is needed unless the diagonal term samples times up to 1."""
    from fmm.evaluation.protocol import box_log_density
    from fmm.groundtruth import BoxMixture

    interp = Interpolant("linear", sigma0=0.6)
    board = BoxMixture.checkerboard()
    teacher = ExactVelocity(board, interp)
    objective = make_objective({"name": "trajectory", "trajectories": 500, "solver_steps": 16}, interp)
    model = GaussianFlowMap(GaussianTarget(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)), interp)
    objective.prepare(model, teacher)
    assert objective.path is None  # configuration checks call prepare(): the solve waits for the first step
    objective.terms(model, board.sample(8, torch.Generator().manual_seed(0)), teacher)
    ends = objective.path[-1].double()
    assert torch.isfinite(box_log_density(board)(ends)).double().mean() > 0.97
    with pytest.raises(ValueError, match="singular beyond t"):
        make_objective({"name": "trajectory", "diagonal_fraction": 0.25}, interp).prepare(model, teacher)
