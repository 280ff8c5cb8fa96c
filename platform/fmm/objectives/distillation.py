"""Flow-map distillation from a velocity teacher b: LMD, EMD and PFMM (FMM, Boffi, Albergo &
Vanden-Eijnden 2406.07507 §3; restated in LSD 2505.18825 App. B.1 to B.3, eqs. (26) to (31)).

The teacher is any velocity field b(t, x): the exact velocity of a toy target or the diagonal of a
trained flow-matching model. On the diagonal (a fraction eta of the batch, 0 by default) v_{t,t}
regresses onto the teacher's b_t(I_t).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from fmm.flowmap import VelocityField
from fmm.objectives.base import (FrozenTeacherRounds, JVPOptions, Objective, ObjectiveOptions, Term,
                                 eulerian_residual, lagrangian_residual)
from fmm.objectives.registry import register


class LMDOptions(JVPOptions):
    stop_gradient: bool = True

    @model_validator(mode="after")
    def _slope_needs_stop_gradient(self) -> "LMDOptions":
        if self.gradient == "slope" and not self.stop_gradient:
            raise ValueError("gradient 'slope' holds the teacher term constant: it needs stop_gradient true")
        return self


@register
class LMD(Objective):
    """Lagrangian map distillation: E |d/dt X_{s,t}(I_s) - b_t(X_{s,t}(I_s))|^2.

    One time-JVP gives X and d/dt X together. `stop_gradient` (default) is eq. (27), the teacher
    term held constant; without it, eq. (26), the gradient also passes through the teacher's
    spatial Jacobian at X.
    """

    name = "lmd"
    paper = "FMM 2406.07507 (LMD); LSD 2505.18825 App. B.1"
    equation = "(26)/(27): |d/dt X_{s,t}(I_s) - [sg] b_t(X_{s,t}(I_s))|^2"
    needs_teacher = True
    diagonal_target = "teacher"
    Options = LMDOptions

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        s, t = self.options.time_sampling.pair(x1.shape[0], step, interpolant=self.interpolant, device=x1.device, dtype=x1.dtype)
        x_s = self.interpolant.interpolate(s, x0, x1, z).x_t
        return Term(lagrangian_residual(model, s, t, x_s, teacher, self.options.stop_gradient,
                                                self.options.gradient), s, t)


class EMDOptions(JVPOptions):
    semigradient: bool = True

    @model_validator(mode="after")
    def _slope_needs_semigradient(self) -> "EMDOptions":
        if self.gradient == "slope" and not self.semigradient:
            raise ValueError("gradient 'slope' is a semigradient form: it needs semigradient true")
        return self


@register
class EMD(Objective):
    """Eulerian map distillation: E |d/ds X_{s,t}(I_s) + grad_x X_{s,t}(I_s) b_s(I_s)|^2.

    The full form, eq. (28), is one augmented JVP in (s, x) with tangent (1, b_s(I_s)); the
    semigradient form, eq. (29) and the default, stops the gradient of the spatial term, whose
    backpropagation through grad_x X is unstable.
    """

    name = "emd"
    paper = "FMM 2406.07507 (EMD); LSD 2505.18825 App. B.2"
    equation = "(28)/(29): |d/ds X_{s,t}(I_s) + [sg] grad X_{s,t}(I_s) b_s(I_s)|^2"
    needs_teacher = True
    diagonal_target = "teacher"
    Options = EMDOptions

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        s, t = self.options.time_sampling.pair(x1.shape[0], step, interpolant=self.interpolant, device=x1.device, dtype=x1.dtype)
        x_s = self.interpolant.interpolate(s, x0, x1, z).x_t
        with torch.no_grad():
            b = teacher(s, x_s)
        return Term(eulerian_residual(model, s, t, x_s, b, self.options.semigradient, self.options.gradient), s, t)


class PFMMOptions(ObjectiveOptions):
    initial_gap: float = Field(1 / 64, gt=0.0, le=1.0)
    round_steps: int = Field(2000, ge=1)


class _EulerStepMap:
    """The first PFMM teacher: one Euler step of the velocity, X_{s,t}(x) = x + (t - s) b_s(x)."""

    def __init__(self, velocity: VelocityField):
        self.velocity = velocity

    def __call__(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return x + (t - s).reshape((-1,) + (1,) * (x.dim() - 1)) * self.velocity(s, x)


@register
class PFMM(FrozenTeacherRounds):
    """Progressive flow map matching: E |X_{s,t}(I_s) - X'_{u,t}(X'_{s,u}(I_s))|^2 with u = (s + t) / 2.

    X' is a frozen teacher map valid for gaps up to tau; the student learns gaps up to 2 tau from
    two teacher jumps. Round k (of `round_steps` steps each) uses tau_k = initial_gap * 2^k: in
    round 0 the teacher is one Euler step of the velocity teacher, from round 1 on it is a frozen
    copy of the student as it stood when the round began (eq. (31)). Gaps are capped at 1.
    """

    name = "pfmm"
    paper = "FMM 2406.07507 (PFMM); LSD 2505.18825 App. B.3"
    equation = "(30)/(31): |X_{s,t}(I_s) - X'_{u,t}(X'_{s,u}(I_s))|^2, u = (s+t)/2"
    Options = PFMMOptions

    def round_at(self, step: int) -> int:
        return step // self.options.round_steps

    def max_gap(self, step: int) -> float:
        return min(1.0, 2 * self.options.initial_gap * 2 ** self.round_at(step))

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        k = self.enter_round(model, step)
        jump = _EulerStepMap(teacher) if k == 0 else self.teacher_map
        s, t = self.options.time_sampling.pair(x1.shape[0], step, max_gap=self.max_gap(step),
                                               interpolant=self.interpolant, device=x1.device, dtype=x1.dtype)
        x_s = self.interpolant.interpolate(s, x0, x1, z).x_t
        u = 0.5 * (s + t)
        with torch.no_grad():
            target = jump(u, t, jump(s, u, x_s))
        return Term(model(s, t, x_s) - target, s, t)
