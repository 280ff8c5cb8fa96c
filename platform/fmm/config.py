"""Validation of configuration dictionaries (from YAML) into pydantic models, with errors that name the key."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def validate(model: type[M], data: Any, where: str) -> M:
    """`model(**data)`, turning a pydantic error into one ValueError paragraph naming each bad key."""
    if isinstance(data, model):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of options, got {type(data).__name__} {data!r}.")
    try:
        return model(**data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(part) for part in e["loc"]) or "(root)"
            if e["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(model.model_fields))
                problems.append(f"unknown key '{key}' (allowed: {allowed})")
            else:
                problems.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
        raise ValueError(f"{where}: " + "; ".join(problems) + ".") from None
