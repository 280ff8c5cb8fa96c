"""Two-time networks v_theta(s, t, x), built by name from a config."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from fmm.nets.base import TwoTimeNet
from fmm.nets.mlp import TwoTimeMLP
from fmm.nets.unet import TwoTimeUNet

NETWORKS: dict[str, type[TwoTimeNet]] = {"mlp": TwoTimeMLP, "unet": TwoTimeUNet}
MAX_PARAMETERS = 2**31


def network_parameters(name: str) -> list[str]:
    """The keyword arguments a network of this name accepts."""
    return [p for p in inspect.signature(NETWORKS[name].__init__).parameters if p != "self"]


def make_network(name: str, **kwargs: Any) -> TwoTimeNet:
    """Build a network by name; an unknown name or keyword is a ValueError listing what is allowed."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}.")
    allowed = network_parameters(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"network {name!r} takes {allowed}; got unknown {unknown}.")
    for key in ("channel_mult", "attn_resolutions"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        with torch.device("meta"):  # sized first, allocating nothing: a typo'd width must not exhaust memory
            size = sum(p.numel() for p in NETWORKS[name](**kwargs).parameters())
    except (TypeError, RuntimeError, OverflowError) as err:
        raise ValueError(f"network {name!r} cannot be built from {kwargs}: {err}") from None
    if size > MAX_PARAMETERS:
        raise ValueError(f"network {name!r} with {kwargs} has {size:,} parameters, more than {MAX_PARAMETERS:,}: "
                         f"check its sizes.")
    net = NETWORKS[name](**kwargs)
    net.config = {"name": name, **kwargs}
    return net


__all__ = ["NETWORKS", "TwoTimeMLP", "TwoTimeNet", "TwoTimeUNet", "make_network", "network_parameters"]
