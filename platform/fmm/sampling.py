"""Samplers: ODE solvers for a velocity field and the N-step flow-map sampler.

Every sampler takes its starting points (the noise) as an argument, so a sample is a deterministic
function of its input, and returns the number of function evaluations (NFE) it actually spent:
one NFE is one call of the velocity (or of the flow map) on the whole batch.

- Fixed-step explicit Runge-Kutta: Euler (order 1), Heun (order 2), RK4 (order 4), on a uniform or
  given time grid. `last_step_euler` takes the last step with Euler (EDM's convention), so no
  stage is evaluated at the grid's end point: use it when the velocity is singular there (the
  exact checkerboard velocity blows up at t = 1).
- Adaptive dopri5 (torchdiffeq) with an rms or per-sample max error norm.
- `flow_map_sample`: x <- X_{t_k, t_{k+1}}(x) along the grid, N steps for N NFE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fmm.flowmap import VelocityField
from fmm.tensor_checks import check_unit_interval


@dataclass(frozen=True)
class Solution:
    samples: Tensor
    nfe: int


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: stage coefficients a, weights b and nodes c."""

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]


TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau((), (1.0,), (0.0,)),
    "heun": Tableau(((1.0,),), (0.5, 0.5), (0.0, 1.0)),
    "rk4": Tableau(((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), (0.0, 0.5, 0.5, 1.0)),
}
SOLVERS = (*TABLEAUS, "dopri5")


def time_grid(steps: int | None = None, grid: Sequence[float] | Tensor | None = None,
              t0: float = 0.0, t1: float = 1.0) -> list[float]:
    """A uniform grid of `steps` steps from t0 to t1, or a given grid checked for monotonicity and range."""
    if (steps is None) == (grid is None):
        raise ValueError("give exactly one of steps (a positive integer) or grid (a monotone list of times).")
    if grid is None:
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be a positive integer; got {steps!r}.")
        check_unit_interval(torch.tensor([t0, t1], dtype=torch.float64), "grid end")
        return [t0 + (t1 - t0) * k / steps for k in range(steps)] + [t1]
    times = [float(v) for v in (grid.tolist() if isinstance(grid, Tensor) else grid)]
    if len(times) < 2:
        raise ValueError(f"a time grid needs at least two times; got {times}.")
    check_unit_interval(torch.tensor(times, dtype=torch.float64), "grid time")
    diffs = [b - a for a, b in zip(times, times[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError(f"a time grid must be strictly increasing or strictly decreasing; got {times}.")
    return times


class _Counted:
    """Wraps a velocity field, broadcasting a scalar time over the batch and counting calls."""

    def __init__(self, velocity: VelocityField):
        self.velocity, self.calls = velocity, 0

    def __call__(self, t: float | Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return self.velocity(torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device), x)


def _explicit_rk(field: _Counted, x: Tensor, times: list[float], tableau: Tableau, last_step_euler: bool) -> Tensor:
    euler = TABLEAUS["euler"]
    for k, (t, t_next) in enumerate(zip(times, times[1:])):
        method = euler if last_step_euler and k == len(times) - 2 else tableau
        h = t_next - t
        stages: list[Tensor] = []
        for i, c in enumerate(method.c):
            xi = x
            for a, stage in zip(method.a[i - 1] if i else (), stages):
                if a:
                    xi = xi + (h * a) * stage
            stages.append(field(t + c * h, xi))
        x = x + h * sum(b * stage for b, stage in zip(method.b, stages))
    return x


def solve_ode(velocity: VelocityField, x: Tensor, method: str = "euler", *, steps: int | None = None,
              grid: Sequence[float] | Tensor | None = None, last_step_euler: bool = False,
              rtol: float = 1e-5, atol: float = 1e-5, norm: str = "rms") -> Solution:
    """Integrate dx/dt = velocity(t, x) from the grid's first time to its last, starting at x.

    Fixed-step methods walk the grid (or `steps` uniform steps over [0, 1]); dopri5 uses only the
    grid's two ends and chooses its own steps to meet rtol/atol under the `norm` ("rms", as in
    torchdiffeq, or "max", the per-sample max error). A velocity field with a `t_max` attribute
    (singular beyond it) is integrated by dopri5 up to t_max and finished with one Euler step.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE solver {method!r}; choose one of {list(SOLVERS)}.")
    field = _Counted(velocity)
    if method in TABLEAUS:
        times = time_grid(steps, grid)
        return Solution(_explicit_rk(field, x, times, TABLEAUS[method], last_step_euler), field.calls)
    if steps is not None:
        raise ValueError("dopri5 chooses its own steps: give grid=[t0, t1] for its span (default [0, 1]), not steps.")
    times = time_grid(grid=grid) if grid is not None else [0.0, 1.0]
    if norm not in ("rms", "max"):
        raise ValueError(f"unknown error norm {norm!r}; choose 'rms' or 'max'.")
    t0, t1 = times[0], times[-1]
    t_max = getattr(velocity, "t_max", None)
    t_end = min(t1, t_max) if (t_max is not None and t1 > t0) else t1
    options = {"norm": lambda tensor: tensor.abs().max()} if norm == "max" else None
    span = torch.tensor([t0, t_end], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                        device=x.device)
    lo, hi = min(t0, t_end), max(t0, t_end)
    # Imported on first use: torchdiffeq loads scipy.integrate, about 0.8 s of CPU in every process (each
    # Ray worker, each command) that would otherwise never integrate with dopri5.
    from torchdiffeq import odeint

    # dopri5 may step past the end and interpolate back; clamping keeps every stage inside the span.
    y = odeint(lambda t, y: field(t.clamp(lo, hi), y), x, span, method="dopri5", rtol=rtol, atol=atol,
               options=options)[-1]
    if t_end != t1:
        y = y + (t1 - t_end) * field(t_end, y)
    return Solution(y, field.calls)


def flow_map_sample(flow_map: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, *, steps: int | None = None,
                    grid: Sequence[float] | Tensor | None = None) -> Solution:
    """x <- X_{t_k, t_{k+1}}(x) along a uniform grid of `steps` steps on [0, 1] or a given grid."""
    times = time_grid(steps, grid)
    for t, t_next in zip(times, times[1:]):
        s_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        x = flow_map(s_vec, torch.full_like(s_vec, t_next), x)
    return Solution(x, len(times) - 1)


def gamma_sample(flow_map: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, interpolant, *,
                 gamma: float, steps: int | None = None, grid: Sequence[float] | Tensor | None = None,
                 generator: torch.Generator | None = None) -> Solution:
    """CTM's gamma-sampling (Kim et al. 2023, Alg. 1 with its gamma) in interpolant time, which for
    gamma = 1 is the consistency models' multistep sampler (Song et al. 2023, Alg. 1).

    On the grid t_0 < ... < t_N, each step jumps with the map from t_k to the time u whose noise-to-
    signal ratio is sqrt(1 - gamma^2) sigma(t_{k+1}), then rescales and adds fresh noise:

        x <- (beta(t_{k+1}) / beta(u)) X_{t_k,u}(x) + gamma sqrt(c(t_{k+1})) eps,

    so the noise level of x is again that of I_{t_{k+1}}. gamma = 0 is the deterministic flow-map
    sampler; gamma = 1 denoises to the data end (u = 1) and re-noises, as consistency models do.
    The last step lands on the grid's end with no noise added. One NFE per step; the fresh noise
    comes from `generator`, so a fixed generator seed makes the samples a function of x.
    """
    if not (isinstance(gamma, (int, float)) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma (the re-noising fraction) must be a number in [0, 1]; got {gamma!r}.")
    times = time_grid(steps, grid)
    if times[-1] <= times[0]:
        raise ValueError("gamma-sampling runs from noise to data: the grid must increase.")
    n = x.shape[0]
    for k, (t, t_next) in enumerate(zip(times, times[1:])):
        last = k == len(times) - 2
        t_next64 = torch.tensor([t_next], dtype=torch.float64)
        if last or gamma == 0.0:
            u = t_next
        else:
            u = float(interpolant.time_at_noise_to_signal(
                (1 - gamma**2) ** 0.5 * interpolant.noise_to_signal(t_next64)))
        s_vec = torch.full((n,), t, dtype=x.dtype, device=x.device)
        x = flow_map(s_vec, torch.full_like(s_vec, u), x)
        if not last and gamma > 0.0:
            beta_next = float(interpolant.coefficients(t_next64).beta)
            beta_u = float(interpolant.coefficients(torch.tensor([u], dtype=torch.float64)).beta)
            c_next = float(interpolant.noise_variance(t_next64)[0])
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
            x = (beta_next / beta_u) * x + gamma * c_next**0.5 * eps
    return Solution(x, len(times) - 1)


def consistency_sample(flow_map: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, interpolant, *,
                       steps: int | None = None, grid: Sequence[float] | Tensor | None = None,
                       generator: torch.Generator | None = None) -> Solution:
    """Consistency models' multistep sampler: denoise with X_{t_k,1}, re-noise to t_{k+1} (gamma = 1)."""
    return gamma_sample(flow_map, x, interpolant, gamma=1.0, steps=steps, grid=grid, generator=generator)


SAMPLERS = ("flow_map", "consistency", "gamma")


def make_sampler(kind: str, interpolant=None, *, gamma: float = 0.0, seed: int = 0):
    """A sampler `(flow_map, noise, steps) -> Solution` by name: 'flow_map' (deterministic chain of
    jumps), 'consistency' (denoise and re-noise) or 'gamma' (CTM's gamma-sampling). The stochastic
    ones draw their fresh noise from a generator seeded with `seed` at every call, so each call is
    a deterministic function of the noise. The sampler's `renoises` says whether it adds fresh noise
    between steps (then a sample at two or more steps is not the map of its starting point)."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; choose one of {list(SAMPLERS)}.")
    if kind == "flow_map":
        def chain(model, noise, steps):
            return flow_map_sample(model, noise, steps=steps)

        chain.renoises = False
        return chain
    if interpolant is None:
        raise ValueError(f"the {kind!r} sampler re-noises along the interpolant: pass the interpolant.")
    g = 1.0 if kind == "consistency" else gamma

    def run(model, noise, steps):
        return gamma_sample(model, noise, interpolant, gamma=g, steps=steps,
                            generator=torch.Generator().manual_seed(seed))

    run.renoises = g > 0.0  # from two steps on, samples are no longer a function of their noise alone
    return run
