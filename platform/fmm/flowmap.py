"""The two-time flow map X_{s,t}(x) = x + (t - s) v_{s,t}(x) and its derivatives.

FMM (Boffi, Albergo & Vanden-Eijnden 2406.07507) and LSD (2505.18825, Prop. 2.2) parameterise the
map of the probability-flow ODE dx/dt = b_t(x) by its chord slope v, so that X_{s,s} = id holds by
construction and the tangent condition reads v_{t,t}(x) = b_t(x): the diagonal of v is the
velocity. The derivatives the objectives need come from torch.func.jvp in one forward-mode pass:

    time_jvp:     (X_{s,t}(x), d/dt X_{s,t}(x))                           Lagrangian terms (LMD, LSD)
    eulerian_jvp: (X_{s,t}(x), d/ds X_{s,t}(x) + grad_x X_{s,t}(x) . b)   Eulerian terms (EMD, ESD)

The time arguments are per-sample [B] vectors, so a tangent of ones gives the per-sample partial
derivative; this relies on no layer mixing batch elements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fmm.nets.base import TwoTimeNet
from fmm.validation import batch_times, check_unit_interval, expand_like

VelocityField = Callable[[Tensor, Tensor], Tensor]
"""b(t, x): t of shape [B], x of shape [B, ...], returns [B, ...]."""


class FlowMap(nn.Module):
    """X_{s,t}(x) = x + (t - s) v_theta(s, t, x) around a two-time network."""

    def __init__(self, net: TwoTimeNet):
        super().__init__()
        self.net = net

    def _times(self, s: Tensor | float, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = batch_times(s, x, "s"), batch_times(t, x, "t")
        check_unit_interval(s, "s")
        check_unit_interval(t, "t")
        return s, t

    def _map(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return x + expand_like(t - s, x) * self.net(s, t, x)

    def forward(self, s: Tensor | float, t: Tensor | float, x: Tensor) -> Tensor:
        """X_{s,t}(x)."""
        s, t = self._times(s, t, x)
        return self._map(s, t, x)

    def slope(self, s: Tensor | float, t: Tensor | float, x: Tensor) -> Tensor:
        """v_{s,t}(x), the average velocity of the chord from time s to time t."""
        s, t = self._times(s, t, x)
        return self.net(s, t, x)

    def velocity(self, t: Tensor | float, x: Tensor) -> Tensor:
        """b_t(x) as the model sees it: the diagonal v_{t,t}(x)."""
        return self.slope(t, t, x)

    def time_jvp(self, s: Tensor | float, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """(X_{s,t}(x), d/dt X_{s,t}(x)) with x held fixed."""
        s, t = self._times(s, t, x)
        return torch.func.jvp(lambda tt: self._map(s, tt, x), (t,), (torch.ones_like(t),))

    def eulerian_jvp(self, s: Tensor | float, t: Tensor | float, x: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(X_{s,t}(x), d/ds X_{s,t}(x) + grad_x X_{s,t}(x) b): the Eulerian residual's two terms in one pass."""
        s, t = self._times(s, t, x)
        if b.shape != x.shape:
            raise ValueError(f"the tangent b must have the shape of x {tuple(x.shape)}; got {tuple(b.shape)}.")
        return torch.func.jvp(lambda ss, xx: self._map(ss, t, xx), (s, x), (torch.ones_like(s), b))

