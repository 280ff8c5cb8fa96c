"""KL against training samples: several runs of one paper study at different budgets, read back from
MLflow, beside the paper's numbers at the paper's budget, with an estimate of the budget at which each
method would meet the paper's row.

    python experiments/papers/trend.py lsd-checkerboard-k3000 lsd-checkerboard-k1000 \\
        [--study experiments/papers/lsd_checkerboard.yaml] [--tracking-uri URI] [--out trend.png]

Each study is found by name in MLflow (`fmm compare` reads the same runs). A method's training samples
are its train.steps x train.batch_size. The estimate fits, per method and step count, a power law to the
excess over the floor, KL - floor = a * samples^-b, through the budgets given (least squares in log-log;
with two budgets, the line through them), and solves for the samples at which the excess equals the
paper's excess over the same floor. It is an extrapolation over orders of magnitude: read it as a
scale, not a promise; budgets where the KL is infinite (empty bins) are left out of the fit. The figure
(--out) draws the points with their intervals, the paper's scores at its budget, and each fit out to
where it meets the paper's score.
"""

from __future__ import annotations

import argparse
import math
import os

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
import numpy as np

from fmm.experiment.study_schema import load_study
from fmm.infra import tracking
from fmm.jobs.compare import find

matplotlib.use("Agg")


def samples_of(uri: str, run_id: str) -> int:
    params = tracking.client(uri).get_run(run_id).data.params
    return int(params["train.steps"]) * int(params["train.batch_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", help="names of runs of the paper study at different budgets")
    parser.add_argument("--study", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "lsd_checkerboard.yaml"),
                        help="the paper study whose published scores and budget to compare with (default: %(default)s)")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--out", default="lsd-checkerboard-trend.png")
    args = parser.parse_args()
    try:
        paper = load_study(args.study)
    except ValueError as error:
        parser.error(str(error))
    published = paper.published
    paper_samples = paper.base["train"]["steps"] * paper.base["train"]["batch_size"]
    uri = tracking.resolve_uri(args.tracking_uri)
    points: dict[tuple[str, int], list[tuple[int, float, float, float]]] = {}  # (method, steps) -> (n, mean, lo, hi)
    floors = []
    for name in args.studies:
        comparison = find(name, uri, published.metric)
        if comparison.floor:
            floors += comparison.floor
        for curve in comparison.methods:
            label = curve.label.split(" ")[0]
            n = samples_of(uri, curve.run_id)
            for steps in curve.cells:
                e = curve.estimate(steps)
                points.setdefault((label, steps), []).append((n, e.mean, e.low, e.high))
    floor = float(np.mean(floors)) if floors else 0.0
    methods = sorted({m for m, _ in points}, key=list(published.scores).index)
    step_counts = sorted({s for _, s in points})

    print(f"{published.metric} against training samples (mean [95% interval] over evaluation sets); floor {floor:.4f}; "
          f"the paper's budget {paper_samples:.3g} samples")
    print(f"{'method':>8s} {'steps':>5s}  " + "  ".join(f"{n:>24.3g}" for n in sorted({p[0] for v in points.values() for p in v}))
          + f"  {'paper':>7s}  {'meets the paper at':>20s}")
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.6), sharey=True, squeeze=False)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(step_counts)))
    for ax, method in zip(axes[0], methods):
        for steps, colour in zip(step_counts, colours):
            rows = sorted(points.get((method, steps), []))
            finite = [r for r in rows if math.isfinite(r[1]) and r[1] > floor]
            target = published.scores.get(method, {}).get(steps)
            estimate = "-"
            if len(finite) >= 2 and target is not None and target > floor:
                slope, intercept = np.polyfit(np.log([r[0] for r in finite]), np.log([r[1] - floor for r in finite]), 1)
                if slope < 0:
                    meets = math.exp((math.log(target - floor) - intercept) / slope)
                    estimate = f"{meets:.2g} samples"
                    line = np.geomspace(finite[0][0], meets, 50)  # the fit, drawn out to where it meets the paper
                    ax.plot(line, floor + np.exp(intercept) * line ** slope, linestyle="--", linewidth=1, color=colour)
                else:
                    estimate = "not improving"
            cells = "  ".join(f"{r[1]:8.4f} [{r[2]:.3f}, {r[3]:.3f}]" if math.isfinite(r[1]) else f"{'inf':>24s}"
                              for r in rows)
            print(f"{method:>8s} {steps:5d}  {cells}  {target if target is not None else '-':>7}  {estimate:>20s}")
            if finite:
                x = [r[0] for r in finite]
                ax.errorbar(x, [r[1] for r in finite], yerr=[[r[1] - r[2] for r in finite], [r[3] - r[1] for r in finite]],
                            marker="o", color=colour, capsize=2)
            if target is not None:
                ax.scatter([paper_samples], [target], marker="*", s=80, color=colour)
        ax.axhline(floor, color="grey", linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(method)
        ax.set_xlabel("training samples (steps x batch)")
    axes[0][0].set_ylabel(published.metric)
    handles = [Line2D([], [], marker="o", color=c, label=f"{n} step{'s' if n > 1 else ''}") for n, c in zip(step_counts, colours)]
    handles += [Line2D([], [], marker="*", markersize=9, linestyle="", color="black", label="the paper"),
                Line2D([], [], linestyle="--", color="black", label="power-law fit"),
                Line2D([], [], linestyle=":", color="grey", label="floor (exact samples)")]
    axes[0][0].legend(handles=handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
