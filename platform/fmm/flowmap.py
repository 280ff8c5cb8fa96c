"""The two-time flow map X_{s,t}(x) = x + (t - s) v_{s,t}(x) and its derivatives.

FMM (Boffi, Albergo & Vanden-Eijnden 2406.07507) and LSD (2505.18825, Prop. 2.2) parameterise the
map of the probability-flow ODE dx/dt = b_t(x) by its chord slope v, so that X_{s,s} = id holds by
construction and the tangent condition reads v_{t,t}(x) = b_t(x): the diagonal of v is the
velocity. The derivatives the objectives need come from torch.func.jvp in one forward-mode pass:

    time_jvp:     (X_{s,t}(x), d/dt X_{s,t}(x))                           Lagrangian terms (LMD, LSD)
    eulerian_jvp: (X_{s,t}(x), d/ds X_{s,t}(x) + grad_x X_{s,t}(x) . b)   Eulerian terms (EMD, ESD)
    jvp:          any tangent (ds, dt, dx) at once

The time arguments are per-sample [B] vectors, so a tangent of ones gives the per-sample partial
derivative; this relies on no layer mixing batch elements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fmm.nets.base import TwoTimeNet
from fmm.nets.embedding import TwoTimeEmbedding
from fmm.tensor_checks import batch_times, check_unit_interval, expand_like

VelocityField = Callable[[Tensor, Tensor], Tensor]
"""b(t, x): t of shape [B], x of shape [B, ...], returns [B, ...]."""


class TwoTimeMap(nn.Module):
    """What the objectives and samplers see of a flow map: X, its slope v, its diagonal, its JVPs.

    Subclasses give `_map(s, t, x)` and `_slope(s, t, x)` on already-checked [B] time vectors.
    """

    sample_shape: tuple[int, ...] = ()

    def _map(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _slope(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _times(self, s: Tensor | float, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = batch_times(s, x, "s"), batch_times(t, x, "t")
        check_unit_interval(s, "s")
        check_unit_interval(t, "t")
        return s, t

    def forward(self, s: Tensor | float, t: Tensor | float, x: Tensor) -> Tensor:
        """X_{s,t}(x)."""
        s, t = self._times(s, t, x)
        return self._map(s, t, x)

    def slope(self, s: Tensor | float, t: Tensor | float, x: Tensor) -> Tensor:
        """v_{s,t}(x), the average velocity of the chord from time s to time t."""
        s, t = self._times(s, t, x)
        return self._slope(s, t, x)

    def velocity(self, t: Tensor | float, x: Tensor) -> Tensor:
        """b_t(x) as the map sees it: the diagonal v_{t,t}(x)."""
        return self.slope(t, t, x)

    def jvp(self, s: Tensor | float, t: Tensor | float, x: Tensor, ds: Tensor | float | None = None,
            dt: Tensor | float | None = None, dx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(X_{s,t}(x), ds d/ds X + dt d/dt X + grad_x X . dx) in one forward-mode pass.

        Arguments whose tangent is None are held fixed (closed over), so no tangent is carried for them.
        """
        s, t = self._times(s, t, x)
        if dx is not None and dx.shape != x.shape:
            raise ValueError(f"the tangent dx must have the shape of x {tuple(x.shape)}; got {tuple(dx.shape)}.")
        names = [n for n, d in (("s", ds), ("t", dt), ("x", dx)) if d is not None]
        if not names:
            raise ValueError("jvp needs at least one tangent among ds, dt and dx.")
        fixed = {"s": s, "t": t, "x": x}
        primals = tuple(fixed[n] for n in names)
        tangents = tuple(dx if n == "x" else batch_times(ds if n == "s" else dt, x, "d" + n) for n in names)

        def along(*moving: Tensor) -> Tensor:
            args = dict(fixed, **dict(zip(names, moving)))
            return self._map(args["s"], args["t"], args["x"])

        # JVPs stay in full precision under a bf16 autocast: their tangents feed loss targets directly.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.func.jvp(along, primals, tangents)

    def time_jvp(self, s: Tensor | float, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """(X_{s,t}(x), d/dt X_{s,t}(x)) with x held fixed."""
        return self.jvp(s, t, x, dt=1.0)

    def eulerian_jvp(self, s: Tensor | float, t: Tensor | float, x: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(X_{s,t}(x), d/ds X_{s,t}(x) + grad_x X_{s,t}(x) b): the Eulerian residual's two terms in one pass."""
        return self.jvp(s, t, x, ds=1.0, dx=b)


class FlowMap(TwoTimeMap):
    """X_{s,t}(x) = x + (t - s) v_theta(s, t, x) around a two-time network."""

    form = "linear"  # how the network's output makes the map; saved with the weights (fmm.checkpoint)

    def __init__(self, net: TwoTimeNet):
        super().__init__()
        self.net = net
        self.sample_shape = tuple(net.sample_shape)

    def _slope(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return self.net(s, t, x)

    def _map(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return x + expand_like(t - s, x) * self.net(s, t, x)

    def start_from(self, teacher: FlowMap) -> None:
        """Start from a trained velocity teacher of the same network, as distillation students do in the
        consistency-model, CTM, progressive-distillation, sCM and Align Your Flow papers: its weights,
        with every two-time embedding made blind to t - s (TwoTimeEmbedding.forget_step). At step 0 the
        diagonal v_{t,t} is the teacher's velocity and X_{s,t}(x) = x + (t - s) b_s(x), the teacher's
        Euler step (for s -> 1, the one-step denoiser those papers' students start as)."""
        if not same_network(self, teacher):
            raise ValueError(f"the teacher's network {getattr(teacher.net, 'config', None)} is not this model's "
                             f"{getattr(self.net, 'config', None)}: a student starts from its teacher's weights only "
                             f"when both are the same network.")
        if getattr(self.net, "times", "embedding") == "raw":
            raise ValueError("a student starts from its teacher's weights through a two-time embedding made blind to "
                             "t - s, and this network takes raw times (network.times: raw): use times: embedding, "
                             "or init: none.")
        self.load_state_dict(teacher.state_dict())
        for module in self.modules():
            if isinstance(module, TwoTimeEmbedding):
                module.forget_step()


class TrigFlowMap(FlowMap):
    """TrigFlow's parametrisation (Lu & Song 2024, 2410.11081 eq. (5)-(6), and Align Your Flow's flow map,
    2506.14603 §4) in two times, for the trig interpolant I_t = cos(pi t/2) x0 + sin(pi t/2) x1:

        X_{s,t}(x) = cos(D) x + (2/pi) sin(D) u_theta(s, t, x),    D = (pi/2)(t - s),

    the DDIM step of TrigFlow from s to t. With TrigFlow's time tau = (pi/2)(1 - s) and sigma_d = sigma0,
    X_{s,1}(x) = cos(tau) x - sin(tau) sigma_d F(x/sigma_d, tau) is sCM's consistency function, with
    F = -2 u / (pi sigma_d): the network outputs velocity units, so that the diagonal v_{t,t} = u_theta
    is the velocity exactly as in FlowMap and a flow-matching teacher's weights are this map's start
    (start_from). X_{s,s} = id holds for any network."""

    form = "trig"

    def _slope(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        # (X - x) / (t - s) without the 0/0 at s = t: (cos D - 1)/(t - s) = -(pi/2) sin(D/2) sinc(D/2pi),
        # (2/pi) sin(D)/(t - s) = sinc(D/pi), with torch.sinc(y) = sin(pi y)/(pi y).
        half = expand_like(torch.pi / 4 * (t - s), x)
        return -torch.pi / 2 * torch.sin(half) * torch.sinc(half / torch.pi) * x \
            + torch.sinc(2 * half / torch.pi) * self.net(s, t, x)

    def _map(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        d = expand_like(torch.pi / 2 * (t - s), x)
        return torch.cos(d) * x + 2 / torch.pi * torch.sin(d) * self.net(s, t, x)


MAP_FORMS: dict[str, type[FlowMap]] = {"linear": FlowMap, "trig": TrigFlowMap}


def make_flow_map(net: TwoTimeNet, form: str = "linear") -> FlowMap:
    """The flow map of `form` ('linear': FlowMap, 'trig': TrigFlowMap) around `net`."""
    if form not in MAP_FORMS:
        raise ValueError(f"unknown flow-map form {form!r}; choose one of {sorted(MAP_FORMS)}.")
    return MAP_FORMS[form](net)


def same_network(a: nn.Module, b: nn.Module) -> bool:
    """Whether the weights of `b` load into `a`: the same parameters and buffers, of the same shapes."""
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (a, b)]
    return shapes[0] == shapes[1]


class ModelVelocity:
    """The diagonal v_{t,t} of a trained, frozen flow map, as a velocity field: how a trained model serves
    as the teacher of a distillation run or as the ODE whose solvers a few-step map is compared with."""

    t_max = None

    def __init__(self, model: TwoTimeMap):
        self.model = model.eval().requires_grad_(False)
        self.sample_shape = tuple(model.sample_shape)

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        return self.model.velocity(t, x)

    def to(self, device: torch.device | str) -> ModelVelocity:
        self.model.to(device)
        return self
