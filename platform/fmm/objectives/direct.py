"""Direct flow-map training without a teacher (FMM, Boffi, Albergo & Vanden-Eijnden 2406.07507):
the two-map loss and Eulerian direct estimation.

Both regress onto the interpolant's own dI_t/dt, which is unbiased because the target is linear in
the velocity (the flow-matching trick); their loss values keep an irreducible variance, so at the
true map only the batch-mean residual vanishes.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fmm.objectives.base import JVPOptions, Objective, Term, eulerian_residual
from fmm.objectives.registry import register
from fmm.objectives.times import TimeSampling
from fmm.tensor_checks import expand_like


class TwoMapOptions(JVPOptions):
    time_sampling: TimeSampling = TimeSampling(kind="uniform_square")
    invertibility_weight: float = Field(1.0, ge=0.0)


@register
class TwoMap(Objective):
    """E |d/dt X_{s,t}(Y) - dI_t/dt|^2 + lambda |X_{s,t}(Y) - I_t|^2 with Y = X_{t,s}(I_t).

    Y should equal x_s on I_t's trajectory, where the Lagrangian equation gives d/dt X_{s,t}(Y) =
    b_t(I_t). Y is computed outside the time-JVP, so d/dt holds it fixed while the gradient still
    flows through it; the second term makes X_{s,t} invert X_{t,s}. (s, t) range over the whole
    square (uniform_square by default) because the backward maps are needed too. The two residuals
    are concatenated, so the per-sample loss is the mean over the entries of both.
    """

    name = "two_map"
    paper = "FMM 2406.07507 (direct two-map loss, Prop. 3.11 / eq. 3.17 as re-implemented)"
    equation = "|d/dt X_{s,t}(X_{t,s}(I_t)) - dI_t|^2 + lambda |X_{s,t}(X_{t,s}(I_t)) - I_t|^2"
    Options = TwoMapOptions

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        s, t = self.options.time_sampling.pair(x1.shape[0], step, interpolant=self.interpolant, device=x1.device, dtype=x1.dtype)
        point = self.interpolant.interpolate(t, x0, x1, z)
        y = model(t, s, point.x_t)
        if self.options.gradient == "slope":
            # d/dt X_{s,t}(y) = v + (t - s) d/dt v: the JVP runs without a graph, the gradient flows
            # through v_{s,t}(y) and through y itself.
            with torch.no_grad():
                _, dx_dt = model.time_jvp(s, t, y.detach())
            v = model.slope(s, t, y)
            x_back = y + expand_like(t - s, y) * v
            residual = (v - v.detach() + dx_dt - point.dx_t).flatten(1)
        else:
            x_back, dx_dt = model.time_jvp(s, t, y)
            residual = (dx_dt - point.dx_t).flatten(1)
        if self.options.invertibility_weight > 0:
            inverse = self.options.invertibility_weight ** 0.5 * (x_back - point.x_t).flatten(1)
            residual = torch.cat([residual, inverse], dim=1)
        return Term(residual, s, t)


class EulerianDirectOptions(JVPOptions):
    pass


@register
class EulerianDirect(Objective):
    """Eulerian direct estimation, semigradient: E |d/ds X_{s,t}(I_s) + sg(grad_x X_{s,t}(I_s) dI_s/ds)|^2.

    The stop-gradient is required, not optional: with the noisy dI_s the plain square adds
    E|grad X (dI_s - b_s)|^2, which penalises grad X and biases the minimiser; the semigradient is
    linear in dI_s, so its expectation is the ideal Eulerian gradient. (The MeanFlow update, in
    FMM time; LSD 2505.18825 App. C.2.)
    """

    name = "eulerian_direct"
    paper = "FMM 2406.07507 v2 (Eulerian direct estimation); LSD 2505.18825 App. C.2"
    equation = "|d/ds X_{s,t}(I_s) + sg(grad X_{s,t}(I_s) dI_s/ds)|^2"
    Options = EulerianDirectOptions

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        s, t = self.options.time_sampling.pair(x1.shape[0], step, interpolant=self.interpolant, device=x1.device, dtype=x1.dtype)
        point = self.interpolant.interpolate(s, x0, x1, z)
        return Term(eulerian_residual(model, s, t, point.x_t, point.dx_t, semigradient=True,
                                       gradient=self.options.gradient), s, t)
