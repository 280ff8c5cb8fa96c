"""Objectives, registered by name: flow matching; LMD, EMD, PFMM (distillation); the two-map loss and
Eulerian direct estimation (direct); LSD, ESD, PSD (self-distillation); and the baselines: CD, CT,
iCT, sCD, sCT, AYF-EMD, CTM (consistency) and progressive distillation, shortcut, MeanFlow (few_step)."""

from __future__ import annotations

# Importing a family registers its objectives; the order is the listing order.
from fmm.objectives import flow_matching  # noqa: F401, I001
from fmm.objectives import distillation  # noqa: F401
from fmm.objectives import direct  # noqa: F401
from fmm.objectives import self_distillation  # noqa: F401
from fmm.objectives import consistency  # noqa: F401
from fmm.objectives import few_step  # noqa: F401
from fmm.objectives.base import Objective, ObjectiveOptions, Term
from fmm.objectives.registry import OBJECTIVES, make_objective
from fmm.objectives.times import TimeSampling
from fmm.sampling import make_sampler


def sampler_for(spec: dict, interpolant, seed: int = 0):
    """(sampler, kind) with which the method of objective `spec` is evaluated: its authors' sampler
    (fmm.sampling.make_sampler), e.g. denoise-and-renoise for consistency models."""
    how = make_objective(dict(spec), interpolant).sampler()
    return make_sampler(**how, interpolant=interpolant, seed=seed), how["kind"]


def describe() -> list[dict[str, str]]:
    """One row per objective: name, paper, equation, whether it needs a teacher, what its student starts
    from by default (init), and its options."""
    rows = []
    for name, cls in OBJECTIVES.items():
        defaults = cls.Options()
        options = ", ".join(f"{key}={getattr(defaults, key)!r}" for key in cls.Options.model_fields
                            if key != "time_sampling")
        rows.append({"name": name, "paper": cls.paper, "equation": cls.equation,
                     "teacher": "yes" if cls.needs_teacher else "no",
                     "init": "teacher" if cls.init_from_teacher else "none",
                     "options": options + f", time_sampling.kind={defaults.time_sampling.kind!r}"})
    return rows


__all__ = ["OBJECTIVES", "Objective", "ObjectiveOptions", "Term", "TimeSampling", "describe", "make_objective", "sampler_for"]
