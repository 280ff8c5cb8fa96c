"""Validation of configuration dictionaries (from YAML) into pydantic models, with errors that name the key."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, NaN and infinity are not numbers, values are validated
    on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


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
                allowed = ", ".join(sorted(_section(model, e["loc"][:-1]).model_fields))
                problems.append(f"unknown key '{key}' (allowed: {allowed})")
            elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
                # A check across a whole section: its message says what is wrong; echoing the section
                # would only repeat it (and could copy a value the check refused, such as a credential).
                message = e["msg"].removeprefix("Value error, ")
                problems.append(message if key == "(root)" else f"'{key}': {message}")
            else:
                problems.append(f"'{key}': {e['msg']} (got {_short(e.get('input'))})")
        raise ValueError(f"{where}: " + "; ".join(p.rstrip(".") for p in problems) + ".") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _section(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The model of the section at `loc` inside `model` (for naming the keys it allows)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return model
        model = annotation
    return model
