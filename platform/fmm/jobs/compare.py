"""`fmm compare EXPERIMENT_OR_STUDY`: methods by sampling steps, read back from MLflow alone.

A study's members logged their quality per step count into their own runs (metric at step = NFE,
with `seconds_per_sample` beside it), the teacher's ODE solvers into the teacher's run
(`teacher/<solver>/<metric>`) and, for toy targets, the exact velocity's solvers into the study's
run (`exact/<solver>/<metric>`). This module finds those runs with `search_runs`, reads the metric
histories and lays them out: the quality table (methods by step counts, with the teacher's best
fixed-step solver within the same NFE for reference) and the speed-up at equal quality (the first
step count at which a method comes within 10% of the teacher's best score, against the cheapest
fixed-step solver that stays within it, in NFE and in wall-clock per sample). The same tables go to the
study's run as CSV and Markdown, with the quality-versus-steps figure.

Every cell is a mean over seeds x evaluation sets with its 95% interval (fmm.evaluation.intervals),
read from each run's per-set scores (`<metric>/set<j>`, in each seed's run when a method has
seeds), so that differences are paired by set: at each step count the best method is marked `*` and
a method the data cannot tell apart from it `~`; the speed-up's verdicts are decided on paired
differences and say "not resolved" when an interval straddles the 10% bar.

Given an MLflow experiment that holds no study, every evaluated run in it is a row, each against
the teacher solvers `fmm evaluate` logged into it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field

import matplotlib
import matplotlib.pyplot as plt

from fmm.evaluation.figures import log_scale_if_positive
from fmm.evaluation.intervals import Estimate, difference, estimate, rank
from fmm.evaluation.protocol import Row, first_within, samples_scored, speedup
from fmm.experiment.study_schema import load_study
from fmm.infra import tracking
from fmm.objectives import OBJECTIVES

matplotlib.use("Agg")  # figures go to files and MLflow, never to a screen

FIXED_STEP = ("euler", "heun-le", "rk4-le")


@dataclass
class Curve:
    """One method's (or one solver's) scores and seconds per sample at each NFE, as MLflow holds them:
    `cells[nfe]` is its seeds x sets table, `scores[nfe]` the mean over it."""

    label: str
    run_id: str
    cells: dict[int, list[list[float]]]
    seconds: dict[int, float]
    status: str = "FINISHED"
    sampler: str = ""

    @property
    def scores(self) -> dict[int, float]:
        return {n: self.estimate(n).mean for n in self.cells}

    def estimate(self, nfe: int) -> Estimate:
        return estimate(self.cells[nfe])

    @property
    def n(self) -> int:
        return max((len(t) * len(t[0]) for t in self.cells.values()), default=0)

    def rows(self, method: str) -> list[Row]:
        return [Row(method, nfe, nfe, self.seconds.get(nfe, math.nan), {"score": self.estimate(nfe).mean},
                    {"score": t}) for nfe, t in self.cells.items()]


@dataclass
class Comparison:
    title: str
    metric: str
    samples: str
    tracking_uri: str
    parent_run_id: str | None
    methods: list[Curve]
    teacher: dict[str, Curve]                 # solver -> curve (the study's teacher, or each run's own)
    exact: dict[str, Curve] = field(default_factory=dict)
    own_teachers: dict[str, dict[str, Curve]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    floor: list[float] | None = None          # what exact samples score on each evaluation set (toy targets)
    published: dict | None = None             # a paper's numbers (study_schema.PublishedTable), in this metric

    @property
    def steps(self) -> list[int]:
        return sorted({n for c in self.methods for n in c.cells})

    def teacher_within(self, solvers: dict[str, Curve], nfe: int) -> Estimate | None:
        """The teacher's best fixed-step solver run (lowest mean) spending at most `nfe` NFE."""
        runs = [(c.estimate(n), name) for name, c in solvers.items() if name in FIXED_STEP for n in c.cells if n <= nfe]
        runs = [r for r in runs if math.isfinite(r[0].mean)]
        return min(runs, key=lambda r: r[0].mean)[0] if runs else None

    def solvers_for(self, curve: Curve, reference: str = "teacher") -> dict[str, Curve]:
        if reference == "exact":
            return self.exact
        return self.own_teachers.get(curve.label) or self.teacher

    def ranks(self) -> dict[int, dict[str, str]]:
        """At each step count: best / tie / worse of every method, on paired differences (intervals.rank)."""
        return {n: rank({c.label: c.cells[n] for c in self.methods if n in c.cells}) for n in self.steps}

    # -- the tables ------------------------------------------------------------------------------------

    def spread(self) -> str:
        n = max((c.n for c in self.methods), default=1)
        if n <= 1:
            return "one seed and one evaluation set: no intervals, verdicts on point values"
        return ("mean ± 95% half-width over seeds x evaluation sets (n per method; t interval, paired by set); "
                "* best at the step count, ~ not resolved from the best")

    def quality_rows(self) -> list[list[str]]:
        header = ["method", "sampler", "n"] + [str(n) for n in self.steps]
        rows = [header]
        ranks = self.ranks()
        marks = {"best": " *", "tie": " ~"}
        published = self.paper_scores
        for c in self.methods:
            cells = []
            for n in self.steps:
                mark = marks.get(ranks[n].get(c.label), "") if len(ranks[n]) > 1 else ""
                cells.append(c.estimate(n).text() + mark if n in c.cells else "-")
            rows.append([c.label, c.sampler, str(c.n)] + cells)
            if c.label in published:  # the paper's row beside the method's
                values = {int(k): v for k, v in published[c.label].items()}
                rows.append([f"{c.label} (paper)", "published", "-"]
                            + [f"{values[n]:.4g}" if n in values else "-" for n in self.steps])
        for label in self.failures:
            rows.append([label, "FAILED", "-"] + ["-" for _ in self.steps])
        for name, solvers in (("teacher ODE", self.teacher), ("exact ODE", self.exact)):
            if solvers:
                ests = [self.teacher_within(solvers, n) for n in self.steps]
                rows.append([name, "best solver", str(max(c.n for c in solvers.values()))]
                            + [e.text() if e else "-" for e in ests])
        return rows

    @property
    def paper_scores(self) -> dict:
        """The published scores by method, when they are in the metric shown (else none)."""
        return self.published["scores"] if self.published and self.published["metric"] == self.metric else {}

    def published_line(self) -> str:
        if not self.paper_scores:
            return ""
        return f"(paper): as published in {self.published['source']}, at the paper's budget"

    def floor_line(self) -> str:
        if not self.floor:
            return ""
        return (f"floor: exact samples score {self.metric} {estimate([self.floor]).text()} at this sample size "
                f"(a perfect sampler's score; excess over a perfect sampler = score - floor)")

    def speedups(self, reference: str = "teacher") -> dict[str, dict | None]:
        """Per method: protocol.speedup's summary against the teacher's solvers (or the exact velocity's;
        outside a study, each run's own), {"never": True} if it never comes within 10%, None with no curve."""
        out = {}
        for curve in self.methods:
            solvers = self.solvers_for(curve, reference)
            if not solvers or not curve.cells:
                out[curve.label] = None
                continue
            result = speedup(curve.rows("flow_map") + [r for name, c in solvers.items() for r in c.rows(name)],
                             "score")
            out[curve.label] = result.get("summary") or {"never": True}
        return out

    def speedup_rows(self, reference: str = "teacher") -> list[list[str]]:
        header = ["method", "NFE", "ms/sample", f"{reference} solver", f"{reference} NFE", f"{reference} ms/sample",
                  "NFE ratio", "wall-clock ratio", "verdict"]
        rows = [header]
        for curve in self.methods:
            s = self.speedups(reference)[curve.label]
            if s is None:
                rows.append([curve.label, "-", "-", f"no {reference} curve", "-", "-", "-", "-", "-"])
            elif s.get("never"):
                rows.append([curve.label, "never", "-", "-", "-", "-", "-", "-", "-"])
            else:
                solvers = self.solvers_for(curve, reference)
                ms = 1000 * curve.seconds.get(s["flow_map_nfe"], math.nan)
                solver_ms = 1000 * solvers[s["teacher_solver"]].seconds.get(s["teacher_nfe"], math.nan)
                ratio = (f"{s['nfe_ratio']:.1f}" if s["resolved"] else f"<= {s['nfe_ratio_high']:.1f}"
                         if not s["nfe_ratio_low"] else f"{s['nfe_ratio_low']:.1f}-{s['nfe_ratio_high']:.1f}")
                verdict = "resolved" if s["resolved"] else "not resolved at this sample size"
                rows.append([curve.label, str(s["flow_map_nfe"]), _fmt(ms), s["teacher_solver"], str(s["teacher_nfe"]),
                             _fmt(solver_ms), ratio, f"{s['wallclock_ratio']:.2f}", verdict])
        return rows

    def reference_line(self, solvers: dict[str, Curve], name: str) -> str:
        """The solvers' best score, and from which NFE each fixed-step solver stays within 10% of it."""
        best = min((r for s, c in solvers.items() for r in c.rows(s)), key=lambda r: r.scores["score"])
        if not math.isfinite(best.scores["score"]):
            return f"{name}: no finite {self.metric} at any NFE run (every run left a bin empty or diverged)"
        threshold = best.scores["score"] + 0.1 * abs(best.scores["score"])
        hits = {s: first_within(c.rows(s), "score", best) for s, c in solvers.items() if s in FIXED_STEP}
        def said(solver: str, hit: dict) -> str:
            if hit["nfe"] is None:
                return f"{solver} not resolved (from {hit['earliest']} at the earliest)"
            if hit["resolved"]:
                return f"{solver} from {hit['nfe']}"
            return f"{solver} from {hit['nfe']} (not resolved: {hit['earliest']} to {hit['nfe']})"
        ordered = sorted(((s, h) for s, h in hits.items() if h), key=lambda sh: sh[1]["nfe"] or sh[1]["earliest"])
        within = ", ".join(said(s, h) for s, h in ordered)
        return (f"{name}: best {self.metric} {best.estimate('score').text()} ({best.method}, {best.nfe} NFE); within "
                f"10% (<= {threshold:.4g}): {within or 'no fixed-step solver'}")

    def render(self) -> str:
        lines = [self.title, f"{self.metric} by sampling steps (NFE), {self.samples} samples; lower is better; "
                 f"{self.spread()}", ""]
        lines += _text_table(self.quality_rows())
        lines += [line for line in (self.published_line(), self.floor_line()) if line]
        lines.append("")
        for solvers, name in ((self.teacher, "teacher ODE"), (self.exact, "exact ODE")):
            if solvers:
                lines.append(self.reference_line(solvers, name))
        lines += ["", "speed-up at equal quality: the first step count at which a method comes within 10% of the "
                  "teacher's best, against the cheapest fixed-step teacher solver that stays within it (each "
                  "'within' decided on the paired difference with its 95% interval; not resolved: the NFE ratio "
                  "lies in the range shown, as the unresolved step counts fall; <= when the method may never get there)"]
        lines += _text_table(self.speedup_rows())
        if self.exact and self.teacher is not self.exact:
            lines += ["", "the same against the exact velocity's solvers"]
            lines += _text_table(self.speedup_rows("exact"))
        for label, reason in self.failures.items():
            lines.append(f"{label}: FAILED ({reason})")
        return "\n".join(lines)

    def markdown(self) -> str:
        parts = [f"# {self.title}", "", f"{self.metric} by sampling steps (NFE), {self.samples} samples; {self.spread()}",
                 ""]
        parts += _markdown_table(self.quality_rows())
        parts += [part for line in (self.published_line(), self.floor_line()) if line for part in ("", line)]
        parts += ["", "Speed-up at equal quality (within 10% of the teacher's best)", ""]
        parts += _markdown_table(self.speedup_rows())
        if self.exact and self.teacher is not self.exact:
            parts += ["", "Against the exact velocity", ""]
            parts += _markdown_table(self.speedup_rows("exact"))
        return "\n".join(parts) + "\n"

    def csv(self) -> str:
        """Per cell: mean, the 95% interval's bounds and n (empty bounds when n = 1)."""
        lines = ["method,role,solver,nfe,mean,low,high,n,seconds_per_sample"]

        def line(label, role, solver, curve, n):
            e = curve.estimate(n)
            bounds = f"{e.low!r},{e.high!r}" if e.has_interval else ","
            return f"{label},{role},{solver},{n},{e.mean!r},{bounds},{e.n},{curve.seconds.get(n, '')!r}"
        for c in self.methods:
            lines += [line(c.label, "method", c.sampler, c, n) for n in sorted(c.cells)]
        for role, solvers in (("teacher", self.teacher), ("exact", self.exact)):
            for name, c in solvers.items():
                lines += [line(role, role, name, c, n) for n in sorted(c.cells)]
        return "\n".join(lines) + "\n"

    def best_teacher_run(self) -> tuple[str, int] | None:
        """(solver, NFE) of the teacher's run of lowest mean: what "within 10%" is measured against."""
        runs = [(c.estimate(n).mean, name, n) for name, c in self.teacher.items() for n in c.cells]
        runs = [r for r in runs if math.isfinite(r[0])]
        return min(runs)[1:] if runs else None

    def figure(self):
        """Left: each method's mean and 95% band against NFE, beside the solvers' best runs. Right (with
        intervals and a teacher): each method's paired difference from the teacher's best run, with its
        interval, and the 10% bar: what the verdicts read, the common set effect removed."""
        best = self.best_teacher_run() if any(c.n > 1 for c in self.methods) else None
        fig, axes = plt.subplots(1, 2 if best else 1, figsize=(12 if best else 7, 4.5), squeeze=False)
        ax = axes[0][0]
        for c in self.methods:
            ns = [n for n in sorted(c.cells) if math.isfinite(c.estimate(n).mean)]  # no point for an infinite KL
            if ns:
                ests = [c.estimate(n) for n in ns]
                line, = ax.plot(ns, [e.mean for e in ests], marker="o", lw=1.8, label=c.label)
                if all(e.has_interval and math.isfinite(e.high) for e in ests):
                    ax.fill_between(ns, [max(e.low, 1e-12) for e in ests], [e.high for e in ests],
                                    color=line.get_color(), alpha=0.12, lw=0)
        xs = sorted({n for s in self.teacher.values() for n in s.cells} | set(self.steps))
        for solvers, name, style, color in ((self.teacher, "teacher ODE (best fixed-step solver)", "--", "black"),
                                            (self.exact, "exact ODE (best fixed-step solver)", ":", "gray")):
            if solvers and (name.startswith("teacher") or solvers is not self.teacher):
                pts = [(n, self.teacher_within(solvers, n)) for n in xs]
                pts = [(n, e.mean) for n, e in pts if e is not None]
                if pts:
                    ax.plot(*zip(*pts), linestyle=style, color=color, lw=1.5, label=name, drawstyle="steps-post")
        if self.floor:
            ax.axhline(sum(self.floor) / len(self.floor), color="gray", lw=0.8, alpha=0.6,
                       label="floor (exact samples)")
        ax.set_xscale("log", base=2)
        log_scale_if_positive(ax)
        ax.set_xlabel("NFE (sampling steps)")
        ax.set_ylabel(self.metric + (" (bands: 95% intervals)" if best else ""))
        ax.set_title(self.title, fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        if best:
            solver, nfe = best
            reference = self.teacher[solver].cells[nfe]
            ax = axes[0][1]
            for i, c in enumerate(self.methods):
                ns = [n for n in sorted(c.cells) if math.isfinite(c.estimate(n).mean)]
                diffs = [difference(c.cells[n], reference) for n in ns]
                shift = 2 ** ((i - len(self.methods) / 2) * 0.03)  # side by side at each step count
                ax.errorbar([n * shift for n in ns], [d.mean for d in diffs],
                            yerr=[[d.mean - d.low for d in diffs], [d.high - d.mean for d in diffs]],
                            marker="o", lw=1.2, capsize=2, label=c.label)
            bar = 0.1 * abs(self.teacher[solver].estimate(nfe).mean)
            ax.axhline(0.0, color="black", lw=0.8)
            ax.axhline(bar, color="black", lw=1.2, linestyle="--", label="10% of the teacher's best")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("NFE (sampling steps)")
            ax.set_ylabel(f"{self.metric} - teacher's best ({solver}, {nfe} NFE)")
            ax.set_title("paired difference from the teacher's best run, 95% intervals", fontsize=9)
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        return fig

    def write(self, folder: str) -> list[str]:
        """comparison.csv, comparison.md and <metric>_vs_steps.png under `folder`; returns their paths."""
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, "comparison.csv"), os.path.join(folder, "comparison.md"),
                 os.path.join(folder, f"{self.metric}_vs_steps.png")]
        with open(paths[0], "w") as f:
            f.write(self.csv())
        with open(paths[1], "w") as f:
            f.write(self.markdown())
        fig = self.figure()
        fig.savefig(paths[2], dpi=120)
        plt.close(fig)
        return paths

    def log_to_parent(self) -> None:
        """The tables and the figure as artifacts of the study's run (comparison/)."""
        if self.parent_run_id is None:
            return
        with tempfile.TemporaryDirectory() as folder:
            for path in self.write(folder):
                tracking.client(self.tracking_uri).log_artifact(self.parent_run_id, path, "comparison")


def _fmt(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _text_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
            for r in rows]


def _markdown_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows[1:]]


# -- reading MLflow ------------------------------------------------------------------------------

def _history(client, run_id: str, key: str) -> dict[int, float]:
    """step -> value; MLflow stores an infinite score (a KL with empty bins) as the largest double: read back
    as infinite, so that a mean over sets holding one is infinite, not 6e307."""
    return {m.step: math.inf if m.value >= sys.float_info.max else m.value
            for m in client.get_metric_history(run_id, key)}


def _per_set(client, run_id: str, key: str, sets: int) -> dict[int, list[float]]:
    """nfe -> the run's score on each evaluation set (`<key>/set<j>`; `<key>` itself with one set)."""
    if sets <= 1:
        return {n: [v] for n, v in _history(client, run_id, key).items()}
    histories = [_history(client, run_id, f"{key}/set{j}") for j in range(sets)]
    return {n: [h[n] for h in histories] for n in sorted(histories[0]) if all(n in h for h in histories)}


def _solver_curves(client, run, prefix: str, metric: str, sets: int) -> dict[str, Curve]:
    out = {}
    for key in run.data.metrics:
        if key.startswith(prefix + "/") and key.endswith("/" + metric) and key.count("/") == 2:
            solver = key.split("/")[1]
            cells = {n: [v] for n, v in _per_set(client, run.info.run_id, key, sets).items()}
            out[solver] = Curve(solver, run.info.run_id, cells,
                                _history(client, run.info.run_id, f"{prefix}/{solver}/seconds_per_sample"))
    return out


def method_label(label: str, params: dict[str, str]) -> str:
    """A method's name in the tables, with what departs from its paper: the slope gradient (`lsd[slope]`)
    and a flow-map form other than the paper's (`scd[flowmap]`: sCM trained on X = x + (1 - s) v)."""
    marks = ["slope"] if params.get("objective.gradient") == "slope" else []
    cls = OBJECTIVES.get(params.get("objective.name", ""))
    form = params.get("map_form")
    if cls is not None and form is not None and form != cls.paper_form:
        marks.append({"linear": "flowmap", "trig": "trigflow"}.get(form, form))
    return f"{label}[{','.join(marks)}]" if marks else label


def _method_curve(client, run, metric: str, label: str, sets: int, seed_runs=()) -> Curve:
    """A method's curve: its own per-set scores, or (trained at several seeds) each seed run's, stacked
    into a seeds x sets table per NFE (the NFEs every seed has)."""
    rid = run.info.run_id
    tables = [_per_set(client, r.info.run_id, metric, sets) for r in seed_runs] or [_per_set(client, rid, metric, sets)]
    common = set(tables[0]).intersection(*tables[1:])
    cells = {n: [t[n] for t in tables] for n in sorted(common)}
    return Curve(method_label(label, run.data.params), rid, cells, _history(client, rid, "seconds_per_sample"),
                 run.info.status, run.data.tags.get("eval_sampler", ""))


def _standing(run) -> tuple[bool, int]:
    """Which of two runs of one seed stands: one not ended as superseded (KILLED), then the newer."""
    return run.info.status != "KILLED", run.info.start_time


def _floor(client, run, metric: str, sets: int) -> list[float] | None:
    if f"floor/{metric}" not in run.data.metrics:
        return None
    values = _per_set(client, run.info.run_id, f"floor/{metric}", sets)
    return values.get(0)


def compare_study(uri: str, parent_run_id: str, metric: str | None = None) -> Comparison:
    """The comparison of the study whose MLflow run is `parent_run_id`."""
    client = tracking.client(uri)
    parent = client.get_run(parent_run_id)
    metric = metric or parent.data.tags.get("eval_metric") or "sw2"
    kids = client.search_runs([parent.info.experiment_id], f"tags.study = '{parent.data.tags.get('study')}'",
                              max_results=5000)
    kids = [r for r in kids if r.data.tags.get("study_member") and r.info.run_id != parent_run_id]
    order = (parent.data.tags.get("methods") or "").split(",")
    methods = sorted((r for r in kids if r.data.tags.get("study_role") == "method"),
                     key=lambda r: (order.index(r.data.tags["study_member"]) if r.data.tags["study_member"] in order
                                    else len(order), r.data.tags["study_member"]))
    latest: dict[str, object] = {}
    for run in methods:  # a resumed sweep may tag a second best trial: the newest stands
        label = run.data.tags["study_member"]
        if label not in latest or run.info.start_time > latest[label].info.start_time:
            latest[label] = run
    sets = int(parent.data.tags.get("eval_sets") or 1)
    seeds: dict[str, dict[int, object]] = {}
    for run in kids:  # per seed, the run that stands: a start killed before its record was written left a stray
        if run.data.tags.get("study_role") == "seed":
            held = seeds.setdefault(run.data.tags["study_member"], {})
            seed = int(run.data.tags["study_seed"])
            if seed not in held or _standing(run) > _standing(held[seed]):
                held[seed] = run
    curves = [_method_curve(client, run, metric, label, sets,
                            [r for _, r in sorted(seeds.get(label, {}).items())]
                            if run.data.tags.get("kind") == "member" else [])
              for label, run in latest.items()]
    teacher_runs = [r for r in kids if r.data.tags.get("study_role") == "teacher"]
    teacher = _solver_curves(client, teacher_runs[0], "teacher", metric, sets) if teacher_runs else {}
    teacher = teacher or _solver_curves(client, parent, "teacher", metric, sets)
    exact = _solver_curves(client, parent, "exact", metric, sets)
    experiment = client.get_experiment(parent.info.experiment_id).name
    title = f"study {parent.info.run_name} (MLflow experiment {experiment}, run {parent_run_id})"
    comparison = Comparison(title, metric, _samples(metric, parent), uri, parent_run_id, curves,
                            teacher or exact, exact, floor=_floor(client, parent, metric, sets),
                            published=json.loads(parent.data.tags["published"]) if parent.data.tags.get("published")
                            else None)
    failed = [f for f in (parent.data.tags.get("failed_members") or "").split(",") if f]
    for label in failed:
        run = next((r for r in kids if r.data.tags.get("study_member") == label), None)
        comparison.failures[label] = (run.data.tags.get("failure_reason", "see its run") if run else "no run")
    return comparison


def _samples(metric: str, run) -> str:
    return str(samples_scored(metric, run.data.tags.get("eval_samples", "?")))


def compare_experiment(uri: str, experiment_id: str, name: str, metric: str | None = None) -> Comparison:
    """Every evaluated top-level run of an experiment that holds no study, each against its own teacher curves."""
    client = tracking.client(uri)
    runs = [r for r in client.search_runs([experiment_id], max_results=5000) if r.data.tags.get("eval_metric")]
    if not runs:
        raise ValueError(f"MLflow experiment {name!r} at {uri} holds no study and no evaluated run: run "
                         f"`fmm study` or `fmm evaluate` first.")
    metric = metric or runs[0].data.tags["eval_metric"]
    curves, own = [], {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        label = run.info.run_name or run.info.run_id
        sets = int(run.data.tags.get("eval_sets") or 1)
        curves.append(_method_curve(client, run, metric, label, sets))
        own[label] = _solver_curves(client, run, "teacher", metric, sets)
    return Comparison(f"MLflow experiment {name}", metric, _samples(metric, runs[0]), uri, None,
                      curves, {}, {}, own)


def find(target: str, uri: str | None = None, metric: str | None = None) -> Comparison:
    """A study file, a study's name, or an MLflow experiment's name -> its Comparison."""
    if target.endswith((".yaml", ".yml")):
        study = load_study(target)
        uri, name = uri or study.tracking.uri, study.name
        experiments = [study.tracking.experiment]
    else:
        name, experiments = target, None
    uri = tracking.resolve_uri(uri)
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///"):]):
        raise ValueError(f"no MLflow store at {uri[len('sqlite:///'):]} to compare {target!r} from: run the study "
                         f"there first, or give --tracking-uri (or MLFLOW_TRACKING_URI) where it ran.")
    client = tracking.client(uri)
    try:
        known = {e.name: e.experiment_id for e in client.search_experiments()}
    except Exception as err:
        raise ValueError(f"cannot read MLflow at {uri}: {str(err).splitlines()[0]}") from None
    ids = [known[e] for e in experiments if e in known] if experiments else list(known.values())
    if ids:
        studies = client.search_runs(ids, f"tags.kind = 'study' and tags.study = '{name}'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if studies:
            return compare_study(uri, studies[0].info.run_id, metric)
    if experiments is None and name in known:
        inside = client.search_runs([known[name]], "tags.kind = 'study'", order_by=["attributes.start_time DESC"],
                                    max_results=1)
        if inside:
            return compare_study(uri, inside[0].info.run_id, metric)
        return compare_experiment(uri, known[name], name, metric)
    listing = ", ".join(sorted(known)) or "none"
    raise ValueError(f"no study or MLflow experiment named {name!r} at {uri} (experiments there: {listing}); give "
                     f"a study file, a study's name or an experiment's name, and --tracking-uri if the store is "
                     f"elsewhere.")


__all__ = ["Comparison", "compare_experiment", "compare_study", "find"]
