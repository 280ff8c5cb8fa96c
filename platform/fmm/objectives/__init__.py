"""Flow-map objectives, registered by name: flow matching; LMD, EMD, PFMM (distillation); the two-map
loss and Eulerian direct estimation (direct); LSD, ESD, PSD (self-distillation)."""

from __future__ import annotations

# Importing a family registers its objectives; the order is the listing order.
from fmm.objectives import flow_matching  # noqa: F401, I001
from fmm.objectives import distillation  # noqa: F401
from fmm.objectives import direct  # noqa: F401
from fmm.objectives import self_distillation  # noqa: F401
from fmm.objectives.base import Objective, ObjectiveOptions, Term
from fmm.objectives.registry import OBJECTIVES, make_objective
from fmm.objectives.times import TimeSampling


def describe() -> list[dict[str, str]]:
    """One row per objective: name, paper, equation, whether it needs a teacher, and its options."""
    rows = []
    for name, cls in OBJECTIVES.items():
        defaults = cls.Options()
        options = ", ".join(f"{key}={getattr(defaults, key)!r}" for key in cls.Options.model_fields
                            if key != "time_sampling")
        rows.append({"name": name, "paper": cls.paper, "equation": cls.equation,
                     "teacher": "yes" if cls.needs_teacher else "no",
                     "options": options + f", time_sampling.kind={defaults.time_sampling.kind!r}"})
    return rows


__all__ = ["OBJECTIVES", "Objective", "ObjectiveOptions", "Term", "TimeSampling", "describe", "make_objective"]
