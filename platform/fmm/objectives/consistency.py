"""Consistency baselines in flow-map notation (docs/science.md §6): discrete consistency
distillation and training (CD, CT, iCT), continuous-time consistency (sCD, sCT), Align Your Flow's
Eulerian map distillation (AYF-EMD) and consistency trajectory models (CTM, without the GAN term).

All of them learn the same two-time map X_{s,t}(x) = x + (t - s) v_{s,t}(x) as the FMM objectives,
with t = 0 noise and t = 1 data. A consistency model's f(x, sigma) is the column X_{s,1}, s the time
whose noise-to-signal ratio sqrt(c_s) / beta_s is sigma (EDM's sigma for the linear interpolant).
The parameterisation gives the boundary condition X_{1,1} = id for free, where consistency models
need c_skip and c_out.

Discrete grids are laid out in sigma (Karras et al.'s rho = 7 spacing between sigma_max and
sigma_min, converted to times through the interpolant) or uniformly in time. The target network
theta^- is an EMA copy of the model (TargetNetwork), updated once per step before the loss.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from fmm.interpolants import Interpolant
from fmm.objectives.base import (Objective, ObjectiveOptions, SharedRandomness, TargetNetwork, Term,
                                 per_sample_distance)
from fmm.objectives.registry import register
from fmm.objectives.times import TimeSampling
from fmm.tensor_checks import expand_like


class GridOptions(ObjectiveOptions):
    """A discrete time grid of N points, increasing from noise to data."""

    grid: Literal["karras", "uniform"] = "karras"
    sigma_min: float = Field(0.002, gt=0.0)
    sigma_max: float = Field(80.0, gt=0.0)
    rho: float = Field(7.0, gt=0.0)
    steps: int = Field(18, ge=2)
    target_decay: float = Field(0.95, ge=0.0, lt=1.0)
    distance: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _sigma_range(self) -> GridOptions:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self


class GridObjective(Objective):
    """Shared by the discrete baselines: the grid, the EMA target network and the distance."""

    Options = GridOptions

    def __init__(self, interpolant: Interpolant, options: GridOptions):
        super().__init__(interpolant, options)
        self.target: TargetNetwork | None = None
        self._grids: dict[int, Tensor] = {}
        self.grid_times(2)  # checks the grid against the interpolant now, before any training

    def grid_times(self, n: int) -> Tensor:
        """The N grid times in float64, increasing (noise to data)."""
        if n not in self._grids:
            o = self.options
            if o.grid == "karras":
                top = float(self.interpolant.noise_to_signal(torch.zeros(1, dtype=torch.float64)))
                if o.sigma_max > top:
                    raise ValueError(f"objective '{self.name}': sigma_max = {o.sigma_max} is noisier than this "
                                     f"interpolant ever gets (sigma(0) = {top:.4g} for {self.interpolant!r}); "
                                     f"set sigma_max <= {top:.4g} or use grid: uniform.")
                i = torch.arange(n, dtype=torch.float64) / (n - 1)
                inv = 1.0 / o.rho
                sigma = (o.sigma_max**inv + i * (o.sigma_min**inv - o.sigma_max**inv)) ** o.rho
                times = self.interpolant.time_at_noise_to_signal(sigma)
            else:
                ts = o.time_sampling
                times = torch.linspace(ts.t_min, ts.t_max, n, dtype=torch.float64)
            self._grids[n] = times
        return self._grids[n]

    def prepare(self, model, teacher=None) -> None:
        super().prepare(model, teacher)
        t_max = getattr(teacher, "t_max", None)
        end = float(self.grid_times(2)[-1])
        if t_max is not None and end > t_max:
            raise ValueError(f"objective '{self.name}': the grid ends at t = {end:.6f}, where the teacher is "
                             f"singular (it is defined up to t = {t_max}); raise sigma_min or lower "
                             f"time_sampling.t_max.")
        if self.target is None:
            self.target = TargetNetwork(model)

    def target_map(self, model) -> TargetNetwork:
        """theta^-: the EMA copy (with target_decay 0, a copy of this step's weights: sg theta)."""
        if self.target is None:
            raise ValueError(f"objective '{self.name}': call prepare(model, teacher) before the first step.")
        return self.target

    def decay(self, step: int) -> float:
        return self.options.target_decay

    def before_step(self, model, step: int) -> None:
        if self.target is not None:
            self.target.update(model, step, self.decay(step))

    def per_sample_loss(self, term: Term) -> Tensor:
        return per_sample_distance(term.residual, self.options.distance, self.options.huber_c)

    def heun_step(self, teacher, s: Tensor, u: Tensor, x: Tensor) -> Tensor:
        h = expand_like(u - s, x)
        d1 = teacher(s, x)
        d2 = teacher(u, x + h * d1)
        return x + 0.5 * h * (d1 + d2)


class ConsistencyOptions(GridOptions):
    curriculum: Literal["fixed", "ct", "exponential"] = "fixed"
    steps_start: int = Field(2, ge=2)
    steps_end: int = Field(150, ge=2)
    curriculum_steps: int = Field(10_000, ge=1)
    adaptive_decay: bool = False
    time_weighting: Literal["uniform", "inverse_gap"] = "uniform"
    index_sampling: Literal["uniform", "lognormal"] = "uniform"
    p_mean: float = -1.1
    p_std: float = Field(2.0, gt=0.0)

    @model_validator(mode="after")
    def _curriculum(self) -> ConsistencyOptions:
        if self.curriculum != "fixed" and self.steps_end < self.steps_start:
            raise ValueError(f"steps_end ({self.steps_end}) must be at least steps_start ({self.steps_start})")
        return self


class DiscreteConsistency(GridObjective):
    """E lambda(n) d(X_{t_n,1}(x_{t_n}), sg X^-_{t_{n+1},1}(x^_{t_{n+1}})), n uniform (or lognormal) on
    the grid of N(k) points; subclasses say how x^_{t_{n+1}} is made."""

    Options = ConsistencyOptions
    near_diagonal = False  # only maps to the data end, X_{t_n,1}

    def __init__(self, interpolant, options):
        super().__init__(interpolant, options)
        if options.time_weighting == "inverse_gap":
            sigma0 = float(interpolant.noise_to_signal(self.grid_times(2)[:1]))
            if not math.isfinite(sigma0):
                raise ValueError(f"objective '{self.name}': time_weighting 'inverse_gap' weighs by 1 / (sigma_n - "
                                 f"sigma_(n+1)), infinite at a grid start of t = 0: use grid: karras or "
                                 f"time_sampling.t_min > 0.")

    def grid_size(self, step: int) -> int:
        """N(k): the consistency models' curriculum (CT, Song et al. 2023 App. C) or iCT's doubling."""
        o = self.options
        if o.curriculum == "fixed":
            return o.steps
        s0, s1, total = o.steps_start, o.steps_end, o.curriculum_steps
        if o.curriculum == "ct":
            return math.ceil(math.sqrt(step / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
        per_stage = max(1, math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))
        return min(s0 * 2 ** (step // per_stage), s1) + 1

    def decay(self, step: int) -> float:
        """mu(k) = exp(s0 log mu0 / N(k)) with `adaptive_decay` (CT), else the fixed target_decay (CD)."""
        o = self.options
        if o.adaptive_decay and o.target_decay > 0.0:
            return math.exp(o.steps_start * math.log(o.target_decay) / self.grid_size(step))
        return o.target_decay

    def draw_index(self, n: int, count: int, device) -> Tensor:
        if self.options.index_sampling == "uniform":
            return torch.randint(0, n - 1, (count,), device=device)
        sigma = self.interpolant.noise_to_signal(self.grid_times(n)).clamp_max(1e30)
        cdf = torch.erf((torch.log(sigma) - self.options.p_mean) / (math.sqrt(2) * self.options.p_std))
        probs = (cdf[:-1] - cdf[1:]).clamp_min(0)
        return torch.multinomial(probs / probs.sum(), count, replacement=True).to(device)

    def next_point(self, x0, x1, z, s, u, x_s, teacher) -> Tensor:
        raise NotImplementedError

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        n = self.grid_size(step)
        times = self.grid_times(n).to(device=x1.device, dtype=x1.dtype)
        idx = self.draw_index(n, x1.shape[0], x1.device)
        s, u = times[idx], times[idx + 1]
        x_s = self.interpolant.interpolate(s, x0, x1, z).x_t
        one = torch.ones_like(s)
        with torch.no_grad():
            x_u = self.next_point(x0, x1, z, s, u, x_s, teacher)
            shared = SharedRandomness(x1.device)
            with shared.replay():
                target = self.target_map(model)(u, one, x_u)
        with shared.replay():
            estimate = model(s, one, x_s)
        weight = None
        if self.options.time_weighting == "inverse_gap":
            sigma = self.interpolant.noise_to_signal(self.grid_times(n)).to(device=x1.device, dtype=x1.dtype)
            weight = 1.0 / (sigma[idx] - sigma[idx + 1])
        return Term(estimate - target, s, one, weight)

    def sampler(self) -> dict:
        return {"kind": "consistency"}


@register
class CD(DiscreteConsistency):
    """Consistency distillation (Song, Dhariwal, Chen & Sutskever 2023, eq. (7) / Alg. 2):
    x^_{t_{n+1}} is one Heun step of the teacher's probability-flow ODE from x_{t_n} = I_{t_n}.
    Defaults: N = 18, fixed mu = 0.95, l2 (the paper's LPIPS is for images and not used here)."""

    name = "cd"
    paper = "Consistency models 2303.01469, CD: eq. (7), Alg. 2"
    equation = "lambda d(X_{t_n,1}(x_{t_n}), sg X^-_{t_{n+1},1}(Heun_{t_n->t_{n+1}}(x_{t_n})))"
    needs_teacher = True
    init_from_teacher = True  # "initialised with the pre-trained diffusion model" (§6)
    diagonal_target = "teacher"

    def next_point(self, x0, x1, z, s, u, x_s, teacher):
        return self.heun_step(teacher, s, u, x_s)


class CTOptions(ConsistencyOptions):
    curriculum: Literal["fixed", "ct", "exponential"] = "ct"
    adaptive_decay: bool = True
    target_decay: float = Field(0.9, ge=0.0, lt=1.0)


@register
class CT(DiscreteConsistency):
    """Consistency training (Song et al. 2023, eq. (10) / Alg. 3): x^_{t_{n+1}} = I_{t_{n+1}} with the
    same x0 (and z) as x_{t_n}, the one-sample estimate of the teacher step. Defaults follow CIFAR-10:
    N(k) from s0 = 2 to s1 = 150 over `curriculum_steps`, mu(k) = exp(s0 log mu0 / N(k)), mu0 = 0.9."""

    name = "ct"
    paper = "Consistency models 2303.01469, CT: eq. (10), Alg. 3"
    equation = "lambda d(X_{t_n,1}(I_{t_n}), sg X^-_{t_{n+1},1}(I_{t_{n+1}})), same noise"
    Options = CTOptions

    def next_point(self, x0, x1, z, s, u, x_s, teacher):
        return self.interpolant.interpolate(u, x0, x1, z).x_t


class ICTOptions(ConsistencyOptions):
    curriculum: Literal["fixed", "ct", "exponential"] = "exponential"
    steps_start: int = Field(10, ge=2)
    steps_end: int = Field(1280, ge=2)
    target_decay: float = Field(0.0, ge=0.0, lt=1.0)
    distance: Literal["l2", "pseudo_huber"] = "pseudo_huber"
    time_weighting: Literal["uniform", "inverse_gap"] = "inverse_gap"
    index_sampling: Literal["uniform", "lognormal"] = "lognormal"


@register
class ICT(CT):
    """Improved consistency training (Song & Dhariwal 2023, 2310.14189 §3 to §3.5): CT with no EMA target
    (theta^- = sg theta), pseudo-Huber distance sqrt(|r|^2 + c^2) - c with c = 0.00054 sqrt(D),
    lambda = 1 / (sigma_n - sigma_(n+1)), discretised lognormal sigma sampling (P_mean -1.1, P_std
    2.0) and the exponential curriculum N from 10 to 1280. Each change is an option of `ct` too."""

    name = "ict"
    paper = "iCT 2310.14189 §3.1 to §3.5 (CT with the improvements)"
    equation = "(1/(sigma_n - sigma_{n+1})) pseudo-Huber(X_{t_n,1}(I_{t_n}) - sg X_{t_{n+1},1}(I_{t_{n+1}}))"
    Options = ICTOptions


# -- continuous time ----------------------------------------------------------------------------

class ContinuousOptions(ObjectiveOptions):
    tangent_norm: float | None = Field(0.1, gt=0.0)    # g / (|g| + c), sCM §4.2
    tangent_clip: float | None = Field(None, gt=0.0)   # or clip each entry of g to [-c, c], sCM's alternative
    warmup_steps: int = Field(10_000, ge=0)
    warmup_max: float = Field(1.0, gt=0.0, le=1.0)


class EulerianConsistency(Objective):
    """The Eulerian semigradient on X_{s,t} with sCM's tricks, in the MSE form public code uses:

        residual = X_{s,t}(x_s) - sg(X_{s,t}(x_s) + g),   g = dX_{s,t}(x_s)/ds along the trajectory,

    whose gradient is -g . grad_theta X, the limit of |X_{s,t}(x_s) - sg X_{s+ds,t}(x_{s+ds})|^2 / ds.
    With X = x + (t - s) v the tangent splits as g = (b_s - v) + r (t - s) D_s v, D_s = d/ds + b . grad,
    computed by one no-grad JVP along (1, b_s); r is the tangent warm-up (0 to warmup_max over
    warmup_steps) and g is normalised per sample, g / (|g| + c), or clipped entrywise to [-c, c]
    (`tangent_clip`, sCM's alternative). b_s is the teacher's velocity (distillation) or dI_s/ds of the
    sample (training). Times come from sCM's proposal in noise level, log sigma ~ N(-1.0, 1.4).

    This is sCM's update applied to the flow-map form X = x + (1 - s) v with an X-space loss; SCM below
    adds TrigFlow's parametrisation f = cos(t) x - sin(t) sigma_d F(x / sigma_d, t) with its F-space
    loss (sCM as published). The fixed point is the same, the weighting over time differs by about
    sin(tau) (docs/science.md §6.4).
    """

    Options = ContinuousOptions
    fixed_end = True
    near_diagonal = False  # AYF-EMD (fixed_end False) sets it back

    def warmup(self, step: int) -> float:
        o = self.options
        return o.warmup_max if o.warmup_steps == 0 else o.warmup_max * min(1.0, step / o.warmup_steps)

    def times(self, n: int, step: int, like: Tensor) -> tuple[Tensor, Tensor]:
        ts = self.options.time_sampling
        if self.fixed_end:
            s = ts.single(n, interpolant=self.interpolant, device=like.device, dtype=like.dtype)
            return s, torch.ones_like(s)
        return ts.pair(n, step, interpolant=self.interpolant, device=like.device, dtype=like.dtype)

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        s, t = self.times(x1.shape[0], step, x1)
        point = self.interpolant.interpolate(s, x0, x1, z)
        x_s = point.x_t
        shared = SharedRandomness(x1.device)
        with torch.no_grad():
            b = teacher(s, x_s) if self.needs_teacher else point.dx_t
            with shared.replay():
                _, dx = model.jvp(s, t, x_s, ds=1.0, dx=b)
            with shared.replay():
                v = model.slope(s, t, x_s)
            g = self.bounded((b - v) + self.warmup(step) * (dx - b + v))
        with shared.replay():
            x_t = model(s, t, x_s)
        return Term(x_t - (x_t.detach() + g), s, t)

    def bounded(self, g: Tensor) -> Tensor:
        """The tangent normalised per sample, g / (|g| + c), and/or clipped entrywise to [-c, c]."""
        if self.options.tangent_norm is not None:
            g = g / expand_like(g.flatten(1).norm(dim=1) + self.options.tangent_norm, g)
        if self.options.tangent_clip is not None:
            g = g.clamp(-self.options.tangent_clip, self.options.tangent_clip)
        return g

    def sampler(self) -> dict:
        return {"kind": "consistency"} if self.fixed_end else {"kind": "flow_map"}


class SCMOptions(ContinuousOptions):
    # trigflow: TrigFlow's map and F-space loss (sCM as published; needs the trig schedule);
    # flowmap: the Eulerian form on X = x + (1 - s) v; auto: trigflow on the trig schedule, else flowmap.
    form: Literal["auto", "trigflow", "flowmap"] = "auto"
    weighting: Literal["uniform", "learned"] = "learned"
    # sCM's proposal log sigma ~ N(P_mean = -1.0, P_std = 1.4), sigma the noise level (2410.11081 §4)
    time_sampling: TimeSampling = TimeSampling(kind="log_normal_sigma", mean=-1.0, std=1.4)


class SCM(EulerianConsistency):
    """sCD and sCT in two forms (`form`). `trigflow`, sCM as published (2410.11081 §3-4): the map is
    TrigFlow's (fmm.flowmap.TrigFlowMap), f(x, tau) = X_{s,1}(x) = cos(tau) x - sin(tau) sigma_d F, with
    TrigFlow time tau = (pi/2)(1 - s) and sigma_d = sigma0, and the loss is sCM's in F-space,

        |F_theta - sg(F_theta + g)|^2,   g = -cos^2(tau) (sigma_d F - dx/dtau) - r sin(tau) cos(tau) (x + sigma_d dF/dtau),

    i.e. g = cos(tau) df/dtau at r = 1: the gradient of E[w(tau) f^T df^-/dtau] with sCM's weight
    w = 1/(sigma_d tan tau) (eq. (8)), warmed up by r and normalised (§4.2), with the adaptive weight
    of §4.3 (`weighting: learned`). Both parts come from one no-grad JVP of X_{s,1} along (1, b_s):
    df/dtau = -(2/pi) D_s X_{s,1}, dx/dtau = -(2/pi) b_s, sigma_d F = (cos(tau) x - X_{s,1}) / sin(tau),
    so the loss needs nothing of the map but X and is exact at the true consistency function for any
    parametrisation. `flowmap` is EulerianConsistency's X-space form on X = x + (1 - s) v."""

    Options = SCMOptions
    paper_form = "trig"

    @classmethod
    def map_form_of(cls, options: dict, schedule: str) -> str:
        form = options.get("form", "auto")
        return "trig" if form == "trigflow" or (form == "auto" and schedule == "trig") else "linear"

    def __init__(self, interpolant: Interpolant, options: SCMOptions):
        super().__init__(interpolant, options)
        if options.form == "trigflow" and interpolant.schedule.name != "trig":
            raise ValueError(f"objective {self.name!r}: form 'trigflow' is sCM's TrigFlow, whose path "
                             f"cos(tau) x1 + sin(tau) sigma_d z is the trig schedule, but this interpolant's "
                             f"schedule is {interpolant.schedule.name!r}: set interpolant.schedule: trig, or "
                             f"form: flowmap (or auto).")

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        if self.map_form != "trig":
            return super().offdiagonal(model, x0, x1, z, teacher, step)
        s, t = self.times(x1.shape[0], step, x1)
        s = s.clamp(max=1 - 1e-5)  # tau > 0: F is X's coefficient over sin(tau)
        point = self.interpolant.interpolate(s, x0, x1, z)
        x_s, sigma_d = point.x_t, self.interpolant.sigma0
        tau = torch.pi / 2 * (1 - s)
        cos, sin = expand_like(torch.cos(tau), x_s), expand_like(torch.sin(tau), x_s)
        shared = SharedRandomness(x1.device)
        with torch.no_grad():
            b = teacher(s, x_s) if self.needs_teacher else point.dx_t
            with shared.replay():
                f, df = model.jvp(s, t, x_s, ds=1.0, dx=b)
            sigma_d_f = (cos * x_s - f) / sin
            first = cos**2 * (-2 / torch.pi * b - sigma_d_f)       # -cos^2 (sigma_d F - dx/dtau)
            g = self.bounded(first + self.warmup(step) * (-2 / torch.pi * cos * df - first))
        with shared.replay():
            f = model(s, t, x_s)
        big_f = (cos * x_s - f) / (sigma_d * sin)
        return Term(big_f - (big_f.detach() + g), s, t)


@register
class SCD(SCM):
    """Continuous-time consistency distillation (sCM, Lu & Song 2024, 2410.11081 §4, eq. (8) with the
    tangent normalisation and warm-up of §4.2 and the adaptive weight of §4.3), in TrigFlow's form on the
    trig schedule and the Eulerian form elsewhere (SCM), with the teacher's b_s. The learned weight is
    `weighting: learned`."""

    name = "scd"
    paper = "sCM 2410.11081 §4 (sCD): eq. (8), tangent normalisation/warm-up §4.2, adaptive weight §4.3"
    equation = ("trigflow: |F - sg(F + g/(|g|+c))|^2, g = cos(tau) df/dtau along b (teacher); "
                "flowmap: |X_{s,1}(x_s) - sg(X_{s,1}(x_s) + g/(|g|+c))|^2, g = dX_{s,1}/ds along b")
    needs_teacher = True
    init_from_teacher = True  # sCD starts from the pre-trained TrigFlow model
    diagonal_target = "teacher"


@register
class SCT(SCM):
    """Continuous-time consistency training (sCM's sCT): as sCD with b_s = dI_s/ds of the sample."""

    name = "sct"
    paper = "sCM 2410.11081 §4 (sCT): eq. (8) with dx_t/dt from (x0, x1)"
    equation = ("trigflow: |F - sg(F + g/(|g|+c))|^2, g = cos(tau) df/dtau along dI_s/ds; "
                "flowmap: |X_{s,1}(I_s) - sg(X_{s,1}(I_s) + g/(|g|+c))|^2, g = dX_{s,1}/ds along dI_s/ds")


class AYFOptions(ContinuousOptions):
    warmup_max: float = Field(0.99, gt=0.0, le=1.0)


@register
class AYFEMD(EulerianConsistency):
    """Align Your Flow's Eulerian map distillation (Sabour, Fidler & Kreis 2025, 2506.14603 Thm. 3.2,
    §4.1 and §4.3): the same semigradient on the whole two-time map X_{s,t}, s < t, with tangent
    normalisation and the regularised warm-up that keeps r <= 0.99 (a little of the pull towards the
    Euler map stays). Time sampling is not settled by the paper; the FMM upper triangle by default."""

    name = "ayf_emd"
    paper = "Align Your Flow 2506.14603, AYF-EMD: Thm. 3.2 and §4 (tangent normalisation, regularised warm-up)"
    equation = "|X_{s,t}(x_s) - sg(X_{s,t}(x_s) + g/(|g|+c))|^2, g = (b - v) + r (t-s) D_s v"
    needs_teacher = True
    init_from_teacher = True  # the flow map starts from the teacher, its extra time embedding zeroed
    diagonal_target = "teacher"
    Options = AYFOptions
    fixed_end = False
    near_diagonal = True


# -- consistency trajectory models --------------------------------------------------------------

class CTMOptions(GridOptions):
    target_decay: float = Field(0.999, ge=0.0, lt=1.0)
    diagonal_fraction: float = Field(0.25, ge=0.0, le=1.0)
    sampling_gamma: float = Field(0.0, ge=0.0, le=1.0)


@register
class CTM(GridObjective):
    """Consistency trajectory models without the GAN term (Kim et al. 2023, 2310.02279 eq. (6) and §4):
    on the grid, times a < b <= c (indices i < j <= k), the estimate X_{a,c}(x_a) and the target
    X^-_{b,c}(Heun teacher steps a -> b of x_a) are both carried to the data end by the stop-gradient
    target network X^-_{c,1} (gradients still pass through the estimate's input), and compared:

        d( X^-_{c,1}(X_{a,c}(x_a)),  sg X^-_{c,1}(X^-_{b,c}(Solver_{a->b}(x_a))) ).

    CTM's denoising (DSM) term is the diagonal, a fraction `diagonal_fraction` of the batch regressed
    on the interpolant (flow matching). Sampled with CTM's gamma-sampling (`sampling_gamma`, 0 =
    deterministic)."""

    name = "ctm"
    paper = "CTM 2310.02279: soft consistency eq. (6) without the GAN term, DSM on the diagonal"
    equation = "d(X^-_{c,1}(X_{a,c}(x_a)), sg X^-_{c,1}(X^-_{b,c}(Heun_{a->b}(x_a)))) + eta flow matching"
    needs_teacher = True
    init_from_teacher = True  # CTM's student starts from the teacher's weights
    near_diagonal = False     # grid pairs; its diagonal is trained by the DSM share
    Options = CTMOptions

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        n, count, device = self.options.steps, x1.shape[0], x1.device
        times = self.grid_times(n).to(device=device, dtype=x1.dtype)
        i = torch.randint(0, n - 1, (count,), device=device)
        k = i + 1 + (torch.rand(count, device=device) * (n - 1 - i)).long()
        j = i + 1 + (torch.rand(count, device=device) * (k - i)).long()
        a, b, c = times[i], times[j], times[k]
        one = torch.ones_like(a)
        x_a = self.interpolant.interpolate(a, x0, x1, z).x_t
        target_net = self.target_map(model)
        with torch.no_grad():
            x_b, at = x_a, i.clone()
            for _ in range(int((j - i).max())):
                moving = at < j
                stepped = self.heun_step(teacher, times[at], times[(at + 1).clamp_max(n - 1)], x_b)
                x_b = torch.where(expand_like(moving, x_b), stepped, x_b)
                at = at + moving.long()
            shared = SharedRandomness(x1.device)  # call k of each side draws the same masks
            with shared.replay():
                target = target_net(c, one, target_net(b, c, x_b))
        with shared.replay():
            estimate = target_net(c, one, model(a, c, x_a))
        return Term(estimate - target, a, c)

    def sampler(self) -> dict:
        return {"kind": "gamma", "gamma": self.options.sampling_gamma}
