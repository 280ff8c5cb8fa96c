"""The quality bar of the CPU toy study, read from its MLflow record.

    python experiments/benchmarks/study_quality.py [--study experiments/studies/toy_flower.yaml] [--run]

With --run it first runs the study (`fmm study`, about ten minutes on 2 cores); otherwise it reads the
latest run of that study from MLflow (`fmm compare`'s reader, nothing else). It prints, for the
study's metrics (sliced W2 and energy distance):

- the exact velocity's converged quality: the best score of its ODE solvers on the study's evaluation
  sets (mean and 95% interval);
- the best flow-map method at 1 and at 2 steps, and whether it is within 10% of that, decided on the
  paired difference with its interval ("not resolved" when the interval straddles the bar);
- for every method, its score at each step count and the score at the most steps over its best: above
  1, quality degrades as steps are added (what Align Your Flow reports for consistency models); the
  ratio is said to be resolved when the paired difference of the two step counts excludes 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

FLOW_MAPS = {"lmd", "emd", "pfmm", "two_map", "eulerian_direct", "lsd", "esd", "psd", "ayf_emd", "pd", "shortcut",
             "meanflow"}
CONSISTENCY = {"cd", "ct", "ict", "scd", "sct", "ctm"}


def objective_of(comparison, label: str) -> str:
    from fmm.infra import tracking

    curve = next(c for c in comparison.methods if c.label == label)
    return tracking.client(comparison.tracking_uri).get_run(curve.run_id).data.params.get("objective.name", label)


def report(comparison) -> None:
    from fmm.evaluation.intervals import difference

    exact = comparison.exact or comparison.teacher
    solver, nfe = min(((c, n) for c in exact.values() for n in c.cells), key=lambda cn: cn[0].estimate(cn[1]).mean)
    best, best_cells = solver.estimate(nfe), solver.cells[nfe]
    threshold = 1.1 * best.mean
    print(f"\n{comparison.metric}: exact velocity's converged quality {best.text()} (best ODE solver on the same "
          f"noise, {solver.label} at {nfe} NFE); within 10% means <= {threshold:.4g}")
    kinds = {c.label: objective_of(comparison, c.label) for c in comparison.methods}
    for steps in (1, 2):
        scored = [(c.scores[steps], c) for c in comparison.methods if steps in c.cells and kinds[c.label] in FLOW_MAPS]
        if scored:
            value, c = min(scored, key=lambda vc: vc[0])
            below = difference(c.cells[steps], best_cells, 1.1).below(0.0)
            verdict = {True: "within 10%", False: f"{value / best.mean:.2f}x the exact quality",
                       None: "within 10% not resolved at this sample size"}[below]
            print(f"  best flow map at {steps} step(s): {c.label} {c.estimate(steps).text()} ({verdict})")
    print("  by steps, and the score at the most steps over the best score (above 1: it degrades with steps):")
    for c in comparison.methods:
        if len(c.cells) > 1:
            last, best_steps = max(c.cells), min(c.scores, key=c.scores.get)
            family = "consistency" if kinds[c.label] in CONSISTENCY else "flow map"
            curve = " ".join(c.estimate(k).text() for k in sorted(c.cells))
            resolved = "" if last == best_steps else (
                "" if difference(c.cells[last], c.cells[best_steps]).below(0.0) is False else " (not resolved)")
            print(f"    {c.label:10s} {family:11s} {curve}   last / best (at {best_steps}): "
                  f"{c.scores[last] / c.scores[best_steps]:.2f}{resolved}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=os.path.join("experiments", "studies", "toy_flower.yaml"))
    parser.add_argument("--run", action="store_true", help="run the study first")
    parser.add_argument("--tracking-uri")
    args = parser.parse_args()
    if args.run:
        subprocess.run([sys.executable, "-m", "fmm.cli", "study", args.study], check=True)
    from fmm.experiment.study_schema import load_study
    from fmm.jobs.compare import find

    study = load_study(args.study)
    for metric in study.evaluation.metrics or [None]:
        comparison = find(args.study, args.tracking_uri, metric)
        if metric == (study.evaluation.metrics or [None])[0]:
            print(comparison.render())
        report(comparison)


if __name__ == "__main__":
    main()
