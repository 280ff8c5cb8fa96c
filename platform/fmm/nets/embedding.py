"""Two-time conditioning: positional embeddings of s and of the step t - s, summed (LSD, 2505.18825 §G).

The self-distillation paper embeds s and (t - s) with positional (fixed-frequency) embeddings,
sums them and conditions every block by FiLM; it found random Fourier features less stable.
Everything here acts per sample, so the networks stay safe under torch.func.jvp in s and t.

Times enter unscaled by default (time_scale = 1, frequencies 10000^(-i/half) <= 1 per unit time),
not multiplied by 1000 as DDPM's integer steps are: sCM (Lu & Song 2024) traced JVP instability to
large time-embedding scales, and here a two-time MLP trained by LSD for 400 steps on a 2-D Gaussian
reached a covariance error of 0.03 at one step with scale 1 against 0.93 with scale 1000
(0.19 with 10, 0.34 with 100).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def positional_embedding(t: Tensor, dim: int, scale: float) -> Tensor:
    """[cos(scale t f_i), sin(scale t f_i)] with f_i = 10000^(-i / (dim/2)), for t of shape [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = (scale * t)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TwoTimeEmbedding(nn.Module):
    """e(s, t) = MLP(W_s pos(s) + W_d pos(t - s)), a [B, dim] conditioning vector."""

    def __init__(self, dim: int, time_scale: float = 1.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the time-embedding width must be even; got {dim}.")
        self.dim, self.time_scale = dim, float(time_scale)
        self.embed_s = nn.Linear(dim, dim)
        self.embed_step = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim), nn.SiLU())

    @torch.no_grad()
    def forget_step(self) -> None:
        """Make the embedding independent of t - s, as it is at t = s: the step's linear map is zeroed and
        its value at a zero step folded into the bias. A network trained on the diagonal (a velocity
        teacher) then gives v_{s,t} = v_{s,s} everywhere, and its map is the teacher's Euler step; the
        zeroed weights still train (their input pos(t - s) is not zero)."""
        zero = positional_embedding(torch.zeros(1, dtype=self.embed_step.weight.dtype,
                                                device=self.embed_step.weight.device), self.dim, self.time_scale)
        self.embed_step.bias.copy_(self.embed_step(zero)[0])
        self.embed_step.weight.zero_()

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        e = self.embed_s(positional_embedding(s, self.dim, self.time_scale))
        e = e + self.embed_step(positional_embedding(t - s, self.dim, self.time_scale))
        return self.mlp(e)
