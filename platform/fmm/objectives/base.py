"""What every objective shares: options, the diagonal/off-diagonal batch split, weighting, teacher checks.

An objective is a small nn.Module called as

    loss, logs = objective(model, x1, teacher=teacher, step=step)

where `model` is a TwoTimeMap (a FlowMap in training, an exact map in tests), `x1` a batch of data
and `teacher` a velocity field b(t, x) for the distillation objectives. It draws its own noise x0
(and latent noise z) and times from torch's global generator, which the training loop seeds per
worker. A fraction `diagonal_fraction` (eta) of the batch trains the diagonal v_{t,t} (the tangent
condition, as flow matching), the rest the objective's own off-diagonal term.

Each term is a per-sample residual r; its per-sample loss is the mean of r^2 over the sample's
entries, combined by the weighting:
- uniform: the plain mean;
- learned: e^{-w(s,t)} |r|^2 + w(s,t) with w a small network on (s, t) (EDM2's uncertainty
  weighting in two times, LSD 2505.18825 §3.2); its parameters belong to the objective and must be
  optimised with the model's.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fmm.config import StrictModel
from fmm.flowmap import TwoTimeMap, VelocityField
from fmm.interpolants import Interpolant
from fmm.nets.embedding import TwoTimeEmbedding
from fmm.objectives.times import TimeSampling


class ObjectiveOptions(StrictModel):
    """Options every objective takes; subclasses add their own."""

    diagonal_fraction: float = Field(0.0, ge=0.0, le=1.0)
    time_sampling: TimeSampling = TimeSampling()
    weighting: Literal["uniform", "learned"] = "uniform"
    weight_width: int = Field(128, ge=2)


class JVPOptions(ObjectiveOptions):
    """Options of the objectives whose residual holds a JVP.

    gradient = "jvp" backpropagates through the JVP, as the papers define the loss. gradient =
    "slope" rewrites the same residual r through the slope v of X = x + (t - s) v as
    +-(v - sg(v)) + sg(r): the same value and fixed point, but the gradient flows through one plain
    forward pass of v while the JVP runs without a graph (docs/science.md §9.2; MeanFlow's and
    sCM's practice). It is cheaper and differs from the papers' gradient; the Lagrangian forms then
    need the teacher under a stop-gradient and the Eulerian forms the semigradient.
    """

    gradient: Literal["jvp", "slope"] = "jvp"


@dataclass
class Term:
    """A per-sample residual r [B, ...] at times (s, t) [B], with an optional per-sample weight [B]."""

    residual: Tensor
    s: Tensor
    t: Tensor
    weight: Tensor | None = None


class LearnedWeight(nn.Module):
    """w(s, t): a scalar log-variance per time pair, zero at initialisation."""

    def __init__(self, width: int):
        super().__init__()
        self.embedding = TwoTimeEmbedding(width, time_scale=1.0)
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        return self.out(self.embedding(s, t)).squeeze(1)


class SharedRandomness:
    """One random state, replayed for each branch of a residual, so that a target network or a tangent
    (JVP) branch draws the same dropout masks as the student's forward pass, as the consistency-model
    and MeanFlow code bases do. With independent masks the mask noise in a consistency residual does
    not shrink with the grid gap while the signal does. Without dropout a replay changes nothing.

        shared = SharedRandomness(x.device)
        with shared.replay():
            target = target_net(u, 1, x_u)
        with shared.replay():
            estimate = model(s, 1, x_s)
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        yield


def per_sample_mse(residual: Tensor) -> Tensor:
    return residual.pow(2).flatten(1).mean(1)


def per_sample_distance(residual: Tensor, distance: str, huber_c: float | None = None) -> Tensor:
    """The mean square (`l2`), or iCT's pseudo-Huber distance sqrt(|r|^2 + c^2) - c (Song & Dhariwal
    2023, 2310.14189 §3.3; c = 0.00054 sqrt(D) unless given), which grows linearly in large residuals
    and so lets a few hard samples weigh less than under the square."""
    if distance == "l2":
        return per_sample_mse(residual)
    r = residual.flatten(1)
    c = huber_c if huber_c is not None else 0.00054 * math.sqrt(r.shape[1])
    return torch.sqrt(r.pow(2).sum(1) + c * c) - c


def lagrangian_residual(model: TwoTimeMap, s: Tensor, t: Tensor, x: Tensor, target_velocity,
                        stop_gradient: bool = True, gradient: str = "jvp") -> Tensor:
    """d/dt X_{s,t}(x) - b_t(X_{s,t}(x)) from one time-JVP (LMD, LSD).

    With `stop_gradient` the whole teacher term, input included, is a constant (LMD eq. (27), LSD);
    without it gradients also flow through X into the teacher (LMD eq. (26)). gradient = "slope":
    see JVPOptions (d/dt X = v + (t - s) d/dt v, so the slope enters with a plus sign).
    """
    if gradient == "slope":
        shared = SharedRandomness(x.device)
        with torch.no_grad():
            with shared.replay():
                x_t, dx_dt = model.time_jvp(s, t, x)
            residual = dx_dt - target_velocity(t, x_t)
        with shared.replay():
            v = model.slope(s, t, x)
        return v - v.detach() + residual
    x_t, dx_dt = model.time_jvp(s, t, x)
    if stop_gradient:
        with torch.no_grad():
            target = target_velocity(t, x_t.detach())
    else:
        target = target_velocity(t, x_t)
    return dx_dt - target


def eulerian_residual(model: TwoTimeMap, s: Tensor, t: Tensor, x: Tensor, b: Tensor,
                      semigradient: bool = True, gradient: str = "jvp") -> Tensor:
    """d/ds X_{s,t}(x) + grad_x X_{s,t}(x) b (EMD, ESD, Eulerian direct estimation).

    The semigradient form puts a stop-gradient on the spatial term grad_x X . b, which is computed
    by a separate no-grad JVP; the full form backpropagates through one augmented JVP. gradient =
    "slope": see JVPOptions (d/ds X = -v + (t - s) d/ds v, so the slope enters with a minus sign).
    """
    shared = SharedRandomness(x.device)
    if gradient == "slope":
        with torch.no_grad(), shared.replay():
            residual = model.eulerian_jvp(s, t, x, b)[1]
        with shared.replay():
            v = model.slope(s, t, x)
        return v.detach() - v + residual
    if not semigradient:
        return model.eulerian_jvp(s, t, x, b)[1]
    with shared.replay():
        _, dx_ds = model.jvp(s, t, x, ds=1.0)
    with torch.no_grad(), shared.replay():
        _, spatial = model.jvp(s, t, x, dx=b.detach())
    return dx_ds + spatial


class TargetNetwork(nn.Module):
    """An EMA copy theta^- of the model, the consistency models' target network.

    `update(model, step, decay)` moves it towards the model once per new step, with the model's
    weights as they stand before that step's update (so after step k's optimiser update the target
    has seen it, as in the papers' loop). decay = 0 makes it a plain copy (iCT: theta^- = sg(theta)).
    Its parameters never train; gradients still flow through its input, as CTM's estimate needs.
    """

    def __init__(self, model: TwoTimeMap):
        super().__init__()
        self.net = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: TwoTimeMap, step: int, decay: float) -> None:
        if step <= int(self.step):
            return
        for target, live in zip(self.net.parameters(), model.parameters()):
            target.lerp_(live.detach(), 1.0 - decay)
        for target, live in zip(self.net.buffers(), model.buffers()):
            target.copy_(live)
        self.step.fill_(step)

    def forward(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return self.net(s, t, x)

    def slope(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return self.net.slope(s, t, x)


class Objective(nn.Module):
    """Base class: subclasses set the class attributes and implement `offdiagonal`."""

    name: ClassVar[str]
    paper: ClassVar[str]
    equation: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    init_from_teacher: ClassVar[bool] = False   # the paper's student starts from its teacher (experiment key init)
    # Whether off-diagonal pairs (s, t) come arbitrarily close to the diagonal, which then trains too; not
    # for maps to the data end only (consistency models) or on a fixed coarse grid (progressive distillation).
    near_diagonal: ClassVar[bool] = True
    diagonal_target: ClassVar[Literal["teacher", "interpolant"]] = "interpolant"
    # The form of the flow map this objective trains (fmm.flowmap.MAP_FORMS): 'trig' for sCM's TrigFlow.
    map_form: str = "linear"
    paper_form: ClassVar[str] = "linear"  # the form the method's paper trains (study labels mark others)
    Options: ClassVar[type[ObjectiveOptions]] = ObjectiveOptions

    @classmethod
    def map_form_of(cls, options: dict, schedule: str) -> str:
        """The form of the map trained with `options` on the schedule named `schedule`, known before the
        objective or the network is built (fmm.experiment.builders.build_model)."""
        return cls.map_form

    def __init__(self, interpolant: Interpolant, options: ObjectiveOptions):
        super().__init__()
        self.interpolant, self.options = interpolant, options
        self.map_form = self.map_form_of(options.model_dump(), interpolant.schedule.name)
        self.weight = LearnedWeight(options.weight_width) if options.weighting == "learned" else None

    # -- set-up checks, before any training step ---------------------------------------------------
    def prepare(self, model: TwoTimeMap, teacher: VelocityField | None = None) -> None:
        """Check the teacher against the model and the options; raise a ValueError naming the problem."""
        if self.needs_teacher and teacher is None:
            raise ValueError(f"objective '{self.name}' distils a velocity teacher: configure a teacher "
                             f"(an exact target velocity or a trained velocity checkpoint).")
        if teacher is None:
            return
        teacher_shape = tuple(getattr(teacher, "sample_shape", ()))
        if teacher_shape and teacher_shape != tuple(model.sample_shape):
            raise ValueError(f"objective '{self.name}': the teacher works on samples of shape {list(teacher_shape)} "
                             f"but the model on {list(model.sample_shape)}.")
        t_max = getattr(teacher, "t_max", None)
        if t_max is not None and self.teacher_time_max() > t_max:
            raise ValueError(f"objective '{self.name}': the teacher is singular beyond t = {t_max}; set "
                             f"time_sampling.t_max <= {t_max} (it is {self.options.time_sampling.t_max}).")

    def teacher_time_max(self) -> float:
        """The latest time at which the loss evaluates the teacher (checked against a singular end)."""
        return self.options.time_sampling.t_max

    def learns_velocity(self) -> bool:
        """Whether training makes the diagonal v_{t,t} a velocity (whose ODE the evaluation may solve as the
        run's own teacher): a share of the batch on the diagonal, or pairs that come arbitrarily close to it."""
        return self.options.diagonal_fraction > 0 or self.near_diagonal

    def before_step(self, model: TwoTimeMap, step: int) -> None:
        """Called once per training step before the loss (target networks update their EMA here)."""

    # -- the loss ----------------------------------------------------------------------------------
    def draw_noise(self, x1: Tensor) -> tuple[Tensor, Tensor | None]:
        x0 = self.interpolant.sigma0 * torch.randn_like(x1)
        z = torch.randn_like(x1) if self.interpolant.latent_noise > 0 else None
        return x0, z

    def diagonal(self, model: TwoTimeMap, x0: Tensor, x1: Tensor, z: Tensor | None,
                 teacher: VelocityField | None) -> Term:
        """v_{t,t}(I_t) against dI_t/dt (flow matching) or against the teacher's b_t(I_t)."""
        t = self.options.time_sampling.single(x1.shape[0], interpolant=self.interpolant, device=x1.device, dtype=x1.dtype)
        point = self.interpolant.interpolate(t, x0, x1, z)
        if self.diagonal_target == "teacher":
            with torch.no_grad():
                target = teacher(t, point.x_t)
        else:
            target = point.dx_t
        return Term(model.velocity(t, point.x_t) - target, t, t)

    def offdiagonal(self, model: TwoTimeMap, x0: Tensor, x1: Tensor, z: Tensor | None,
                    teacher: VelocityField | None, step: int) -> Term:
        raise NotImplementedError

    def terms(self, model: TwoTimeMap, x1: Tensor, teacher: VelocityField | None = None,
              step: int = 0) -> dict[str, Term]:
        """The per-sample residuals of one batch, split eta : (1 - eta) between diagonal and off-diagonal."""
        x0, z = self.draw_noise(x1)
        n_diag = int(round(self.options.diagonal_fraction * x1.shape[0]))
        out = {}
        if n_diag > 0:
            out["diagonal"] = self.diagonal(model, x0[:n_diag], x1[:n_diag], None if z is None else z[:n_diag], teacher)
        if n_diag < x1.shape[0]:
            zz = None if z is None else z[n_diag:]
            out["offdiagonal"] = self.offdiagonal(model, x0[n_diag:], x1[n_diag:], zz, teacher, step)
        return out

    def per_sample_loss(self, term: Term) -> Tensor:
        """The loss of each sample from its residual: the mean square by default; baselines with their
        own distance (pseudo-Huber, MeanFlow's adaptive weight) override it."""
        return per_sample_mse(term.residual)

    def sampler(self) -> dict[str, Any]:
        """How this method's authors sample with it (see fmm.sampling.make_sampler): the flow-map chain
        by default, consistency models' denoise-and-renoise, or CTM's gamma-sampling."""
        return {"kind": "flow_map"}

    def forward(self, model: TwoTimeMap, batch: Tensor, *, teacher: VelocityField | None = None,
                step: int = 0) -> tuple[Tensor, dict[str, Any]]:
        self.before_step(model, step)
        terms = self.terms(model, batch, teacher, step)
        total, count, logs = batch.new_zeros(()), 0, {}
        for key, term in terms.items():
            logs[f"mse_{key}"] = per_sample_mse(term.residual).mean().detach()
            mse = self.per_sample_loss(term)
            if term.weight is not None:
                mse = term.weight * mse
            if self.weight is not None:
                w = self.weight(term.s, term.t)
                mse = torch.exp(-w) * mse + w
            total = total + mse.sum()
            count += mse.shape[0]
        loss = total / count
        logs["loss"] = loss.detach()
        return loss, logs


class FrozenTeacherRounds(Objective):
    """Objectives trained in rounds against a frozen copy of the student (PFMM, progressive
    distillation): the copy is made at prepare() and reloaded from the model when a round begins."""

    needs_teacher = True
    diagonal_target = "teacher"

    def __init__(self, interpolant, options):
        super().__init__(interpolant, options)
        self.register_buffer("round", torch.zeros((), dtype=torch.long))
        self.teacher_map: TwoTimeMap | None = None

    def prepare(self, model: TwoTimeMap, teacher: VelocityField | None = None) -> None:
        super().prepare(model, teacher)
        if self.teacher_map is None:
            self.teacher_map = copy.deepcopy(model).requires_grad_(False)

    def round_at(self, step: int) -> int:
        raise NotImplementedError

    def enter_round(self, model: TwoTimeMap, step: int) -> int:
        """The round of `step`; on entering a new one the frozen teacher becomes the current student."""
        if self.teacher_map is None:
            raise ValueError(f"objective '{self.name}': call prepare(model, teacher) before the first step.")
        k = self.round_at(step)
        if k > int(self.round):
            self.teacher_map.load_state_dict(model.state_dict())
            self.round.fill_(k)
        return k
