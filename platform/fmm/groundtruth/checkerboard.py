"""Exact interpolant velocity for a mixture of uniform boxes, such as the LSD checkerboard (docs/science.md §8.4).

Target: x1 uniform on a union of axis-aligned boxes B_k = prod_j [a_kj, b_kj], box k chosen with
probability pi_k (proportional to its volume for a uniform board). The Gaussian part of the
interpolant, n = alpha_t x0 + gamma_t z, is N(0, c_t I) with c_t = alpha_t^2 sigma0^2 + gamma_t^2,
so given I_t = x and box k the coordinates of x1 are independent, each with density proportional
to N(x_j; beta_t y, c_t) on [a_kj, b_kj]: a truncated normal. With

    Z_kj = integral_a^b N(x_j; beta_t y, c_t) dy,       M_kj = E[x1_j | I_t = x, k],

the box posterior is w_k proportional to pi_k prod_j Z_kj / (b_kj - a_kj), the denoiser is
D_t(x) = sum_k w_k M_k, and the velocity is

    b_t(x) = beta'_t D_t(x) + c'_t / (2 c_t) (x - beta_t D_t(x))

(the Gaussian part is regressed on its own value; for gamma = 0 this is the denoiser
identity of docs/science.md §1.1, (alpha'/alpha) x + (beta' - alpha' beta / alpha) D).

Numerics, per coordinate, in float64:
- when the truncated normal is wide against its box (beta_t (b - a) <= 2 sqrt(c_t), which covers
  t = 0 where beta = 0), 16-point Gauss-Legendre quadrature of the smooth integrand, in log space;
- otherwise the closed form through log_ndtr, reflected into the lower tail so that the
  difference of normal CDFs never cancels.
At t = 1 (c = 0 when gamma = 0) the velocity is singular; it is defined for t <= t_max = 1 - 1e-4
and evaluating it later is an error: take the last step with Euler (the solvers' last_step_euler).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.special import erfcx, log_ndtr

from fmm.interpolants import Interpolant
from fmm.tensor_checks import batch_times

F64 = torch.float64
_NODES, _WEIGHTS = (torch.as_tensor(v, dtype=F64) for v in np.polynomial.legendre.leggauss(16))
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _truncated_normal(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """log(Phi(hi) - Phi(lo)) and the mean shift (phi(lo) - phi(hi)) / (Phi(hi) - Phi(lo)), for lo < hi.

    Reflected so that lo <= 0, then written with the Mills ratio m(u) = phi(u) / Phi(u) =
    sqrt(2/pi) / erfcx(-u / sqrt(2)) and r = Phi(lo) / Phi(hi), so that no two huge log-densities
    are ever subtracted (far from the box, at t near 1, the standardised bounds reach 1e9).
    """
    flip = lo > 0
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi = log_ndtr(hi)
    # r < 1 always; it rounds to 1 only when lo and hi are equal in floating point (points ~1e20 out).
    log_r = torch.clamp(log_ndtr(lo) - log_hi, max=-torch.finfo(lo.dtype).tiny)
    one_minus_r = -torch.expm1(log_r)
    mills_lo, mills_hi = (_SQRT_2_OVER_PI / erfcx(-u / math.sqrt(2)) for u in (lo, hi))
    shift = (mills_lo * torch.exp(log_r) - mills_hi) / one_minus_r
    return log_hi + torch.log(one_minus_r), torch.where(flip, -shift, shift)


class BoxMixture:
    """A mixture of uniform distributions on axis-aligned boxes in R^d."""

    t_max: float = 1.0 - 1e-4

    def __init__(self, lows: Tensor, highs: Tensor, weights: Tensor | None = None):
        lows, highs = torch.as_tensor(lows, dtype=F64), torch.as_tensor(highs, dtype=F64)
        if lows.dim() != 2 or lows.shape != highs.shape:
            raise ValueError(f"box corners must both be [K, d]; got {tuple(lows.shape)} and {tuple(highs.shape)}.")
        if bool((highs <= lows).any()):
            raise ValueError("every box needs high > low in each coordinate.")
        volumes = (highs - lows).prod(1)
        weights = volumes if weights is None else torch.as_tensor(weights, dtype=F64)
        if weights.shape != volumes.shape or bool((weights <= 0).any()):
            raise ValueError(f"box weights must be {len(volumes)} positive numbers; got {weights.tolist()}.")
        self.lows, self.highs, self.weights = lows, highs, weights / weights.sum()
        self.dim = lows.shape[1]

    @classmethod
    def checkerboard(cls, squares: int = 4, extent: float = 2.0) -> BoxMixture:
        """The 2-D checkerboard: the squares (i + j even) of a squares x squares board on [-extent, extent]^2."""
        if squares < 2:
            raise ValueError(f"a checkerboard needs at least 2 squares per side; got {squares}.")
        side = 2 * extent / squares
        corners = [(-extent + i * side, -extent + j * side)
                   for i in range(squares) for j in range(squares) if (i + j) % 2 == 0]
        lows = torch.tensor(corners, dtype=F64)
        return cls(lows, lows + side)

    def std(self) -> float:
        """The data's standard deviation, sqrt(tr Cov(x1) / d), in closed form (interpolant.sigma0: data):
        per coordinate, E x = sum_k pi_k (a + b) / 2 and E x^2 = sum_k pi_k (a^2 + a b + b^2) / 3."""
        a, b = self.lows, self.highs
        mean = self.weights @ ((a + b) / 2)
        second = self.weights @ ((a * a + a * b + b * b) / 3)
        return float((second - mean**2).mean().sqrt())

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        box = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        u = torch.rand(n, self.dim, dtype=F64, generator=generator)
        return self.lows[box] + u * (self.highs[box] - self.lows[box])

    def _posterior(self, interpolant: Interpolant, t: Tensor | float, x: Tensor):
        """log(pi_k prod_j Z_kj / width_kj) and M_kj, each [B, K(, d)]."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"these boxes live in R^{self.dim}: x must be [B, {self.dim}]; got {tuple(x.shape)}.")
        t = batch_times(t, x).to(F64)
        if bool((t > self.t_max).any()):
            raise ValueError(
                f"the box-mixture velocity is singular at t = 1 and defined only for t <= {self.t_max}; got "
                f"t = {t.max().item()!r}. Finish a solve with an Euler step (last_step_euler) or stop at t_max."
            )
        x = x.to(F64)[:, None, :]                                          # [B, 1, d]
        coef = interpolant.coefficients(t)
        c, dc = interpolant.noise_variance(t)
        beta = coef.beta[:, None, None]
        sd = c.sqrt()[:, None, None]
        lo, hi = self.lows[None], self.highs[None]                         # [1, K, d]
        width = hi - lo

        # Closed form: Z = (Phi(B) - Phi(A)) / beta, M = (x + sd (phi(A) - phi(B)) / (Phi(B) - Phi(A))) / beta.
        a_std, b_std = (beta * lo - x) / sd, (beta * hi - x) / sd
        log_mass, ratio = _truncated_normal(a_std, b_std)
        log_z_exact = log_mass - torch.log(beta)
        mean_exact = (x + sd * ratio) / beta

        # Quadrature: y_q = nodes mapped to [lo, hi], log-integrand log N(x; beta y_q, c).
        y = lo[..., None] + 0.5 * (_NODES + 1) * width[..., None]          # [1, K, d, Q]
        log_terms = (torch.log(0.5 * width[..., None] * _WEIGHTS)
                     - 0.5 * ((x[..., None] - beta[..., None] * y) / sd[..., None]) ** 2
                     - _LOG_SQRT_2PI - torch.log(sd[..., None]))
        log_z_quad = torch.logsumexp(log_terms, dim=-1)
        mean_quad = (torch.softmax(log_terms, dim=-1) * y).sum(-1)

        use_quad = beta * width <= 2 * sd
        log_z = torch.where(use_quad, log_z_quad, log_z_exact)
        mean = torch.where(use_quad, mean_quad, mean_exact)
        logw = self.weights.log()[None] + (log_z - torch.log(width)).sum(-1)
        return logw, mean, coef, c, dc

    def denoiser(self, interpolant: Interpolant, t: Tensor | float, x: Tensor) -> Tensor:
        logw, mean, *_ = self._posterior(interpolant, t, x)
        return (torch.softmax(logw, dim=1)[..., None] * mean).sum(1).to(x.dtype)

    def velocity(self, interpolant: Interpolant, t: Tensor | float, x: Tensor) -> Tensor:
        logw, mean, coef, c, dc = self._posterior(interpolant, t, x)
        d = (torch.softmax(logw, dim=1)[..., None] * mean).sum(1)
        x64 = x.to(F64)
        b = coef.dbeta[:, None] * d + (dc / (2 * c))[:, None] * (x64 - coef.beta[:, None] * d)
        return b.to(x.dtype)

    def log_density(self, interpolant: Interpolant, t: Tensor | float, x: Tensor) -> Tensor:
        return torch.logsumexp(self._posterior(interpolant, t, x)[0], dim=1).to(x.dtype)
