"""Flow-map weights on disk: the network's config, its weights and (optionally) EMA weights.

A file written by `save_flow_map` rebuilds its model with no other input (the network's config and the
map's form, fmm.flowmap.MAP_FORMS; files without a form are linear), so a trained model can serve as
the velocity teacher of a distillation run (its diagonal v_{t,t} is the velocity).
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

from fmm.flowmap import MAP_FORMS, FlowMap, make_flow_map
from fmm.nets import make_network

FORMAT = "fmm-flowmap/1"


def save_flow_map(path: str, model: FlowMap, ema_state: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> None:
    config = getattr(model.net, "config", None)
    if config is None:
        raise ValueError("only networks built by fmm.nets.make_network can be saved (their config is recorded).")
    payload = {"format": FORMAT, "network": config, "form": model.form, "model": model.state_dict(), "ema": ema_state, **(extra or {})}
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_payload(source, map_location: str | torch.device = "cpu", name: str | None = None) -> Any:
    """A checkpoint file's payload (flow map or training state), read with `weights_only=True`: tensors
    and plain containers only, so that a file from storage or MLflow cannot run code when it is read.
    A file that needs more (pickled classes or functions) is refused with a ValueError saying so."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise
        found = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise ValueError(f"{name or source!r} holds Python objects that only running code from the file could rebuild"
                         f"{f' ({found})' if found else ''}; fmm reads checkpoints as tensors and plain containers "
                         f"only (torch.load with weights_only=True) and refuses it. Save the weights as a dict of "
                         f"tensors (fmm.checkpoint.save_flow_map).") from None


def load_flow_map(path: str, *, use_ema: bool = True, map_location: str | torch.device = "cpu") -> FlowMap:
    """Rebuild the flow map saved at `path`, with its EMA weights when present and `use_ema`."""
    return read_flow_map(path, use_ema=use_ema, map_location=map_location)[0]


def read_flow_map(path: str, *, use_ema: bool = True,
                  map_location: str | torch.device = "cpu") -> tuple[FlowMap, dict[str, Any] | None]:
    """(the flow map saved at `path`, the experiment config it was trained with, or None if not recorded)."""
    if not os.path.isfile(path):
        raise ValueError(f"no flow-map checkpoint at {path!r}: give the path of a file written by fmm.")
    try:
        payload = load_payload(path, map_location)
    except ValueError:
        raise
    except Exception as err:  # truncated or foreign files raise several types (EOFError, UnpicklingError, ...)
        raise ValueError(f"{path!r} cannot be read as a flow-map checkpoint (truncated or corrupt?): "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an fmm flow-map checkpoint (expected format {FORMAT!r}).")
    config, form = dict(payload["network"]), payload.get("form", "linear")
    if form not in MAP_FORMS:
        raise ValueError(f"{path!r} holds a flow map of form {form!r}, which this fmm does not know "
                         f"(it knows {sorted(MAP_FORMS)}).")
    model = make_flow_map(make_network(config.pop("name"), **config), form)
    state = payload["ema"] if use_ema and payload.get("ema") is not None else payload["model"]
    model.load_state_dict(state)
    return model, payload.get("config")
