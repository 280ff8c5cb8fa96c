"""Schedules and interpolants: exact derivatives, boundary conditions and argument errors."""

import math

import pytest
import torch

from fmm.interpolants import SCHEDULES, Interpolant, VelocityOnPath, WarpedSchedule, make_schedule

F64 = torch.float64

SCHEDULE_CASES = [
    ("linear", {}),
    ("trig", {}),
    ("vp", {}),
    ("vp", {"beta_min": 0.5, "beta_max": 5.0}),
    ("warped", {}),
    ("warped", {"k_noise": 2.5, "k_data": -1.5}),
    ("warped", {"k_noise": -6.0, "k_data": 6.0}),
]


@pytest.mark.parametrize("name,params", SCHEDULE_CASES)
def test_schedule_derivatives_match_autograd(name, params):
    schedule = make_schedule(name, **params)
    # VP's alpha' is infinite at t = 1, so stay inside the open interval there.
    t = torch.linspace(0.0, 0.999, 57, dtype=F64, requires_grad=True)
    coef = schedule(t)
    for value, derivative in ((coef.alpha, coef.dalpha), (coef.beta, coef.dbeta)):
        (auto,) = torch.autograd.grad(value.sum(), t, retain_graph=True)
        torch.testing.assert_close(derivative, auto, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,params", [c for c in SCHEDULE_CASES if c[0] != "vp"])
def test_schedule_meets_boundary_conditions(name, params):
    coef = make_schedule(name, **params)(torch.tensor([0.0, 1.0], dtype=F64))
    torch.testing.assert_close(coef.alpha, torch.tensor([1.0, 0.0], dtype=F64), atol=1e-15, rtol=0)
    torch.testing.assert_close(coef.beta, torch.tensor([0.0, 1.0], dtype=F64), atol=1e-15, rtol=0)


def test_vp_schedule_is_exact_at_data_end_and_approximate_at_noise_end():
    coef = make_schedule("vp", beta_min=0.1, beta_max=20.0)(torch.tensor([0.0, 1.0], dtype=F64))
    assert coef.alpha[1] == 0 and coef.beta[1] == 1
    big_t0 = 0.5 * (20.0 - 0.1) + 0.1
    assert math.isclose(coef.beta[0].item(), math.exp(-0.5 * big_t0), rel_tol=1e-12)
    assert math.isclose(coef.alpha[0].item() ** 2 + coef.beta[0].item() ** 2, 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("k_noise,k_data", [(-20, 20), (20, -20), (0.3, 0.3), (-3.7, 11.0)])
def test_warped_family_meets_boundaries_and_is_monotone_for_every_parameter(k_noise, k_data):
    t = torch.linspace(0, 1, 1001, dtype=F64)
    coef = WarpedSchedule(k_noise, k_data)(t)
    assert coef.alpha[0] == 1 and coef.alpha[-1] == 0 and coef.beta[0] == 0 and coef.beta[-1] == 1
    assert bool((coef.dalpha < 0).all()) and bool((coef.dbeta > 0).all())


def test_warped_with_zero_parameters_is_the_linear_schedule():
    t = torch.rand(100, dtype=F64)
    a, b = WarpedSchedule(0, 0)(t), make_schedule("linear")(t)
    for field in ("alpha", "beta", "dalpha", "dbeta"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field))


def test_interpolate_matches_its_definition_and_time_derivative():
    interp = Interpolant("trig", sigma0=0.7, latent_noise=0.3)
    g = torch.Generator().manual_seed(0)
    x0, x1, z = (torch.randn(16, 3, generator=g, dtype=F64) for _ in range(3))
    t = torch.rand(16, generator=g, dtype=F64) * 0.9 + 0.05
    sample = interp.interpolate(t, x0, x1, z)
    h = 1e-6
    fd = (interp.interpolate(t + h, x0, x1, z).x_t - interp.interpolate(t - h, x0, x1, z).x_t) / (2 * h)
    torch.testing.assert_close(sample.dx_t, fd, rtol=1e-7, atol=1e-8)
    gamma = torch.sqrt(0.3 * t * (1 - t))[:, None]
    expected = torch.cos(math.pi * t / 2)[:, None] * x0 + torch.sin(math.pi * t / 2)[:, None] * x1 + gamma * z
    torch.testing.assert_close(sample.x_t, expected)


def test_noise_variance_derivative_matches_finite_differences():
    interp = Interpolant("warped", sigma0=1.3, latent_noise=0.5)
    interp.schedule = WarpedSchedule(1.0, -0.5)
    t = torch.linspace(0.01, 0.99, 40, dtype=F64)
    c, dc = interp.noise_variance(t)
    h = 1e-6
    fd = (interp.noise_variance(t + h)[0] - interp.noise_variance(t - h)[0]) / (2 * h)
    torch.testing.assert_close(dc, fd, rtol=1e-7, atol=1e-9)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown schedule 'cosine'.*linear"):
        make_schedule("cosine")
    with pytest.raises(ValueError, match=r"schedule 'warped' takes.*k_data.*unknown \['k'\]"):
        make_schedule("warped", k=1.0)
    with pytest.raises(ValueError, match="k_noise must be a real number"):
        WarpedSchedule(k_noise=float("nan"))
    assert set(SCHEDULES) == {"linear", "trig", "vp", "warped"}


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_time_outside_unit_interval_is_refused(bad):
    interp = Interpolant("linear")
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        interp.interpolate(torch.tensor([0.2, 0.3, bad, 0.5]), x, x)


def test_shape_mismatches_are_refused_not_broadcast():
    interp = Interpolant("linear")
    with pytest.raises(ValueError, match=r"x0 and x1 must have the same shape"):
        interp.interpolate(0.5, torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"vector of shape \(4,\)"):
        interp.interpolate(torch.full((3,), 0.5), torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="latent noise"):
        Interpolant("linear", latent_noise=0.1).interpolate(0.5, torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="sigma0"):
        Interpolant("linear", sigma0=0.0)


# -- a velocity moved from one path to another ------------------------------------------------------------

PATHS = {"linear": lambda: Interpolant("linear", sigma0=0.5), "trig": lambda: Interpolant("trig", sigma0=0.5),
         "warped": lambda: Interpolant(WarpedSchedule(1.0, -0.5), sigma0=0.5)}


@pytest.mark.parametrize("source,target", [(a, b) for a in PATHS for b in PATHS if a != b])
def test_an_exact_velocity_moved_to_another_path_is_that_paths_exact_velocity(source, target):
    from fmm.groundtruth import ExactVelocity, GaussianMixture

    mixture = GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64), torch.tensor([[1.0, -1.0], [-2.0, 0.5]], dtype=F64),
                              torch.tensor([[[0.5, 0.2], [0.2, 0.3]], [[0.2, 0.0], [0.0, 0.6]]], dtype=F64))
    a, b = PATHS[source](), PATHS[target]()
    moved = VelocityOnPath(ExactVelocity(mixture, a), a, b)
    t = torch.cat([torch.tensor([0.0, 1e-6, 0.5, 1 - 1e-6]), torch.rand(300)]).double()
    x = torch.randn(304, 2, dtype=torch.float64)
    torch.testing.assert_close(moved(t, x), ExactVelocity(mixture, b)(t, x), rtol=0, atol=1e-10)


def test_a_velocity_moves_only_between_paths_of_the_same_noise():
    linear = Interpolant("linear", sigma0=0.5)
    with pytest.raises(ValueError, match="sigma0 is 0.5 .* and 1.0"):
        VelocityOnPath(lambda t, x: x, linear, Interpolant("trig", sigma0=1.0))
    with pytest.raises(ValueError, match="latent_noise 0.2"):
        VelocityOnPath(lambda t, x: x, linear, Interpolant("linear", sigma0=0.5, latent_noise=0.2))
    with pytest.raises(ValueError, match="at t = 0 is inf .* and 76.08"):
        VelocityOnPath(lambda t, x: x, linear, Interpolant("vp", sigma0=0.5))
