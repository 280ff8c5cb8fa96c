"""Few-step baselines on the two-time map (docs/science.md §7): progressive distillation, shortcut
models and MeanFlow, each written for X_{s,t}(x) = x + (t - s) v_{s,t}(x) with t = 0 noise, 1 data.
"""

from __future__ import annotations

import torch
from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor

from fmm.objectives.base import (FrozenTeacherRounds, Objective, ObjectiveOptions, SharedRandomness, TargetNetwork,
                                 Term, eulerian_residual)
from fmm.objectives.registry import register
from fmm.objectives.times import TimeSampling
from fmm.tensor_checks import expand_like


def _power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


class PDOptions(ObjectiveOptions):
    initial_steps: int = Field(64, ge=2)
    final_steps: int = Field(1, ge=1)
    round_steps: int = Field(2000, ge=1)

    @model_validator(mode="after")
    def _dyadic(self) -> PDOptions:
        for key in ("initial_steps", "final_steps"):
            if not _power_of_two(getattr(self, key)):
                raise ValueError(f"{key} must be a power of two (each round halves the step count); "
                                 f"got {getattr(self, key)}")
        if self.final_steps >= self.initial_steps:
            raise ValueError(f"final_steps ({self.final_steps}) must be below initial_steps ({self.initial_steps})")
        return self


@register
class ProgressiveDistillation(FrozenTeacherRounds):
    """Progressive distillation (Salimans & Ho 2022, 2202.00512 Alg. 2) on the uniform grid of K =
    initial_steps steps: in round r the student takes N_r = K / 2^(r+1) steps and one student step
    regresses onto two steps of the teacher, which in round 0 is the velocity teacher's Euler step
    (the DDIM step of the linear interpolant) and afterwards the student frozen at the round's start;
    the student itself carries on, so each round starts from the last. With s = j / N_r, h = 1/(2 N_r):

        |v_{s,s+2h}(x_s) - sg(T_{s+h,s+2h}(T_{s,s+h}(x_s)) - x_s) / 2h|^2,

    the x-target written for the slope (the (2h)^2 factor dropped, as for PSD). Rounds last
    `round_steps`, and halving stops at `final_steps`.
    """

    name = "pd"
    paper = "Progressive distillation 2202.00512, Alg. 2 (two teacher steps -> one student step)"
    equation = "|v_{s,s+2h}(x_s) - sg(T_{s+h,s+2h}(T_{s,s+h}(x_s)) - x_s)/2h|^2, halving rounds"
    Options = PDOptions
    init_from_teacher = True  # Alg. 2: the student is initialised as a copy of the teacher
    near_diagonal = False     # gaps of at least 2 / initial_steps

    def round_at(self, step: int) -> int:
        last = (self.options.initial_steps // self.options.final_steps).bit_length() - 2
        return min(step // self.options.round_steps, last)

    def student_steps(self, step: int) -> int:
        return self.options.initial_steps // 2 ** (self.round_at(step) + 1)

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        k = self.enter_round(model, step)
        n = self.student_steps(step)
        s = torch.randint(0, n, (x1.shape[0],), device=x1.device).to(x1.dtype) / n
        h = torch.full_like(s, 0.5 / n)
        x_s = self.interpolant.interpolate(s, x0, x1, z).x_t
        with torch.no_grad():
            if k == 0:
                x_mid = x_s + expand_like(h, x_s) * teacher(s, x_s)
                x_end = x_mid + expand_like(h, x_s) * teacher(s + h, x_mid)
            else:
                x_end = self.teacher_map(s + h, s + 2 * h, self.teacher_map(s, s + h, x_s))
            target = (x_end - x_s) / expand_like(2 * h, x_s)
        return Term(model.slope(s, s + 2 * h, x_s) - target, s, s + 2 * h)


class ShortcutOptions(ObjectiveOptions):
    diagonal_fraction: float = Field(0.875, ge=0.0, le=1.0)
    min_gap: float = Field(1 / 128, gt=0.0, lt=1.0)
    target_decay: float = Field(0.999, ge=0.0, lt=1.0)
    # The authors clip to [-4, 4] for images in [-1, 1]. Vectors have no such range (on the flower 68% of
    # the points exceed it, and the clip then pulls the exact map off its fixed point): auto is 4 for
    # images and off for vectors; a number clips at it, null never clips.
    clip: float | Literal["auto"] | None = "auto"

    @model_validator(mode="after")
    def _clip(self) -> ShortcutOptions:
        if isinstance(self.clip, float) and self.clip <= 0:
            raise ValueError(f"clip must be positive, 'auto' or null; got {self.clip}")
        return self

    @model_validator(mode="after")
    def _dyadic(self) -> ShortcutOptions:
        inverse = 1 / self.min_gap
        if abs(inverse - round(inverse)) > 1e-9 or not _power_of_two(round(inverse)) or round(inverse) < 2:
            raise ValueError(f"min_gap must be 1/2^k (k >= 1), the finest dyadic step; got {self.min_gap}")
        return self


@register
class Shortcut(Objective):
    """Shortcut models (Frans, Hafner, Levine & Abbeel 2024, 2410.12557 eq. (5)): the slope over a step
    D regresses onto the mean of two half steps of the EMA model,

        |v_{t,t+D}(x_t) - sg(1/2 [v^-_{t,t+D/2}(x_t) + v^-_{t+D/2,t+D}(x')])|^2,  x' = x_t + (D/2) v^-_{t,t+D/2}(x_t),

    with D = 2^-k dyadic down to 2 min_gap, t on D's grid, x' and the target clipped to [-clip, clip]
    for images (the authors' code; not for vectors, whose scale is the data's: see ShortcutOptions.clip). The flow-matching part is the diagonal (D = 0; the code uses D = 1/128),
    7/8 of the batch by default (bootstrap_every = 8). PSD-M with an EMA teacher on a dyadic grid.
    """

    name = "shortcut"
    paper = "Shortcut models 2410.12557, eq. (5); official code's dyadic bootstrap with EMA targets"
    equation = "|v_{t,t+D}(x_t) - sg((v-_{t,t+D/2}(x_t) + v-_{t+D/2,t+D}(x'))/2)|^2 + flow matching"
    Options = ShortcutOptions

    IMAGE_CLIP = 4.0  # the authors' value, for images in [-1, 1]

    def __init__(self, interpolant, options):
        super().__init__(interpolant, options)
        self.target: TargetNetwork | None = None
        self.clip = None if options.clip == "auto" else options.clip

    def prepare(self, model, teacher=None) -> None:
        super().prepare(model, teacher)
        if self.options.clip == "auto":
            self.clip = self.IMAGE_CLIP if len(model.sample_shape) == 3 else None
        if self.target is None:
            self.target = TargetNetwork(model)

    def before_step(self, model, step: int) -> None:
        if self.target is not None:
            self.target.update(model, step, self.options.target_decay)

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        if self.target is None:
            raise ValueError("objective 'shortcut': call prepare(model) before the first step.")
        count, device = x1.shape[0], x1.device
        levels = round(1 / self.options.min_gap).bit_length() - 1  # D = 1, 1/2, ..., 2 min_gap
        k = torch.randint(0, levels, (count,), device=device)
        gap = 0.5 ** k.to(x1.dtype)
        t = torch.floor(torch.rand(count, device=device, dtype=x1.dtype) * 2.0**k) * gap
        half = 0.5 * gap
        x_t = self.interpolant.interpolate(t, x0, x1, z).x_t
        clip = self.clip
        shared = SharedRandomness(x1.device)  # the first half step and the student see x_t with one mask
        with torch.no_grad():
            with shared.replay():
                v1 = self.target.slope(t, t + half, x_t)
            x_mid = x_t + expand_like(half, x_t) * v1
            if clip is not None:
                x_mid = x_mid.clamp(-clip, clip)
            target = 0.5 * (v1 + self.target.slope(t + half, t + gap, x_mid))
            if clip is not None:
                target = target.clamp(-clip, clip)
        with shared.replay():
            estimate = model.slope(t, t + gap, x_t)
        return Term(estimate - target, t, t + gap)


class MeanFlowOptions(ObjectiveOptions):
    diagonal_fraction: float = Field(0.75, ge=0.0, le=1.0)
    # MeanFlow's logit-normal(-0.4, 1.0) on its t (t = 1 noise) is log sigma ~ N(-0.4, 1.0), sigma the
    # noise level (sigma = t / (1 - t) there): proposed in sigma, it means the same at any sigma0
    time_sampling: TimeSampling = TimeSampling(kind="log_normal_sigma", mean=-0.4, std=1.0)
    adaptive_power: float = Field(1.0, ge=0.0)
    adaptive_eps: float = Field(0.01, gt=0.0)


@register
class MeanFlow(Objective):
    """MeanFlow (Geng, Deng, Bai, Kolter & He 2025, 2505.13447 eqs. (9) to (11)): the average velocity
    u(z, r, t) is the slope v_{s,t}, and the MeanFlow identity in FMM time reads

        v_{s,t}(x_s) = b_s(x_s) + (t - s) D_s v_{s,t}(x_s),   D_s = d/ds + b_s . grad_x,

    so the target sg(v + dX_{s,t}/ds) comes from one JVP along (1, dI_s/ds) and the loss is the
    Eulerian direct residual in its slope form. Each sample's squared error |e|^2 (summed) is
    divided by sg(|e|^2 + eps)^p, MeanFlow's adaptive weight (p = 1 on ImageNet, 0.75 on CIFAR).
    `diagonal_fraction` is the share of r = t samples (flow matching), 0.75 as in the paper.
    """

    name = "meanflow"
    paper = "MeanFlow 2505.13447, eqs. (9)-(11) and the adaptive loss weight (§4.3)"
    equation = "|v_{s,t}(x_s) - sg(dI_s + (t-s) D_s v_{s,t}(x_s))|^2 / sg(|.|^2 + eps)^p"
    Options = MeanFlowOptions

    def offdiagonal(self, model, x0, x1, z, teacher, step) -> Term:
        s, t = self.options.time_sampling.pair(x1.shape[0], step, interpolant=self.interpolant, device=x1.device, dtype=x1.dtype)
        point = self.interpolant.interpolate(s, x0, x1, z)
        return Term(eulerian_residual(model, s, t, point.x_t, point.dx_t, gradient="slope"), s, t)

    def per_sample_loss(self, term: Term) -> Tensor:
        squared = term.residual.pow(2).flatten(1).sum(1)
        return squared / (squared.detach() + self.options.adaptive_eps) ** self.options.adaptive_power
