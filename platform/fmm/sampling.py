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
from torchdiffeq import odeint

from fmm.validation import check_unit_interval

VelocityField = Callable[[Tensor, Tensor], Tensor]


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
