"""Flow-map weights on disk: the network's config, its weights and (optionally) EMA weights.

A file written by `save_flow_map` rebuilds its model with no other input, so a trained model can
serve as the velocity teacher of a distillation run (its diagonal v_{t,t} is the velocity).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fmm.flowmap import FlowMap
from fmm.nets import make_network

FORMAT = "fmm-flowmap/1"


def save_flow_map(path: str, model: FlowMap, ema_state: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> None:
    config = getattr(model.net, "config", None)
    if config is None:
        raise ValueError("only networks built by fmm.nets.make_network can be saved (their config is recorded).")
    payload = {"format": FORMAT, "network": config, "model": model.state_dict(), "ema": ema_state, **(extra or {})}
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_flow_map(path: str, *, use_ema: bool = True, map_location: str | torch.device = "cpu") -> FlowMap:
    """Rebuild the flow map saved at `path`, with its EMA weights when present and `use_ema`."""
    if not os.path.isfile(path):
        raise ValueError(f"no flow-map checkpoint at {path!r}: give the path of a file written by fmm.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated or foreign files raise several types (EOFError, UnpicklingError, ...)
        raise ValueError(f"{path!r} cannot be read as a flow-map checkpoint (truncated or corrupt?): "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an fmm flow-map checkpoint (expected format {FORMAT!r}).")
    config = dict(payload["network"])
    model = FlowMap(make_network(config.pop("name"), **config))
    state = payload["ema"] if use_ema and payload.get("ema") is not None else payload["model"]
    model.load_state_dict(state)
    return model
