"""The registry of objectives by name, and their construction from a config mapping."""

from __future__ import annotations

from typing import Any

from fmm.config import validate
from fmm.interpolants import Interpolant

OBJECTIVES: dict[str, type] = {}


def register(cls: type) -> type:
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective name {cls.name!r} registered twice")
    OBJECTIVES[cls.name] = cls
    return cls


def objective_class(spec: dict[str, Any]) -> type:
    """The class of the objective {'name': ..., **options}; a missing or unknown name is a ValueError."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"an objective is a mapping with a 'name' and its options; got {spec!r}.")
    if spec["name"] not in OBJECTIVES:
        raise ValueError(f"unknown objective {spec['name']!r}; choose one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[spec["name"]]


def make_objective(spec: dict[str, Any], interpolant: Interpolant):
    """Build an objective from {'name': ..., **options}; unknown names or options are a ValueError."""
    cls = objective_class(spec)
    options = {k: v for k, v in spec.items() if k != "name"}
    return cls(interpolant, validate(cls.Options, options, f"objective '{spec['name']}'"))
