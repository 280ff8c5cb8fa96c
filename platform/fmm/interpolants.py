"""Stochastic interpolants and their schedules.

An interpolant (Albergo & Vanden-Eijnden; FMM, Boffi et al. 2406.07507, §2) joins a base sample
x0 ~ N(0, sigma0^2 I) to a data sample x1:

    I_t = alpha_t x0 + beta_t x1 + gamma_t z,      z ~ N(0, I),
    dI_t/dt = alpha'_t x0 + beta'_t x1 + gamma'_t z,

with alpha_0 = beta_1 = 1, alpha_1 = beta_0 = 0, gamma_0 = gamma_1 = 0. Time runs from t = 0
(noise) to t = 1 (data). Its velocity b_t(x) = E[dI_t/dt | I_t = x] drives the probability-flow
ODE whose two-time flow map X_{s,t} the rest of the package learns.

Every schedule returns its coefficients together with their exact time derivatives, so no
autograd is needed at run time (tests check them against autograd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fmm.tensor_checks import batch_times, check_unit_interval, expand_like


@dataclass(frozen=True)
class Coefficients:
    """alpha_t, beta_t and their time derivatives, each shaped like the time tensor."""

    alpha: Tensor
    beta: Tensor
    dalpha: Tensor
    dbeta: Tensor


class Schedule:
    """A pair (alpha_t, beta_t) on [0, 1]; subclasses give closed forms and exact derivatives."""

    name: str = ""

    def __call__(self, t: Tensor) -> Coefficients:
        raise NotImplementedError

    def params(self) -> dict[str, float]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class LinearSchedule(Schedule):
    """alpha_t = 1 - t, beta_t = t (rectified flow; the FMM and LSD default)."""

    name = "linear"

    def __call__(self, t: Tensor) -> Coefficients:
        return Coefficients(1 - t, t, -torch.ones_like(t), torch.ones_like(t))


class TrigSchedule(Schedule):
    """alpha_t = cos(pi t / 2), beta_t = sin(pi t / 2) (variance preserving when sigma0 = data std)."""

    name = "trig"

    def __call__(self, t: Tensor) -> Coefficients:
        h = 0.5 * math.pi
        c, s = torch.cos(h * t), torch.sin(h * t)
        return Coefficients(c, s, -h * s, h * c)


class VPSchedule(Schedule):
    """The DDPM / score-SDE variance-preserving path written in interpolant time.

    T(t) = (1-t)^2 (beta_max - beta_min) / 2 + (1-t) beta_min,
    alpha_t = sqrt(1 - exp(-T)), beta_t = exp(-T / 2).

    The data end holds exactly (alpha_1 = 0, beta_1 = 1); the noise end only approximately
    (beta_0 = exp(-T(0)/2), about 6.6e-3 for the usual 0.1 and 20), as in the original SDE.
    alpha'_t is infinite at t = 1, where alpha behaves like sqrt(beta_min (1 - t)).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (0 < beta_min < beta_max):
            raise ValueError(
                f"vp schedule needs 0 < beta_min < beta_max; got beta_min={beta_min}, beta_max={beta_max}."
            )
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def params(self) -> dict[str, float]:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}

    def __call__(self, t: Tensor) -> Coefficients:
        r = 1 - t
        spread = self.beta_max - self.beta_min
        big_t = 0.5 * r**2 * spread + r * self.beta_min
        dbig_t = -(r * spread + self.beta_min)
        beta = torch.exp(-0.5 * big_t)
        alpha = torch.sqrt(-torch.expm1(-big_t))
        return Coefficients(alpha, beta, torch.exp(-big_t) * dbig_t / (2 * alpha), -0.5 * dbig_t * beta)


def _warp(t: Tensor, k: float) -> tuple[Tensor, Tensor]:
    """w(t) = t / (t + e^{-k} (1 - t)) and w'(t): a smooth monotone bijection of [0, 1] for every real k."""
    c = math.exp(-k)
    den = t + c * (1 - t)
    return t / den, c / den**2


class WarpedSchedule(Schedule):
    """A continuous two-parameter family: alpha_t = 1 - w(t; k_noise), beta_t = w(t; k_data).

    w(t; k) = t / (t + e^{-k}(1 - t)) maps [0, 1] onto itself monotonically with w(0) = 0 and
    w(1) = 1 for every real k, so every member meets the boundary conditions exactly and a sweep
    can search schedules continuously. k_noise = k_data = 0 is the linear schedule;
    k_noise = k_data = k is a time change of it (same paths, other speed); k_noise != k_data
    changes the path itself. Both parameters are limited to |k| <= 20 to keep e^{|k|} finite.
    """

    name = "warped"

    def __init__(self, k_noise: float = 0.0, k_data: float = 0.0):
        for key, k in (("k_noise", k_noise), ("k_data", k_data)):
            if not (isinstance(k, (int, float)) and math.isfinite(k) and abs(k) <= 20):
                raise ValueError(f"warped schedule: {key} must be a real number in [-20, 20]; got {k!r}.")
        self.k_noise, self.k_data = float(k_noise), float(k_data)

    def params(self) -> dict[str, float]:
        return {"k_noise": self.k_noise, "k_data": self.k_data}

    def __call__(self, t: Tensor) -> Coefficients:
        wa, dwa = _warp(t, self.k_noise)
        wb, dwb = _warp(t, self.k_data)
        return Coefficients(1 - wa, wb, -dwa, dwb)


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (LinearSchedule, TrigSchedule, VPSchedule, WarpedSchedule)
}


def make_schedule(name: str, **params: float) -> Schedule:
    """Build a schedule by name; unknown names or parameters are a ValueError listing what is allowed."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}.")
    cls = SCHEDULES[name]
    allowed = set(cls().params())
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(
            f"schedule {name!r} takes the parameters {sorted(allowed) or 'none'}; got unknown {sorted(unknown)}."
        )
    return cls(**params)


@dataclass(frozen=True)
class InterpolantSample:
    """A point on the interpolant and its time derivative: x_t = I_t, dx_t = dI_t/dt."""

    x_t: Tensor
    dx_t: Tensor


class Interpolant:
    """I_t = alpha_t x0 + beta_t x1 + gamma_t z with x0 ~ N(0, sigma0^2 I).

    `latent_noise` a >= 0 switches on gamma_t = sqrt(a t (1 - t)) (zero at both ends). Its
    derivative is infinite at t = 0 and t = 1, but d(gamma_t^2)/dt = a (1 - 2t) is finite
    everywhere, which is all the exact velocity needs.
    """

    def __init__(self, schedule: Schedule | str = "linear", sigma0: float = 1.0, latent_noise: float = 0.0):
        self.schedule = make_schedule(schedule) if isinstance(schedule, str) else schedule
        if not (math.isfinite(sigma0) and sigma0 > 0):
            raise ValueError(f"sigma0 (the base noise scale) must be a positive number; got {sigma0!r}.")
        if not (math.isfinite(latent_noise) and latent_noise >= 0):
            raise ValueError(f"latent_noise must be a number >= 0; got {latent_noise!r}.")
        self.sigma0 = float(sigma0)
        self.latent_noise = float(latent_noise)

    def __repr__(self) -> str:
        return f"Interpolant({self.schedule!r}, sigma0={self.sigma0}, latent_noise={self.latent_noise})"

    def coefficients(self, t: Tensor) -> Coefficients:
        check_unit_interval(t)
        return self.schedule(t)

    def gamma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """gamma_t and gamma'_t (gamma' is infinite at the ends when latent noise is on)."""
        if self.latent_noise == 0:
            return torch.zeros_like(t), torch.zeros_like(t)
        g = torch.sqrt(self.latent_noise * t * (1 - t))
        return g, self.latent_noise * (1 - 2 * t) / (2 * g)

    def noise_variance(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The isotropic part of Cov(I_t | x1), c_t = alpha_t^2 sigma0^2 + gamma_t^2, and dc_t/dt."""
        k = self.coefficients(t)
        s2 = self.sigma0**2
        c = k.alpha**2 * s2 + self.latent_noise * t * (1 - t)
        dc = 2 * k.alpha * k.dalpha * s2 + self.latent_noise * (1 - 2 * t)
        return c, dc

    def noise_to_signal(self, t: Tensor) -> Tensor:
        """sigma(t) = sqrt(c_t) / beta_t, the noise-to-signal ratio of I_t: EDM's sigma for the linear
        interpolant ((1 - t) / t when sigma0 = 1). It decreases from sigma(0) (infinite when beta_0 = 0)
        to 0 at t = 1, which is what consistency grids and gamma-sampling are laid out in."""
        c, _ = self.noise_variance(t)
        return torch.sqrt(c) / self.coefficients(t).beta

    def time_at_noise_to_signal(self, sigma: Tensor) -> Tensor:
        """The time t with sigma(t) = sigma, by bisection on [0, 1] (float64, to ~1e-15).

        sigma must lie in [0, sigma(0)]; beyond that no time has so much noise, a ValueError."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        top = float(self.noise_to_signal(torch.zeros(1, dtype=torch.float64)))
        if bool((sigma < 0).any()) or bool((sigma > top).any()):
            raise ValueError(f"noise-to-signal ratios {sigma.tolist()} are outside this interpolant's range "
                             f"[0, {top:.4g}] ({self!r}).")
        lo, hi = torch.zeros_like(sigma), torch.ones_like(sigma)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.noise_to_signal(mid) > sigma
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def base_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """x0 ~ N(0, sigma0^2 I)."""
        return self.sigma0 * torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def interpolate(self, t: Tensor | float, x0: Tensor, x1: Tensor, z: Tensor | None = None) -> InterpolantSample:
        """I_t and dI_t/dt for a batch; t is a scalar or a [B] vector, x0 and x1 are [B, ...]."""
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape; got {tuple(x0.shape)} and {tuple(x1.shape)}.")
        t = batch_times(t, x1)
        k = self.coefficients(t)
        a, b, da, db = (expand_like(c, x1) for c in (k.alpha, k.beta, k.dalpha, k.dbeta))
        x_t, dx_t = a * x0 + b * x1, da * x0 + db * x1
        if self.latent_noise > 0:
            if z is None:
                raise ValueError("this interpolant has latent noise (latent_noise > 0): pass z ~ N(0, I) shaped like x1.")
            if z.shape != x1.shape:
                raise ValueError(f"z must have the shape of x1 {tuple(x1.shape)}; got {tuple(z.shape)}.")
            g, dg = (expand_like(c, x1) for c in self.gamma(t))
            x_t, dx_t = x_t + g * z, dx_t + dg * z
        return InterpolantSample(x_t, dx_t)


class VelocityOnPath:
    """A velocity field b^A of interpolant A served on interpolant B, for two interpolants with the same
    base noise sigma0 and no latent noise (docs/science.md §1.4): a teacher trained on one schedule
    distils into a student on another, e.g. sCM's TrigFlow path from a linear-path teacher.

    Such paths differ by a change of time and a scale. With t' the A-time at which A's noise-to-signal
    ratio equals B's at t, and c = alpha^B_t / alpha^A_{t'} = beta^B_t / beta^A_{t'}, the interpolants
    satisfy I^B_t = c(t) I^A_{t'(t)} sample by sample, so

        b^B_t(x) = (c'(t) / c(t)) x + c(t) t''(t) b^A_{t'}(x / c(t)).

    t' comes from a bisection in float64, t'' = rho_B'(t) / rho_A'(t') from the equal ratios (rho =
    beta / alpha on the noisy half, alpha / beta on the data half, so no ratio is infinite), and c' by
    differentiating c. Exact for exact velocities (tested against the closed forms)."""

    def __init__(self, velocity, source: Interpolant, target: Interpolant):
        for which, interpolant in (("source", source), ("target", target)):
            if interpolant.latent_noise > 0:
                raise ValueError(f"a velocity moves between interpolants without latent noise only; the {which} "
                                 f"{interpolant!r} has latent_noise {interpolant.latent_noise}.")
        if source.sigma0 != target.sigma0:
            raise ValueError(f"a velocity moves between interpolants of the same base noise only: sigma0 is "
                             f"{source.sigma0} for {source!r} and {target.sigma0} for {target!r}.")
        zero = torch.zeros(1, dtype=torch.float64)
        tops = [float(p.noise_to_signal(zero)) for p in (source, target)]
        if tops[0] != tops[1]:
            raise ValueError(f"a velocity moves between interpolants that start from pure noise alike only: the "
                             f"noise-to-signal ratio at t = 0 is {tops[0]:.4g} for {source!r} and {tops[1]:.4g} "
                             f"for {target!r}, so some times of one path have no counterpart on the other.")
        self.velocity, self.source, self.target = velocity, source, target
        self.sample_shape = getattr(velocity, "sample_shape", None)
        t_max = getattr(velocity, "t_max", None)
        self.t_max = None if t_max is None else float(self._source_time(torch.tensor([t_max], dtype=torch.float64),
                                                                          back=True))

    def _source_time(self, t: Tensor, back: bool = False) -> Tensor:
        """The time of equal noise-to-signal ratio on the source path (on the target path when `back`)."""
        here, there = (self.source, self.target) if back else (self.target, self.source)
        top = there.noise_to_signal(torch.zeros(1, dtype=torch.float64))
        sigma = here.noise_to_signal(t.to(torch.float64).cpu())
        return there.time_at_noise_to_signal(torch.minimum(sigma, top)).to(t.device)

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        t_a = self._source_time(t64)
        b, a = self.target.coefficients(t64), self.source.coefficients(t_a)
        noisy = a.alpha >= a.beta
        rate = torch.where(noisy, (b.dbeta * b.alpha - b.beta * b.dalpha) / b.alpha**2
                           / ((a.dbeta * a.alpha - a.beta * a.dalpha) / a.alpha**2),
                           (b.dalpha * b.beta - b.alpha * b.dbeta) / b.beta**2
                           / ((a.dalpha * a.beta - a.alpha * a.dbeta) / a.beta**2))
        c = torch.where(noisy, b.alpha / a.alpha, b.beta / a.beta)
        dc = torch.where(noisy, (b.dalpha - c * a.dalpha * rate) / a.alpha, (b.dbeta - c * a.dbeta * rate) / a.beta)
        scale, drift, speed = (expand_like(v.to(x.dtype), x) for v in (c, dc / c, c * rate))
        return drift * x + speed * self.velocity(t_a.to(t.dtype), x / scale)

    def to(self, device):
        if hasattr(self.velocity, "to"):
            self.velocity = self.velocity.to(device)
        return self
