"""Flow-map distillation from a velocity teacher b: LMD, EMD and PFMM (FMM, Boffi, Albergo &
Vanden-Eijnden 2406.07507 §3; restated in LSD 2505.18825 App. B.1 to B.3, eqs. (26) to (31)), and
regression onto the teacher's own ODE trajectories (the trajectory-regression distillation that FMM
2406.07507 v1 counts among its special cases).

The teacher is any velocity field b(t, x): the exact velocity of a toy target or the diagonal of a
trained flow-matching model. On the diagonal (a fraction eta of the batch, 0 by default) v_{t,t}
regresses onto the teacher's b_t(I_t).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from fmm.flowmap import VelocityField
from fmm.groundtruth import ExactVelocity
from fmm.objectives.base import (FrozenTeacherRounds, JVPOptions, Objective, ObjectiveOptions, Term,
                                 eulerian_residual, lagrangian_residual, per_sample_distance)
from fmm.objectives.registry import register
from fmm.sampling import solve_ode


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


class TrajectoryOptions(ObjectiveOptions):
    trajectories: int = Field(100_000, ge=1)          # teacher ODE solutions computed once, before training
    solver: Literal["euler", "heun", "rk4"] = "heun"  # fmm.sampling's fixed-step solvers
    solver_steps: int = Field(32, ge=1)               # a uniform grid of solver_steps + 1 times on [0, 1]
    endpoint_fraction: float = Field(0.0, ge=0.0, le=1.0)  # share of off-diagonal pairs at (0, 1): the one-step map
    seed: int = 0                                     # of the trajectories' noise (the same on every worker)
    distance: Literal["l2", "pseudo_huber"] = "l2"    # of the regression (pseudo-Huber: iCT 2310.14189 §3.3)
    huber_c: float | None = Field(None, gt=0.0)       # pseudo-Huber's c; None: 0.00054 sqrt(D), iCT's


@register
class Trajectory(Objective):
    """Trajectory regression: E |X_{t_i,t_j}(x_{t_i}) - x_{t_j}|^2 over pairs i < j of a time grid, where
    x_{t_k} = Phi_{0,t_k}(x_0) are the teacher's ODE solutions from noise x_0 ~ N(0, sigma0^2 I).

    Knowledge distillation (Luhman & Luhman 2021, arXiv 2101.02388) regresses a one-step student onto
    the teacher's ODE endpoint; neural-operator distillation (DFNO, Zheng et al. 2023, arXiv 2211.13449)
    onto its trajectory; FMM 2406.07507 v1 lists both as special cases of learning the flow map. Here the
    two-time map learns every grid pair, a share `endpoint_fraction` of each batch the pair (0, 1).
    The exact map is the minimiser up to the solver's error, which it carries: the grid's solutions are
    the targets. The first step solves the ODE once (`trajectories` x solver_steps steps of `solver`, the
    last step Euler when the teacher is singular at t = 1, float64 for an exact teacher) and keeps every
    grid point: trajectories x (solver_steps + 1) samples in memory, which suits low-dimensional data.
    `distance: pseudo_huber` regresses with iCT's pseudo-Huber distance instead of the square.
    """

    name = "trajectory"
    paper = "Luhman & Luhman 2101.02388; DFNO 2211.13449; FMM 2406.07507 v1 (special cases)"
    equation = "|X_{t_i,t_j}(x_{t_i}) - x_{t_j}|^2, x = teacher ODE trajectories on a grid, i < j"
    needs_teacher = True
    near_diagonal = False  # pairs on the solver's grid
    diagonal_target = "teacher"
    Options = TrajectoryOptions

    def __init__(self, interpolant, options):
        super().__init__(interpolant, options)
        self.path: Tensor | None = None   # [solver_steps + 1, trajectories, *sample shape]; not state
        k = options.solver_steps
        self.times = torch.linspace(0.0, 1.0, k + 1, dtype=torch.float64)
        self.pairs = torch.triu_indices(k + 1, k + 1, offset=1)  # [2, (k + 1) k / 2]: every i < j

    def teacher_time_max(self) -> float:
        """The solve ends with an Euler step when the teacher is singular at 1; only the diagonal term,
        when there is one, evaluates the teacher at sampled times."""
        return self.options.time_sampling.t_max if self.options.diagonal_fraction > 0 else 0.0

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        if self.path is None:  # on the first step, not in prepare(), which configuration checks also call
            self.path = teacher_trajectories(teacher, self.interpolant.sigma0, tuple(x1.shape[1:]), self.times,
                                             self.options)
        if self.path.device != x1.device:
            self.path = self.path.to(x1.device)
        n, k = x1.shape[0], self.options.solver_steps
        pick = torch.randint(self.pairs.shape[1], (n,), device=x1.device)
        i, j = self.pairs.to(x1.device)[:, pick]
        ends = int(round(self.options.endpoint_fraction * n))
        i[:ends], j[:ends] = 0, k
        which = torch.randint(self.path.shape[1], (n,), device=x1.device)
        times = self.times.to(device=x1.device, dtype=x1.dtype)
        s, t = times[i], times[j]
        x_s, target = self.path[i, which].to(x1.dtype), self.path[j, which].to(x1.dtype)
        return Term(model(s, t, x_s) - target, s, t)

    def per_sample_loss(self, term: Term) -> Tensor:
        return per_sample_distance(term.residual, self.options.distance, self.options.huber_c)


@torch.no_grad()
def teacher_trajectories(teacher: VelocityField, sigma0: float, shape: tuple[int, ...], times: Tensor,
                         options: TrajectoryOptions, chunk: int = 10_000) -> Tensor:
    """The teacher's fixed-step ODE solutions from `options.trajectories` noise draws, at every time of
    `times` (a grid on [0, 1]): [len(times), trajectories, *shape], float32 on the CPU."""
    exact = isinstance(teacher, ExactVelocity)
    param = next(iter(teacher.model.parameters()), None) if hasattr(teacher, "model") else None
    device = param.device if param is not None else torch.device("cpu")
    dtype = torch.float64 if exact else torch.float32
    singular_end = getattr(teacher, "t_max", None) is not None and teacher.t_max < 1.0
    generator = torch.Generator().manual_seed(options.seed)
    out = torch.empty((len(times), options.trajectories, *shape), dtype=torch.float32)
    grid = times.tolist()
    for start in range(0, options.trajectories, chunk):
        n = min(chunk, options.trajectories - start)
        x = (sigma0 * torch.randn((n, *shape), generator=generator, dtype=torch.float64)).to(device, dtype)
        out[0, start:start + n] = x.float().cpu()
        for k in range(len(grid) - 1):
            last = singular_end and k == len(grid) - 2
            x = solve_ode(teacher, x, "euler" if last else options.solver, grid=grid[k:k + 2]).samples
            out[k + 1, start:start + n] = x.float().cpu()
    return out


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
