"""Self-distillation: LSD, ESD and PSD ("How to build a consistency model: learning flow maps via
self-distillation", Boffi, Albergo & Vanden-Eijnden et al., 2505.18825 §3, Algorithms 2 to 4).

L_SD = L_b + L_D. A fraction eta of the batch (0.75 in the paper) trains the diagonal as flow
matching, |v_{t,t}(I_t) - dI_t/dt|^2; the rest, with s < t, trains the off-diagonal against the
model's own diagonal as teacher. The teacher is the live model (no EMA) under a stop-gradient,
input included (the paper's (94)).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fmm.objectives.base import (JVPOptions, Objective, ObjectiveOptions, Term, eulerian_residual,
                                 lagrangian_residual)
from fmm.objectives.registry import register
from fmm.tensor_checks import expand_like


class SelfDistillationOptions(ObjectiveOptions):
    diagonal_fraction: float = Field(0.75, ge=0.0, le=1.0)


class JVPSelfDistillationOptions(SelfDistillationOptions, JVPOptions):
    pass


class SelfDistillationBase(Objective):
    Options = JVPSelfDistillationOptions

    def _pair(self, x0, x1, z, step):
        s, t = self.options.time_sampling.pair(x1.shape[0], step, interpolant=self.interpolant, device=x1.device, dtype=x1.dtype)
        return s, t, self.interpolant.interpolate(s, x0, x1, z).x_t


@register
class LSD(SelfDistillationBase):
    """Lagrangian self-distillation: |d/dt X_{s,t}(I_s) - sg(v_{t,t}(X_{s,t}(I_s)))|^2."""

    name = "lsd"
    paper = "LSD 2505.18825 §3.1, Algorithm 2"
    equation = "|d/dt X_{s,t}(I_s) - sg(v_{t,t}(X_{s,t}(I_s)))|^2 + eta-weighted flow matching"

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        s, t, x_s = self._pair(x0, x1, z, step)
        return Term(lagrangian_residual(model, s, t, x_s, model.velocity, stop_gradient=True,
                                                gradient=self.options.gradient), s, t)


@register
class ESD(SelfDistillationBase):
    """Eulerian self-distillation: |d/ds X_{s,t}(I_s) + sg(grad_x X_{s,t}(I_s) v_{s,s}(I_s))|^2."""

    name = "esd"
    paper = "LSD 2505.18825 §3.1, Algorithm 3"
    equation = "|d/ds X_{s,t}(I_s) + sg(grad X_{s,t}(I_s) v_{s,s}(I_s))|^2 + eta-weighted flow matching"

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        s, t, x_s = self._pair(x0, x1, z, step)
        with torch.no_grad():
            b = model.velocity(s, x_s)
        return Term(eulerian_residual(model, s, t, x_s, b, semigradient=True, gradient=self.options.gradient), s, t)


class PSDOptions(SelfDistillationOptions):
    split: Literal["uniform", "midpoint"] = "uniform"


@register
class PSD(SelfDistillationBase):
    """Progressive self-distillation, preconditioned form (22)/(92): |v_{s,t}(I_s) - sg(v_teacher)|^2 with

        u = gamma s + (1 - gamma) t,
        v_teacher = (1 - gamma) v_{s,u}(I_s) + gamma v_{u,t}(I_s + (u - s) v_{s,u}(I_s)),

    the semigroup law X_{s,t} = X_{u,t} o X_{s,u} written for the slopes. gamma ~ U[0, 1] (PSD-U,
    split 'uniform') or gamma = 1/2 (PSD-M, 'midpoint'). The raw residual's (t - s)^2 factor is
    dropped, as in the paper, so the effective learning rate does not depend on the step size.
    """

    name = "psd"
    paper = "LSD 2505.18825 §3.1, Algorithm 4"
    equation = "(22)/(92): |v_{s,t}(I_s) - sg((1-g) v_{s,u}(I_s) + g v_{u,t}(X_{s,u}(I_s)))|^2"
    Options = PSDOptions

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        s, t, x_s = self._pair(x0, x1, z, step)
        if self.options.split == "uniform":
            gamma = torch.rand_like(s)
        else:
            gamma = torch.full_like(s, 0.5)
        u = gamma * s + (1 - gamma) * t
        with torch.no_grad():
            v_su = model.slope(s, u, x_s)
            x_u = x_s + expand_like(u - s, x_s) * v_su
            target = expand_like(1 - gamma, x_s) * v_su + expand_like(gamma, x_s) * model.slope(u, t, x_u)
        return Term(model.slope(s, t, x_s) - target, s, t)
