"""A two-time MLP for vector data (the LSD checkerboard network: 4 layers, 512 wide, GELU)."""

from __future__ import annotations

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
    """v_theta(s, t, x) for x in R^dim: an input layer, `depth` FiLM layers and a zero-initialised output.

    The zero output layer makes the untrained map the identity, X_{s,t}(x) = x.
    """

    def __init__(self, dim: int, width: int = 512, depth: int = 4, emb_dim: int = 128, time_scale: float = 1.0,
                 dropout: float = 0.0):
        super().__init__()
        for key, value in (("dim", dim), ("width", width), ("depth", depth), ("emb_dim", emb_dim)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"mlp: {key} must be a positive integer; got {value!r}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"mlp: dropout must lie in [0, 1); got {dropout!r}.")
        self.sample_shape = (dim,)
        self.embedding = TwoTimeEmbedding(emb_dim, time_scale)
        self.inp = nn.Linear(dim, width)
        self.layers = nn.ModuleList(FiLMLayer(width, emb_dim, dropout) for _ in range(depth))
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def velocity_slope(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        e = self.embedding(s, t)
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, e)
        return self.out(h)
