"""A two-time U-Net for images, in the DDPM++ / EDM style the LSD paper trains (2505.18825 §G, Table 2).

Residual blocks with GroupNorm (per sample: no layer mixes batch elements), FiLM conditioning on
the (s, t - s) embedding, self-attention at chosen resolutions and nearest-neighbour resampling.
Attention is written out as softmax(q k^T / sqrt(d)) v rather than calling a fused SDPA kernel,
because the flash and memory-efficient kernels have no forward-mode AD and the flow-map
objectives differentiate this network with torch.func.jvp.

Sizes: channels=32, channel_mult=(1, 2, 2), num_blocks=1 gives about 1M parameters (CPU tests);
channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.13 is the
CIFAR-10 network of docs/science.md §4.3 (about 58M).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fmm.nets.base import TwoTimeNet
from fmm.nets.embedding import TwoTimeEmbedding


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(e)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of one image (explicit softmax: forward-AD safe)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels do not split into {heads} heads.")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(c // self.heads), dim=-1)
        out = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(b, c, h, w)
        return x + self.proj(out)


class Level(nn.Module):
    """Residual blocks at one resolution, each followed by attention where asked."""

    def __init__(self, channels: list[tuple[int, int]], emb_dim: int, dropout: float, attention: bool, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(ci, co, emb_dim, dropout) for ci, co in channels)
        self.attn = nn.ModuleList(Attention(co, heads) if attention else nn.Identity() for _, co in channels)


class TwoTimeUNet(TwoTimeNet):
    """v_theta(s, t, x) for images x of shape [B, in_channels, image_size, image_size]."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, channels: int = 128,
                 channel_mult: tuple[int, ...] = (2, 2, 2), num_blocks: int = 4,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.0, heads: int = 1,
                 emb_dim: int | None = None, time_scale: float = 1.0):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("image_size", image_size), ("channels", channels),
                           ("num_blocks", num_blocks), ("heads", heads)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"unet: {key} must be a positive integer; got {value!r}.")
        if not channel_mult or any(not (isinstance(m, int) and m >= 1) for m in channel_mult):
            raise ValueError(f"unet: channel_mult must be a non-empty list of positive integers; got {channel_mult!r}.")
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"unet: image_size {image_size} must be divisible by 2^{len(channel_mult) - 1} "
                f"for {len(channel_mult)} levels (channel_mult={list(channel_mult)})."
            )
        resolutions = [image_size // 2**i for i in range(len(channel_mult))]
        unused = sorted(set(attn_resolutions) - set(resolutions))
        if unused:
            raise ValueError(f"unet: attn_resolutions {unused} match no level; the levels are {resolutions}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"unet: dropout must lie in [0, 1); got {dropout!r}.")
        self.sample_shape = (in_channels, image_size, image_size)
        emb_dim = emb_dim or 4 * channels
        self.embedding = TwoTimeEmbedding(emb_dim, time_scale)
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)

        widths = [channels * m for m in channel_mult]
        skips, c = [channels], channels
        self.down = nn.ModuleList()
        for i, (res, width) in enumerate(zip(resolutions, widths)):
            pairs = []
            for _ in range(num_blocks):
                pairs.append((c, width))
                c = width
                skips.append(c)
            self.down.append(Level(pairs, emb_dim, dropout, res in attn_resolutions, heads))
            if i < len(widths) - 1:
                skips.append(c)
        self.mid = Level([(c, c), (c, c)], emb_dim, dropout, True, heads)
        self.up = nn.ModuleList()
        for res, width in reversed(list(zip(resolutions, widths))):
            pairs = []
            for _ in range(num_blocks + 1):
                pairs.append((c + skips.pop(), width))
                c = width
            self.up.append(Level(pairs, emb_dim, dropout, res in attn_resolutions, heads))
        self.downsample = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.upsample = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1) for w in reversed(widths[1:]))
        self.out_norm = group_norm(c)
        self.out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def velocity_slope(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        e = self.embedding(s, t)
        h = self.inp(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(h, e))
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        for block, attn in zip(self.mid.blocks, self.mid.attn):
            h = attn(block(h, e))
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), e))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))
