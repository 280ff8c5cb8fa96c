"""Exact interpolant velocities for Gaussian-mixture targets, and the closed-form map of a Gaussian.

Setting (docs/science.md §8.1): x0 ~ N(0, sigma0^2 I) independent of x1 ~ sum_k pi_k N(mu_k, Sigma_k), and
I_t = alpha_t x0 + beta_t x1 + gamma_t z. Given component k, I_t ~ N(m_k, C_k) with

    m_k(t) = beta_t mu_k,    C_k(t) = c_t I + beta_t^2 Sigma_k,    c_t = alpha_t^2 sigma0^2 + gamma_t^2,

and everything is jointly Gaussian, so the velocity b_t(x) = E[dI_t/dt | I_t = x] is

    b_t(x) = sum_k w_k(x, t) [ beta'_t mu_k + 1/2 C'_k(t) C_k(t)^{-1} (x - m_k) ],
    w_k proportional to pi_k N(x; m_k, C_k)   (computed with log-sum-exp).

Every C_k(t) shares its eigenvectors with Sigma_k = U_k diag(lambda_k) U_k^T, so the code works in
that eigenbasis: C_k(t) = U_k diag(c_t + beta_t^2 lambda_k) U_k^T, and no matrix is inverted per
time. All of it runs in float64; results come back in the dtype of x.

For a single Gaussian the flow map is affine and in closed form (docs/science.md §8.2):

    X_{s,t}(x) = beta_t mu + C_t^{1/2} C_s^{-1/2} (x - beta_s mu).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fmm.flowmap import TwoTimeMap
from fmm.interpolants import Interpolant
from fmm.tensor_checks import batch_times

F64 = torch.float64


class GaussianMixture:
    """sum_k pi_k N(mu_k, Sigma_k) in R^d with full, positive-definite covariances."""

    t_max: float | None = None  # the velocity is smooth on all of [0, 1]

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor):
        weights, means, covs = (torch.as_tensor(v, dtype=F64) for v in (weights, means, covariances))
        if means.dim() != 2:
            raise ValueError(f"means must have shape [K, d]; got {tuple(means.shape)}.")
        k, d = means.shape
        if weights.shape != (k,) or covs.shape != (k, d, d):
            raise ValueError(
                f"for {k} components in R^{d}, weights must be [{k}] and covariances [{k}, {d}, {d}]; "
                f"got {tuple(weights.shape)} and {tuple(covs.shape)}."
            )
        if bool((weights <= 0).any()):
            raise ValueError(f"mixture weights must be positive; got {weights.tolist()}.")
        if not torch.allclose(covs, covs.transpose(1, 2)):
            raise ValueError("mixture covariances must be symmetric.")
        eigvals, eigvecs = torch.linalg.eigh(covs)
        if bool((eigvals <= 0).any()):
            raise ValueError(
                f"mixture covariances must be positive definite (smallest eigenvalue {eigvals.min().item():.3g})."
            )
        self.weights, self.means, self.covariances = weights / weights.sum(), means, covs
        self.eigvals, self.eigvecs = eigvals, eigvecs
        self.dim = d

    @classmethod
    def isotropic(cls, weights: Tensor, means: Tensor, variances: Tensor) -> GaussianMixture:
        means = torch.as_tensor(means, dtype=F64)
        eye = torch.eye(means.shape[1], dtype=F64)
        return cls(weights, means, torch.as_tensor(variances, dtype=F64)[:, None, None] * eye)

    @classmethod
    def flower(cls, modes: int = 8, radius: float = 5.0, variance: float = 0.5) -> GaussianMixture:
        """The 2-D 'flower' of the FMM authors' code: equal modes on a circle, covariance 0.5 I."""
        angles = 2 * math.pi * torch.arange(modes, dtype=F64) / modes
        means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        return cls.isotropic(torch.ones(modes, dtype=F64), means, torch.full((modes,), variance, dtype=F64))

    def std(self) -> float:
        """The data's standard deviation, sqrt(tr Cov(x1) / d), in closed form (interpolant.sigma0: data)."""
        mean = self.weights @ self.means
        second = (self.weights[:, None, None] * (self.covariances + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return float(((torch.diagonal(second) - mean**2).mean()).sqrt())

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples (float64)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=F64, generator=generator)
        scale = self.eigvecs[comp] * self.eigvals[comp].sqrt()[:, None, :]
        return self.means[comp] + torch.einsum("nij,nj->ni", scale, noise)

    def _posterior(self, interpolant: Interpolant, t: Tensor, x: Tensor):
        """Component log-weights and the per-component pieces, in each component's eigenbasis."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"this mixture lives in R^{self.dim}: x must be [B, {self.dim}]; got {tuple(x.shape)}.")
        t = batch_times(t, x).to(F64)
        x = x.to(F64)
        coef = interpolant.coefficients(t)
        c, dc = interpolant.noise_variance(t)
        beta, dbeta = coef.beta[:, None, None], coef.dbeta[:, None, None]
        ct = c[:, None, None] + beta**2 * self.eigvals[None]                 # [B, K, d] eigenvalues of C_k(t)
        dct = dc[:, None, None] + 2 * beta * dbeta * self.eigvals[None]     # eigenvalues of C_k'(t)
        r = torch.einsum("kji,bkj->bki", self.eigvecs, x[:, None, :] - beta * self.means[None])  # U_k^T (x - m_k)
        logw = self.weights.log()[None] - 0.5 * (torch.log(2 * math.pi * ct) + r**2 / ct).sum(-1)
        return logw, r, ct, dct, coef

    def velocity(self, interpolant: Interpolant, t: Tensor | float, x: Tensor) -> Tensor:
        """b_t(x) = E[dI_t/dt | I_t = x]."""
        logw, r, ct, dct, coef = self._posterior(interpolant, t, x)
        w = torch.softmax(logw, dim=1)
        drift = torch.einsum("kij,bkj->bki", self.eigvecs, 0.5 * dct / ct * r)
        vk = coef.dbeta[:, None, None] * self.means[None] + drift
        return (w[..., None] * vk).sum(1).to(x.dtype)

    def denoiser(self, interpolant: Interpolant, t: Tensor | float, x: Tensor) -> Tensor:
        """D_t(x) = E[x1 | I_t = x]."""
        logw, r, ct, _, coef = self._posterior(interpolant, t, x)
        w = torch.softmax(logw, dim=1)
        shrink = torch.einsum("kij,bkj->bki", self.eigvecs, self.eigvals[None] / ct * r)
        dk = self.means[None] + coef.beta[:, None, None] * shrink
        return (w[..., None] * dk).sum(1).to(x.dtype)

    def log_density(self, interpolant: Interpolant, t: Tensor | float, x: Tensor) -> Tensor:
        """log rho_t(x), the log density of I_t."""
        logw = self._posterior(interpolant, t, x)[0]
        return torch.logsumexp(logw, dim=1).to(x.dtype)

    def score(self, interpolant: Interpolant, t: Tensor | float, x: Tensor) -> Tensor:
        """grad log rho_t(x) = -sum_k w_k C_k^{-1} (x - m_k)."""
        logw, r, ct, _, _ = self._posterior(interpolant, t, x)
        w = torch.softmax(logw, dim=1)
        return -(w[..., None] * torch.einsum("kij,bkj->bki", self.eigvecs, r / ct)).sum(1).to(x.dtype)


class GaussianTarget(GaussianMixture):
    """A single Gaussian N(mu, Sigma): its flow map is affine and known in closed form."""

    def __init__(self, mean: Tensor, covariance: Tensor):
        mean, cov = torch.as_tensor(mean, dtype=F64), torch.as_tensor(covariance, dtype=F64)
        super().__init__(torch.ones(1, dtype=F64), mean[None], cov[None])

    @property
    def mean(self) -> Tensor:
        return self.means[0]

    @property
    def covariance(self) -> Tensor:
        return self.covariances[0]

    def flow_map(self, interpolant: Interpolant, s: Tensor | float, t: Tensor | float, x: Tensor) -> Tensor:
        """X_{s,t}(x) = beta_t mu + U diag(sqrt(c_i(t) / c_i(s))) U^T (x - beta_s mu), forward or backward."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"this Gaussian lives in R^{self.dim}: x must be [B, {self.dim}]; got {tuple(x.shape)}.")
        s, t = batch_times(s, x, "s").to(F64), batch_times(t, x, "t").to(F64)
        lam, u, mu = self.eigvals[0], self.eigvecs[0], self.mean

        def spectrum(time: Tensor) -> tuple[Tensor, Tensor]:
            c, _ = interpolant.noise_variance(time)
            beta = interpolant.coefficients(time).beta
            return c[:, None] + beta[:, None] ** 2 * lam[None], beta

        c_s, beta_s = spectrum(s)
        c_t, beta_t = spectrum(t)
        r = (x.to(F64) - beta_s[:, None] * mu) @ u
        return (beta_t[:, None] * mu + (torch.sqrt(c_t / c_s) * r) @ u.T).to(x.dtype)


class GaussianFlowMap(TwoTimeMap):
    """The exact flow map of a Gaussian target as a TwoTimeMap, so every objective can be evaluated at
    the true answer (its residuals must vanish there). Computes in float64."""

    def __init__(self, target: GaussianTarget, interpolant: Interpolant):
        super().__init__()
        self.target, self.interpolant = target, interpolant
        self.sample_shape = (target.dim,)

    def _map(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return self.target.flow_map(self.interpolant, s, t, x)

    def _slope(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        gap = (t - s)[:, None]
        chord = (self._map(s, t, x) - x) / torch.where(gap == 0, torch.ones_like(gap), gap)
        return torch.where(gap == 0, self.target.velocity(self.interpolant, s, x), chord)
