"""Time sampling shared by every objective: pairs (s, t) off the diagonal and single times on it.

Kinds (docs/science.md §5):
- uniform_square:  (s, t) i.i.d. uniform, no ordering (FMM's direct two-map loss needs backward maps);
- upper_triangle:  (s, t) uniform on s <= t (LSD's off-diagonal sampling);
- diagonal_anneal: t uniform, s = t + U(-delta_k, delta_k) clipped, delta_k growing linearly from
                   anneal_start to 1 over anneal_steps (the FMM authors' code; s and t ordered when
                   `ordered`), with independent draws for t and the offset;
- logit_normal:    each time sigmoid(N(mean, std)) (SD3 / EDM-style emphasis on mid times),
                   sorted into s <= t when `ordered`;
- log_normal_sigma: each time the one whose noise-to-signal ratio sigma (EDM's noise level, in the
                   data's units) has log sigma ~ N(mean, std), as sCM and MeanFlow propose times; through
                   the interpolant, so a proposal means the same at any sigma0 and schedule. Sorted as
                   logit_normal.
All times are then mapped affinely into [t_min, t_max] (keep t_max below 1 for a teacher that is
singular at the data end). Single times use the same marginal: uniform, or logit-normal.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from fmm.config import StrictModel


class TimeSampling(StrictModel):
    kind: Literal["uniform_square", "upper_triangle", "diagonal_anneal", "logit_normal",
                  "log_normal_sigma"] = "upper_triangle"
    t_min: float = Field(0.0, ge=0.0, le=1.0)
    t_max: float = Field(1.0, ge=0.0, le=1.0)
    ordered: bool = True
    anneal_start: float = Field(0.05, gt=0.0, le=1.0)
    anneal_steps: int = Field(10_000, ge=1)
    mean: float = 0.0
    std: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _range(self) -> TimeSampling:
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be below t_max ({self.t_max})")
        return self

    def _scale(self, u: Tensor) -> Tensor:
        return self.t_min + (self.t_max - self.t_min) * u

    def _normal_times(self, shape, interpolant, device, dtype) -> Tensor:
        """Times in [0, 1] from a normal draw: sigmoid of it, or the time at noise-to-signal exp of it."""
        z = self.mean + self.std * torch.randn(shape, device=device, dtype=dtype)
        if self.kind == "logit_normal":
            return torch.sigmoid(z)
        if interpolant is None:
            raise ValueError("time_sampling kind 'log_normal_sigma' maps noise levels to times through the "
                             "interpolant: pass it.")
        top = interpolant.noise_to_signal(torch.zeros(1, dtype=torch.float64))
        sigma = torch.exp(z.double().cpu()).clamp(max=float(top))
        return interpolant.time_at_noise_to_signal(sigma).to(device=device, dtype=dtype)

    def single(self, n: int, *, interpolant=None, device=None, dtype=torch.float32) -> Tensor:
        """n times for diagonal terms."""
        if self.kind in ("logit_normal", "log_normal_sigma"):
            u = self._normal_times(n, interpolant, device, dtype)
        else:
            u = torch.rand(n, device=device, dtype=dtype)
        return self._scale(u)

    def pair(self, n: int, step: int = 0, *, max_gap: float = 1.0, interpolant=None, device=None,
             dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """n pairs (s, t); `max_gap` (in [0, 1] units, before scaling) shrinks every gap |t - s| into it."""
        if self.kind in ("logit_normal", "log_normal_sigma"):
            s, t = self._normal_times((n, 2), interpolant, device, dtype).unbind(1)
        elif self.kind == "diagonal_anneal":
            delta = self.anneal_start + (1 - self.anneal_start) * min(1.0, step / self.anneal_steps)
            t = torch.rand(n, device=device, dtype=dtype)
            s = (t + delta * (2 * torch.rand(n, device=device, dtype=dtype) - 1)).clamp(0, 1)
        else:
            s, t = torch.rand(n, 2, device=device, dtype=dtype).unbind(1)
        if self.kind == "upper_triangle" or (self.kind != "uniform_square" and self.ordered):
            s, t = torch.minimum(s, t), torch.maximum(s, t)
        if max_gap < 1.0:
            t = s + max_gap * (t - s)
        return self._scale(s), self._scale(t)
