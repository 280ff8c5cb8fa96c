"""Samplers: orders of accuracy on an exact Gaussian flow, NFE accounting, determinism, bad grids."""

import math

import pytest
import torch

from fmm.groundtruth import BoxMixture, ExactVelocity, GaussianTarget
from fmm.interpolants import Interpolant
from fmm.metrics import gaussian_w2
from fmm.sampling import flow_map_sample, solve_ode, time_grid

F64 = torch.float64


def target() -> GaussianTarget:
    return GaussianTarget(torch.tensor([3.0, -1.0], dtype=F64), torch.tensor([[2.0, 1.2], [1.2, 1.0]], dtype=F64))


def pushforward_of_base(method: str, steps: int, interp: Interpolant, gauss: GaussianTarget):
    """An explicit RK solve of an affine ODE is an affine map x -> M x + c, so the pushforward of
    N(0, sigma0^2 I) is exactly N(c, sigma0^2 M M^T): read M and c off the solver itself."""
    field = ExactVelocity(gauss, interp)
    points = torch.cat([torch.zeros(1, 2, dtype=F64), torch.eye(2, dtype=F64)])
    out = solve_ode(field, points, method, steps=steps).samples
    c, m = out[0], (out[1:] - out[0]).T
    return c, interp.sigma0**2 * m @ m.T


@pytest.mark.parametrize("schedule", ["linear", "trig"])
def test_euler_w2_error_falls_at_first_order(schedule):
    interp, gauss = Interpolant(schedule), target()
    errors = []
    for n in (8, 16, 32, 64, 128):
        mean, cov = pushforward_of_base("euler", n, interp, gauss)
        errors.append(gaussian_w2(mean, cov, gauss.mean, gauss.covariance))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.8 < r < 2.2 for r in ratios[1:]), f"W2 {errors} halving ratios {ratios}"


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_fixed_step_solvers_converge_at_their_order(method, order):
    interp, gauss = Interpolant("trig", sigma0=1.3), target()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = gauss.flow_map(interp, 0.0, 1.0, x)
    errors = [(solve_ode(ExactVelocity(gauss, interp), x, method, steps=n).samples - exact).abs().max().item()
              for n in (16, 32, 64)]
    observed = math.log2(errors[1] / errors[2])
    assert abs(observed - order) < 0.3, f"{method}: errors {errors}, observed order {observed:.2f}"


def test_nfe_is_what_the_solver_spends():
    field = ExactVelocity(target(), Interpolant("linear"))
    x = torch.zeros(4, 2, dtype=F64)
    assert solve_ode(field, x, "euler", steps=7).nfe == 7
    assert solve_ode(field, x, "heun", steps=7).nfe == 14
    assert solve_ode(field, x, "heun", steps=7, last_step_euler=True).nfe == 13
    assert solve_ode(field, x, "rk4", steps=5).nfe == 20
    assert solve_ode(field, x, "rk4", steps=5, last_step_euler=True).nfe == 17
    assert flow_map_sample(lambda s, t, y: y, x, steps=16).nfe == 16


def test_dopri5_meets_its_tolerance_and_counts_nfe():
    interp, gauss = Interpolant("linear"), target()
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    exact = gauss.flow_map(interp, 0.0, 1.0, x)
    loose = solve_ode(ExactVelocity(gauss, interp), x, "dopri5", rtol=1e-4, atol=1e-4)
    tight = solve_ode(ExactVelocity(gauss, interp), x, "dopri5", rtol=1e-9, atol=1e-9, norm="max")
    assert (tight.samples - exact).abs().max() < 1e-7
    assert (loose.samples - exact).abs().max() < 5e-2  # the rms norm lets single samples exceed rtol
    assert 6 <= loose.nfe < tight.nfe


def test_solvers_run_backward_in_time():
    interp, gauss = Interpolant("linear"), target()
    x1 = gauss.sample(32, torch.Generator().manual_seed(2))
    back = solve_ode(ExactVelocity(gauss, interp), x1, "rk4", grid=torch.linspace(1, 0, 65, dtype=F64)).samples
    torch.testing.assert_close(back, gauss.flow_map(interp, 1.0, 0.0, x1), rtol=0, atol=1e-6)


def test_flow_map_sampler_with_the_exact_map_is_exact_at_every_step_count():
    interp, gauss = Interpolant("trig"), target()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    exact = gauss.flow_map(interp, 0.0, 1.0, x)
    for n in (1, 2, 4, 8, 16):
        result = flow_map_sample(lambda s, t, y: gauss.flow_map(interp, s, t, y), x, steps=n)
        torch.testing.assert_close(result.samples, exact, rtol=0, atol=1e-12)
        assert result.nfe == n
    custom = flow_map_sample(lambda s, t, y: gauss.flow_map(interp, s, t, y), x, grid=[0.0, 0.1, 0.7, 1.0])
    torch.testing.assert_close(custom.samples, exact, rtol=0, atol=1e-12)


def test_samples_are_a_deterministic_function_of_the_noise():
    field = ExactVelocity(BoxMixture.checkerboard(), Interpolant("linear"))
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    for method in ("euler", "heun", "rk4"):
        a = solve_ode(field, x, method, steps=8, last_step_euler=True).samples
        b = solve_ode(field, x.clone(), method, steps=8, last_step_euler=True).samples
        assert torch.equal(a, b)


def test_singular_velocity_needs_last_step_euler_and_dopri5_stops_short_of_it():
    field = ExactVelocity(BoxMixture.checkerboard(), Interpolant("linear"))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    with pytest.raises(ValueError, match="singular at t = 1"):
        solve_ode(field, x, "heun", steps=4)
    out = solve_ode(field, x, "dopri5", rtol=1e-5, atol=1e-5)
    assert bool(torch.isfinite(out.samples).all())


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of steps"),
    ({"steps": 0}, "positive integer"),
    ({"grid": [0.0]}, "at least two"),
    ({"grid": [0.0, 0.5, 0.4, 1.0]}, "strictly increasing or strictly decreasing"),
    ({"grid": [0.0, 1.2]}, r"must lie in \[0, 1\]"),
])
def test_bad_time_grids_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_grid(**kwargs)


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match=r"unknown ODE solver 'rk45'.*dopri5"):
        solve_ode(lambda t, x: x, torch.zeros(2, 2), "rk45", steps=4)
