"""Exact ground truth: velocities of Gaussian mixtures and box mixtures, closed-form Gaussian maps,
and a float64 reference flow map, so that every loss and sampler can be judged against an exact answer."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor

from fmm.groundtruth.checkerboard import BoxMixture
from fmm.groundtruth.mixture import GaussianFlowMap, GaussianMixture, GaussianTarget
from fmm.groundtruth.reference import reference_flow_map
from fmm.interpolants import Interpolant

Target = GaussianMixture | BoxMixture

TARGETS: dict[str, Callable[[], Target]] = {
    "flower": GaussianMixture.flower,
    "checkerboard": BoxMixture.checkerboard,
}


def target_options(name: str) -> dict[str, Any]:
    """The options a named target takes, with their defaults (e.g. checkerboard: squares, extent)."""
    return {p.name: p.default for p in inspect.signature(TARGETS[name]).parameters.values()}


def make_target(name: str, options: dict[str, Any] | None = None) -> Target:
    """A named toy target built with `options` (data.target_options); an unknown name or option, or a
    value the target refuses, is a ValueError naming it and what is allowed."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}.")
    options = dict(options or {})
    allowed = target_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"target {name!r} takes the options {allowed} (name: default); got unknown {unknown}.")
    for key, value in options.items():
        kind = type(allowed[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ValueError(f"target {name!r}: option {key!r} is {'an integer' if kind is int else 'a number'} "
                             f"(default {allowed[key]!r}); got {value!r}.")
        if not value > 0:
            raise ValueError(f"target {name!r}: option {key!r} must be positive (default {allowed[key]!r}); "
                             f"got {value!r}.")
    return TARGETS[name](**options)


class ExactVelocity:
    """The exact velocity b_t(x) of `target` under `interpolant`, as a plain field b(t, x).

    Carries the target's `t_max` so that solvers and the reference map never step onto a singular end.
    """

    def __init__(self, target: Target, interpolant: Interpolant):
        self.target, self.interpolant = target, interpolant
        self.t_max = target.t_max
        self.sample_shape = (target.dim,)

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        return self.target.velocity(self.interpolant, t, x)


__all__ = ["TARGETS", "BoxMixture", "ExactVelocity", "GaussianFlowMap", "GaussianMixture", "GaussianTarget", "Target",
           "make_target", "reference_flow_map", "target_options"]
