"""Two-time MLPs for vector data: FiLM on embedded times (the default), or raw times as inputs.

`times: raw` is the self-distillation paper's checkerboard network (2505.18825 Table 2: an MLP 512
wide with GELU on the raw times): (x / input_scale, s, t) into an input layer, then `depth` hidden
layers, all GELU, and a zero-initialised output; `input_scale: data` divides x by the data's
standard deviation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fmm.nets.base import TwoTimeNet
from fmm.nets.embedding import TwoTimeEmbedding


class FiLMLayer(nn.Module):
    """h -> dropout(act(Linear(h) * (1 + scale(e)) + shift(e)))."""

    def __init__(self, width: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        scale, shift = self.film(e).chunk(2, dim=1)
        return self.dropout(self.act(self.linear(h) * (1 + scale) + shift))


class TwoTimeMLP(TwoTimeNet):
    """v_theta(s, t, x) for x in R^dim and a zero-initialised output layer (the untrained map is the
    identity, X_{s,t}(x) = x), with times either
    - `embedding`: an input layer on x, then `depth` FiLM layers conditioned on the two-time embedding;
    - `raw`: an input layer on (x / input_scale, s, t), then `depth` hidden layers, each with GELU.
    """

    def __init__(self, dim: int, width: int = 512, depth: int = 4, emb_dim: int = 128, time_scale: float = 1.0,
                 dropout: float = 0.0, times: Literal["embedding", "raw"] = "embedding", input_scale: float = 1.0):
        super().__init__()
        for key, value in (("dim", dim), ("width", width), ("depth", depth), ("emb_dim", emb_dim)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"mlp: {key} must be a positive integer; got {value!r}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"mlp: dropout must lie in [0, 1); got {dropout!r}.")
        if times not in ("embedding", "raw"):
            raise ValueError(f"mlp: times is 'embedding' (FiLM on embedded s and t - s) or 'raw' (s and t as "
                             f"inputs); got {times!r}.")
        if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) or not input_scale > 0:
            raise ValueError(f"mlp: input_scale is a positive number (or 'data': the data's standard deviation); "
                             f"got {input_scale!r}.")
        self.sample_shape = (dim,)
        self.times, self.input_scale = times, float(input_scale)
        if times == "raw":
            self.inp = nn.Linear(dim + 2, width)
            self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
            self.act, self.dropout = nn.GELU(), nn.Dropout(dropout)
        else:
            self.embedding = TwoTimeEmbedding(emb_dim, time_scale)
            self.inp = nn.Linear(dim, width)
            self.layers = nn.ModuleList(FiLMLayer(width, emb_dim, dropout) for _ in range(depth))
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def velocity_slope(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        x = x / self.input_scale if self.input_scale != 1.0 else x
        if self.times == "raw":
            h = self.act(self.inp(torch.cat([x, s[:, None].to(x.dtype), t[:, None].to(x.dtype)], dim=1)))
            for layer in self.layers:
                h = self.dropout(self.act(layer(h)))
            return self.out(h)
        e = self.embedding(s, t)
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, e)
        return self.out(h)
