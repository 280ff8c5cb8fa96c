"""A float64 reference flow map X_{s,t}(x) by a high-accuracy ODE solve, forward or backward in time.

There is no closed form for a mixture's flow map (docs/science.md §8.5), so the reference integrates
dx/dt = b_t(x) with adaptive dopri5 at rtol = atol = 1e-11 under the max norm (every sample and
coordinate meets the tolerance, not only the batch average). Each sample may have its own (s, t):
the solve runs in a shared clock tau in [0, 1] with time(tau) = s + tau (t - s), so

    dx/dtau = (t - s) b_{time(tau)}(x),

which also covers backward maps (t < s) and the identity (t = s) in the same batch. A velocity
singular beyond `t_max` (the box mixtures) is integrated up to t_max and finished with one
Euler step, whose end point is the exact limit D_{t_max}(x) for those targets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fmm.tensor_checks import batch_times, check_unit_interval

F64 = torch.float64


def reference_flow_map(velocity: Callable[[Tensor, Tensor], Tensor], s: Tensor | float, t: Tensor | float,
                       x: Tensor, *, rtol: float = 1e-11, atol: float = 1e-11) -> Tensor:
    """X_{s,t}(x) in float64 for per-sample times s, t (scalars or [B] vectors)."""
    x = x.to(F64)
    s, t = batch_times(s, x, "s").to(F64), batch_times(t, x, "t").to(F64)
    check_unit_interval(s, "s")
    check_unit_interval(t, "t")
    t_max = getattr(velocity, "t_max", None)
    t_end = t if t_max is None else torch.clamp(t, max=t_max)
    if t_max is not None and bool((s > t_max).any()):
        raise ValueError(f"this velocity is singular beyond t = {t_max}; reference maps must start at s <= t_max.")
    span = (t_end - s).reshape((-1,) + (1,) * (x.dim() - 1))

    def rhs(tau: Tensor, y: Tensor) -> Tensor:
        # dopri5 may step past the end and interpolate back; clamping keeps every stage on [s, t_end].
        return span * velocity(s + tau.clamp(0, 1) * (t_end - s), y)

    from torchdiffeq import odeint  # on first use: it loads scipy.integrate (see fmm.sampling.solve_ode)

    clock = torch.tensor([0.0, 1.0], dtype=F64, device=x.device)
    y = odeint(rhs, x, clock, method="dopri5", rtol=rtol, atol=atol,
               options={"norm": lambda tensor: tensor.abs().max()})[-1]
    if t_max is not None and bool((t > t_max).any()):
        last = (t - t_end).reshape(span.shape)
        y = y + last * velocity(t_end, y)
    return y
