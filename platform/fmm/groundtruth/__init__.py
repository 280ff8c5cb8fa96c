"""Exact ground truth: velocities of Gaussian mixtures and box mixtures, closed-form Gaussian maps,
and a float64 reference flow map, so that every loss and sampler can be judged against an exact answer."""

from __future__ import annotations

from collections.abc import Callable

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


def make_target(name: str) -> Target:
    """A named toy target; an unknown name is a ValueError listing the known ones."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}.")
    return TARGETS[name]()


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
           "make_target", "reference_flow_map"]
