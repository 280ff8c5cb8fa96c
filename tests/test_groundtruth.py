"""Exact ground truth checked against independent answers: the continuity equation, Monte Carlo,
the flow-map laws of the Gaussian closed form, and the float64 reference ODE map."""

import math

import pytest
import torch

from fmm.groundtruth import (BoxMixture, ExactVelocity, GaussianMixture, GaussianTarget, make_target,
                             reference_flow_map)
from fmm.interpolants import Interpolant, WarpedSchedule

F64 = torch.float64


def three_component_mixture(dim: int = 2) -> GaussianMixture:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(dim, dim, generator=g, dtype=F64)
    full = a @ a.T + 0.3 * torch.eye(dim, dtype=F64)
    covs = torch.stack([full, 0.5 * torch.eye(dim, dtype=F64), torch.diag(torch.linspace(0.2, 1.0, dim, dtype=F64))])
    means = 2.0 * torch.randn(3, dim, generator=g, dtype=F64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, covs)


def gaussian_target() -> GaussianTarget:
    cov = torch.tensor([[2.0, 0.8, 0.1], [0.8, 1.0, -0.3], [0.1, -0.3, 0.5]], dtype=F64)
    return GaussianTarget(torch.tensor([1.0, -2.0, 0.5], dtype=F64), cov)


def warped() -> Interpolant:
    return Interpolant(WarpedSchedule(1.2, -0.7), sigma0=0.8)


INTERPOLANTS = {
    "linear": lambda: Interpolant("linear"),
    "trig": lambda: Interpolant("trig", sigma0=1.5),
    "vp": lambda: Interpolant("vp"),
    "warped": warped,
    "latent": lambda: Interpolant("linear", latent_noise=0.5),
}


def continuity_residual(target, interp: Interpolant, x: torch.Tensor, t: float, h: float = 1e-5) -> float:
    """max |d/dt rho + div(b rho)| / max |d/dt rho| by central differences, in float64."""
    def rho(tt, xx):
        return target.log_density(interp, tt, xx).exp()

    def flux(tt, xx):
        return target.velocity(interp, tt, xx) * rho(tt, xx)[:, None]

    dt_rho = (rho(t + h, x) - rho(t - h, x)) / (2 * h)
    div = torch.zeros_like(dt_rho)
    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = h
        div = div + (flux(t, x + e)[:, j] - flux(t, x - e)[:, j]) / (2 * h)
    return ((dt_rho + div).abs().max() / dt_rho.abs().max()).item()


@pytest.mark.parametrize("interp_name", list(INTERPOLANTS))
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_mixture_velocity_satisfies_continuity_equation(interp_name, t):
    interp = INTERPOLANTS[interp_name]()
    target = three_component_mixture(dim=2)
    g = torch.Generator().manual_seed(1)
    x1 = target.sample(64, g)
    x = interp.interpolate(t, interp.base_sample(x1.shape, g, F64), x1,
                           torch.randn(x1.shape, generator=g, dtype=F64)).x_t
    assert continuity_residual(target, interp, x, t) < 1e-5


def test_mixture_velocity_satisfies_continuity_equation_in_five_dimensions():
    interp = Interpolant("trig")
    target = three_component_mixture(dim=5)
    x = 2 * torch.randn(64, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert continuity_residual(target, interp, x, 0.6) < 1e-5


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.95])
@pytest.mark.parametrize("interp_name", ["linear", "trig", "latent"])
def test_checkerboard_velocity_satisfies_continuity_equation(interp_name, t):
    interp = INTERPOLANTS[interp_name]()
    board = BoxMixture.checkerboard()
    g = torch.Generator().manual_seed(4)
    x1 = board.sample(64, g)
    x = interp.interpolate(t, interp.base_sample(x1.shape, g, F64), x1,
                           torch.randn(x1.shape, generator=g, dtype=F64)).x_t
    assert continuity_residual(board, interp, x, t) < 1e-5


def snis_velocity(target, interp: Interpolant, t: float, x: torch.Tensor, draws: int, g: torch.Generator):
    """Monte Carlo E[dI_t/dt | I_t = x] from the interpolant's definition alone (gamma = 0):
    given x1, I_t = x forces x0 = (x - beta x1) / alpha, so x1 is drawn from the target and weighted
    by the Gaussian likelihood of x0. Returns the estimate and its standard error."""
    coef = interp.coefficients(torch.tensor(t, dtype=F64))
    x1 = target.sample(draws, g)
    x0 = (x[:, None, :] - coef.beta * x1[None]) / coef.alpha                      # [P, M, d]
    logw = -0.5 * (x0**2).sum(-1) / interp.sigma0**2
    w = torch.softmax(logw, dim=1)
    f = coef.dalpha * x0 + coef.dbeta * x1[None]
    est = (w[..., None] * f).sum(1)
    se = ((w[..., None] ** 2) * (f - est[:, None]) ** 2).sum(1).sqrt()
    return est, se


@pytest.mark.parametrize("name", ["mixture", "checkerboard"])
@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_exact_velocity_agrees_with_monte_carlo_conditional_expectation(name, t):
    target = three_component_mixture() if name == "mixture" else BoxMixture.checkerboard()
    interp = Interpolant("trig")
    g = torch.Generator().manual_seed(5)
    x1 = target.sample(16, g)
    x = interp.interpolate(t, interp.base_sample(x1.shape, g, F64), x1).x_t
    est, se = snis_velocity(target, interp, t, x, 400_000, g)
    exact = target.velocity(interp, t, x)
    z = ((est - exact).abs() / se).max().item()
    assert z < 5.0, f"Monte Carlo disagrees by {z:.1f} standard errors"
    assert se.max().item() < 0.1  # the check has teeth: the estimate is tight


def test_mixture_score_and_denoiser_are_consistent_with_density_and_velocity():
    interp = Interpolant("linear", sigma0=1.2)
    target = three_component_mixture(dim=3)
    t = torch.full((20,), 0.4, dtype=F64)
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(6), dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(target.log_density(interp, t, x).sum(), x)
    torch.testing.assert_close(target.score(interp, t, x.detach()), grad)
    # For gamma = 0: b = (alpha'/alpha) x + (beta' - alpha' beta / alpha) D (docs/science.md §1.1).
    coef = interp.coefficients(t)
    d = target.denoiser(interp, t, x.detach())
    expected = (coef.dalpha / coef.alpha)[:, None] * x.detach() + \
        (coef.dbeta - coef.dalpha * coef.beta / coef.alpha)[:, None] * d
    torch.testing.assert_close(target.velocity(interp, t, x.detach()), expected)


def test_checkerboard_numerical_regimes_agree_where_both_apply():
    """The quadrature and closed-form branches must give the same posterior on their shared ground."""
    from fmm.groundtruth import checkerboard as cb

    board = BoxMixture.checkerboard()
    interp = Interpolant("linear")
    x = 1.5 * torch.randn(200, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    for t in (0.2, 0.35, 0.5):
        tt = torch.full((200,), t, dtype=F64)
        # With width 1 and sigma0 = 1 the switch beta w <= 2 sqrt(c) happens near t = 0.67: below it
        # the code takes quadrature, so compare against the closed form computed directly.
        coef = interp.coefficients(tt)
        c, _ = interp.noise_variance(tt)
        sd, beta = c.sqrt()[:, None, None], coef.beta[:, None, None]
        a_std = (beta * board.lows[None] - x[:, None]) / sd
        b_std = (beta * board.highs[None] - x[:, None]) / sd
        log_mass, ratio = cb._truncated_normal(a_std, b_std)
        mean_exact = (x[:, None] + sd * ratio) / beta
        _, mean_code, *_ = board._posterior(interp, tt, x)
        torch.testing.assert_close(mean_code, mean_exact, rtol=1e-10, atol=1e-10)


def test_checkerboard_velocity_refuses_the_singular_end():
    board = BoxMixture.checkerboard()
    with pytest.raises(ValueError, match="singular at t = 1"):
        board.velocity(Interpolant("linear"), 1.0, torch.zeros(3, 2, dtype=F64))


def test_checkerboard_velocity_is_finite_far_from_the_board_near_the_end():
    board = BoxMixture.checkerboard()
    x = torch.tensor([[3679.0, 0.04], [-9e16, 3e12], [0.5, 0.5]], dtype=F64)
    b = board.velocity(Interpolant("linear"), board.t_max, x)
    assert bool(torch.isfinite(b).all())


# --- the Gaussian closed form -------------------------------------------------------------------

@pytest.fixture(params=list(INTERPOLANTS))
def interp(request):
    return INTERPOLANTS[request.param]()


def random_points(n=32, seed=8):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, 3, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64), \
        torch.rand(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64)


def test_gaussian_map_identity_semigroup_and_inverse(interp):
    target = gaussian_target()
    x, s, u, t = random_points()
    torch.testing.assert_close(target.flow_map(interp, s, s, x), x, rtol=0, atol=1e-12)
    two_jumps = target.flow_map(interp, u, t, target.flow_map(interp, s, u, x))
    torch.testing.assert_close(two_jumps, target.flow_map(interp, s, t, x), rtol=1e-10, atol=1e-10)
    back = target.flow_map(interp, t, s, target.flow_map(interp, s, t, x))
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-10)


def test_gaussian_map_tangent_condition_and_lagrangian_equation(interp):
    target = gaussian_target()
    x, s, _, t = random_points()
    s, t = 0.05 + 0.9 * s, 0.05 + 0.9 * t
    h = 1e-6
    # Tangent: d/dt X_{s,t}(x) at t = s is the velocity b_s(x).
    tangent = (target.flow_map(interp, s, s + h, x) - target.flow_map(interp, s, s - h, x)) / (2 * h)
    torch.testing.assert_close(tangent, target.velocity(interp, s, x), rtol=1e-6, atol=1e-6)
    # Lagrangian: d/dt X_{s,t}(x) = b_t(X_{s,t}(x)) everywhere.
    dt = (target.flow_map(interp, s, t + h, x) - target.flow_map(interp, s, t - h, x)) / (2 * h)
    torch.testing.assert_close(dt, target.velocity(interp, t, target.flow_map(interp, s, t, x)), rtol=1e-6, atol=1e-6)


def test_gaussian_map_pushes_base_to_target():
    interp = Interpolant("linear")
    target = gaussian_target()
    x0 = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    x1 = target.flow_map(interp, 0.0, 1.0, x0)
    torch.testing.assert_close(x1.mean(0), target.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x1.T), target.covariance, atol=0.02, rtol=0)
    # With sigma0 = 1 in the linear schedule the map is x -> mu + Sigma^{1/2} x (docs/science.md §8.2).
    vals, vecs = torch.linalg.eigh(target.covariance)
    root = (vecs * vals.sqrt()) @ vecs.T
    torch.testing.assert_close(x1[:5], target.mean + x0[:5] @ root.T)


@pytest.mark.parametrize("interp_name", ["linear", "trig", "warped", "latent"])
def test_reference_ode_map_matches_gaussian_closed_form(interp_name):
    interp = INTERPOLANTS[interp_name]()
    target = gaussian_target()
    x, s, _, t = random_points(n=24)
    s[:4], t[:4] = 0.0, 1.0          # full forward maps
    s[4:8], t[4:8] = 1.0, 0.0        # full backward maps
    t[8] = s[8]                      # the identity
    ref = reference_flow_map(ExactVelocity(target, interp), s, t, x)
    torch.testing.assert_close(ref, target.flow_map(interp, s, t, x), rtol=0, atol=1e-8)


def test_reference_map_of_the_checkerboard_lands_in_the_boxes():
    board = BoxMixture.checkerboard()
    interp = Interpolant("linear")
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(10), dtype=F64)
    x1 = reference_flow_map(ExactVelocity(board, interp), 0.0, 1.0, x0)
    inside = ((x1[:, None] >= board.lows - 1e-3) & (x1[:, None] <= board.highs + 1e-3)).all(-1).any(-1)
    assert bool(inside.all())


def test_mixture_constructor_and_targets_refuse_bad_input():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"weights must be \[2\]"):
        GaussianMixture(torch.ones(3), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    with pytest.raises(ValueError, match="unknown target 'moons'"):
        make_target("moons")
    with pytest.raises(ValueError, match=r"x must be \[B, 2\]"):
        GaussianMixture.flower().velocity(Interpolant("linear"), 0.5, torch.zeros(4, 3))
    assert math.isclose(GaussianMixture.flower().weights.sum().item(), 1.0)
