"""Argument checks shared by the math core: times in [0, 1] and per-sample time vectors.

Every check raises a ValueError that names the offending value and what is allowed, so a bad
argument never turns into a silent broadcast deep inside a network or a solver.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_unit_interval(t: Tensor | float, name: str = "t") -> None:
    """Raise unless every entry of `t` lies in [0, 1] (and is finite)."""
    tt = torch.as_tensor(t)
    bad = ~((tt >= 0) & (tt <= 1))
    if bool(bad.any()):
        first = tt[bad].flatten()[0].item() if tt.dim() else tt.item()
        raise ValueError(
            f"{name} must lie in [0, 1] (t = 0 is noise, t = 1 is data); got {first!r}"
            f"{' among ' + str(int(bad.sum())) + ' bad entries' if tt.dim() else ''}."
        )


def batch_times(t: Tensor | float, x: Tensor, name: str = "t") -> Tensor:
    """Return `t` as a [B] vector matching the batch of `x` ([B, ...]).

    A Python number or 0-dim tensor is repeated over the batch; a [B] tensor is kept; any
    other shape is refused rather than broadcast.
    """
    if x.dim() < 1:
        raise ValueError(f"x must have a batch dimension, got a tensor of shape {tuple(x.shape)}.")
    batch = x.shape[0]
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"{name} must be a scalar or a vector of shape ({batch},) matching x's batch; "
            f"got shape {tuple(t.shape)} for x of shape {tuple(x.shape)}."
        )
    return t


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """View a [B] vector as [B, 1, ..., 1] so it multiplies a [B, ...] tensor per sample."""
    return t.reshape(t.shape + (1,) * (x.dim() - 1))
