"""Velocity teachers for distillation: the exact velocity of a toy target, or a trained checkpoint's diagonal.

Either way the teacher is a plain field b(t, x) with `sample_shape` (checked against the student
before training) and `t_max` (the last time it may be evaluated; None when it is smooth on [0, 1]).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fmm.checkpoint import load_flow_map
from fmm.config import StrictModel, validate
from fmm.flowmap import TwoTimeMap, VelocityField
from fmm.groundtruth import ExactVelocity, make_target
from fmm.interpolants import Interpolant


class TeacherConfig(StrictModel):
    kind: Literal["exact", "checkpoint"]
    target: str | None = None
    path: str | None = None
    use_ema: bool = True


class ModelVelocity:
    """The diagonal v_{t,t} of a trained, frozen flow map, as a velocity field."""

    t_max = None

    def __init__(self, model: TwoTimeMap):
        self.model = model.eval().requires_grad_(False)
        self.sample_shape = tuple(model.sample_shape)

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        return self.model.velocity(t, x)

    def to(self, device: torch.device | str) -> "ModelVelocity":
        self.model.to(device)
        return self


def make_teacher(spec: dict | TeacherConfig, interpolant: Interpolant) -> VelocityField:
    cfg = validate(TeacherConfig, spec, "teacher")
    if cfg.kind == "exact":
        if cfg.target is None:
            raise ValueError("teacher: kind 'exact' needs 'target' (one of the toy targets, e.g. 'flower').")
        return ExactVelocity(make_target(cfg.target), interpolant)
    if cfg.path is None:
        raise ValueError("teacher: kind 'checkpoint' needs 'path' (a flow-map checkpoint file).")
    return ModelVelocity(load_flow_map(cfg.path, use_ema=cfg.use_ema))
