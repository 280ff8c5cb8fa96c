"""Figures of a flow map's samples and of quality against sampling steps (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from typing import Any

import torch

from fmm.evaluation.protocol import Report
from fmm.experiment.sweep_schema import SweepConfig
from fmm.sampling import make_sampler


def pyplot():
    """matplotlib's pyplot on the Agg backend (figures go to files and MLflow, never to a screen), imported
    on first use: every Ray Train worker and trial process imports this module, and matplotlib would cost
    each about 0.6 s of CPU at start-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def sample_figure(ema, shape, steps: list[int], device, seed: int, sampler=None, sigma0: float = 1.0):
    """Samples at each step count (a scatter for 2-D points, a 4x4 grid for images), drawn with
    `sampler(model, noise, steps)` (the flow-map chain by default)."""
    sampler = sampler or make_sampler("flow_map")
    g = torch.Generator().manual_seed(seed)
    n = 2000 if len(shape) == 1 else 16
    noise = (sigma0 * torch.randn((n, *shape), generator=g)).to(device)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3.2), squeeze=False)
    with torch.no_grad():
        for ax, k in zip(axes[0], steps):
            x = sampler(ema, noise, k).samples.float().cpu()
            if len(shape) == 1:
                ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
                ax.set_aspect("equal")
            else:
                c, h, w = shape
                grid = x.clamp(-1, 1).add(1).div(2).reshape(4, 4, c, h, w).permute(0, 3, 1, 4, 2).reshape(4 * h, 4 * w, c)
                ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if c == 1 else None)
                ax.axis("off")
            ax.set_title(f"{k} step{'s' if k > 1 else ''}")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    """Free a figure once it is saved or logged (pyplot keeps every open figure alive)."""
    pyplot().close(fig)


def log_scale_if_positive(ax) -> None:
    """A log y axis when some line has positive values; linear otherwise (every score infinite, left out)."""
    if any(len(line.get_ydata()) and min(line.get_ydata()) > 0 for line in ax.get_lines()):
        ax.set_yscale("log")


def quality_figure(report: Report):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r.method for r in report.rows}, key=lambda m: (m != "flow_map", m)):
        pts = sorted((r.nfe, r.scores[report.primary]) for r in report.rows if r.method == method and r.nfe > 0
                     and math.isfinite(r.scores[report.primary]))  # an infinite KL (empty bins) has no point
        if pts:
            ax.plot(*zip(*pts), marker="o", lw=2.5 if method == "flow_map" else 1, label=method)
    ax.set_xscale("log", base=2)
    log_scale_if_positive(ax)
    ax.set_xlabel("NFE (sampling steps)")
    ax.set_ylabel(report.primary)
    ax.set_title(f"{report.primary} vs steps, {report.samples} samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def parallel_coordinates(rows: list[dict[str, Any]], sweep: SweepConfig):
    """One line per trial across the searched keys (categoricals by index), coloured by the first metric."""

    metric = sweep.metrics[0].name
    keys = list(sweep.space)
    axes_names = keys + [metric]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.8 * len(axes_names) + 2, 4))
    values = [r.get(metric, math.nan) for r in rows]
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    cmap = plt.get_cmap("viridis_r" if sweep.metrics[0].mode == "min" else "viridis")

    def scaled(key: str, value: Any) -> float:
        if key == metric:
            return (value - lo) / (hi - lo) if hi > lo else 0.5
        dist = sweep.space[key]
        if dist.categorical is not None:
            return dist.categorical.index(value) / max(1, len(dist.categorical) - 1)
        a, b = dist.float_ or dist.int_
        if dist.log:
            a, b, value = math.log(a), math.log(b), math.log(value)
        return (value - a) / (b - a) if b > a else 0.5

    for row, value in zip(rows, values):
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            continue
        xs, ys = [], []
        for i, key in enumerate(axes_names):
            v = row.get(metric) if key == metric else row.get(f"param.{key}")
            if v is None:
                continue
            xs.append(i)
            ys.append(scaled(key, v))
        ax.plot(xs, ys, color=cmap((value - lo) / (hi - lo) if hi > lo else 0.5), alpha=0.8)
    ax.set_xticks(range(len(axes_names)))
    ax.set_xticklabels(axes_names, rotation=20, ha="right")
    ax.set_yticks([])
    ax.set_title(f"{sweep.name}: trials by {metric} ({sweep.metrics[0].mode}; range {lo:.4g} to {hi:.4g})")
    fig.tight_layout()
    return fig
