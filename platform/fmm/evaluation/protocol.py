"""The evaluation protocol: quality against number of steps for a flow map and its teacher's ODE solvers,
and the speed-up at equal quality. Pure: it scores and returns reports; the jobs log them.

Protocol: one fixed noise set (seeded) serves every method. The flow map is sampled with its EMA
weights at each step count. The teacher is the exact velocity when the run's data is a toy target
with ground truth, else the flow map's own diagonal v(t, t, x); it is integrated by Euler, Heun and
RK4 (both with an Euler last step, so no stage touches t = 1) at NFE 1 to `teacher_max_nfe`, and
by dopri5 at a few tolerances. Every speed-up names the teacher's solver, its NFE and the sample
size: against an Euler teacher a flow map looks 4 to 16 times better than against RK4.

Metrics: vectors get sliced W2 (the primary metric), energy distance, MMD, exact W2 on a
subsample, the histogram KL for 2-D box targets, and per-sample RMSE against the float64
reference map when ground truth exists; images get FID (the primary metric) with the standard FID
Inception network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from fmm import metrics
from fmm.evaluation import fid
from fmm.evaluation.classifier_features import ClassifierFeatures
from fmm.experiment.data import read_labels, read_part
from fmm.experiment.schema import ExperimentConfig
from fmm.flowmap import TwoTimeMap, VelocityField
from fmm.groundtruth import BoxMixture, ExactVelocity, make_target, reference_flow_map
from fmm.interpolants import Interpolant
from fmm.metrics import IMAGE_METRICS, VECTOR_METRICS
from fmm.objectives import sampler_for
from fmm.sampling import make_sampler, solve_ode


@dataclass
class Row:
    method: str           # "flow_map" or the teacher solver, e.g. "rk4-le"
    steps: int
    nfe: int
    seconds_per_sample: float
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    primary: str
    samples: int
    rows: list[Row]
    speedup: dict[str, dict]
    sampler: str = "flow_map"     # how the learned map was sampled (the method's authors' sampler)
    floors: dict[str, float] = field(default_factory=dict)  # what exact samples score, at the same sizes
    note: str = ""                # why a part of the protocol was left out (e.g. no teacher rows)

    def table(self) -> list[dict]:
        return [{"method": r.method, "steps": r.steps, "nfe": r.nfe, "seconds_per_sample": r.seconds_per_sample,
                 **r.scores} for r in self.rows]


# The histogram KL as the self-distillation paper measures it on the checkerboard (2505.18825 §3.3,
# Table 1): 64,000 samples, a 50 x 50 histogram over the board, forward KL by bin-centre quadrature. It
# is scored on its own noise set of that size, beside the floor that exact samples score there.
KL_SAMPLES = 64_000
KL_BINS = 50


class Scorer:
    """Scores samples against the reference set (and the reference map for the same noise, if any).

    `rmse_vs_ode` compares each sample with the reference map of its own noise, so it is scored only
    when the sampler is deterministic (`paired`); the histogram KL is scored by `histogram` on the
    protocol's KL noise set (KL_SAMPLES points), not on the reference set's."""

    def __init__(self, shape, reference, reference_map=None, log_density=None, extent=None, wanted=None,
                 labelled=None):
        self.is_image = len(shape) == 3
        allowed = IMAGE_METRICS if self.is_image else VECTOR_METRICS
        wanted = list(wanted or (("fid",) if self.is_image else ("sw2", "energy", "mmd", "w2_exact")))
        bad = [m for m in wanted if m not in allowed]
        if bad:
            kind = "images" if self.is_image else f"{shape[0]}-D vectors"
            raise ValueError(f"metric(s) {bad} do not apply to {kind}; choose from {list(allowed)}.")
        if not self.is_image:
            if reference_map is not None and "rmse_vs_ode" not in wanted:
                wanted.append("rmse_vs_ode")
            if log_density is not None and shape == (2,) and "histogram_kl" not in wanted:
                wanted.append("histogram_kl")
        self.wanted, self.reference, self.reference_map = wanted, reference, reference_map
        self.log_density, self.extent = log_density, extent
        self.primary = wanted[0]
        if "fid" in wanted:
            self.extractor = fid.InceptionFeatures(device="cuda" if torch.cuda.is_available() else "cpu")
            self.reference_features = self.extractor(reference, progress=True)
        if "fd_classifier" in wanted:
            if labelled is None:
                raise ValueError("fd_classifier needs a labelled image dataset (Parquet shards with a label column).")
            self.classifier = ClassifierFeatures(*labelled)

    def histogram(self, x: torch.Tensor) -> float:
        return metrics.histogram_kl(x.detach().double().cpu(), self.log_density, self.extent, bins=KL_BINS)

    def __call__(self, x: torch.Tensor, paired: bool = True) -> dict[str, float]:
        x = x.detach().double().cpu()
        if self.is_image:
            out = {}
            if "fid" in self.wanted:
                out["fid"] = fid.fid(self.extractor(x.float(), progress=True), self.reference_features)
            if "fd_classifier" in self.wanted:
                out["fd_classifier"] = self.classifier.distance(x.float(), self.reference.float())
            return out
        out = {}
        for name in self.wanted:
            if name in metrics.TWO_SAMPLE:
                out[name] = metrics.TWO_SAMPLE[name](x, self.reference)
            elif name == "rmse_vs_ode" and paired:
                out[name] = metrics.map_rmse(x, self.reference_map)
        return out


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def teacher_grid(max_nfe: int) -> list[tuple[str, dict, int]]:
    """(solver, solve_ode kwargs, NFE) at NFE 1, 2, 4, ... up to max_nfe, plus dopri5 tolerances."""
    runs = []
    n = 1
    while n <= max_nfe:
        runs.append(("euler", {"method": "euler", "steps": n}, n))
        if n >= 2:  # Heun with an Euler last step spends 2N - 1 NFE; pick N with 2N - 1 <= n
            k = (n + 1) // 2
            runs.append(("heun-le", {"method": "heun", "steps": k, "last_step_euler": True}, 2 * k - 1))
        if n >= 4:
            k = (n + 3) // 4
            runs.append(("rk4-le", {"method": "rk4", "steps": k, "last_step_euler": True}, 4 * k - 3))
        n *= 2
    for tol in (1e-2, 1e-3, 1e-5):
        runs.append((f"dopri5-{tol:g}", {"method": "dopri5", "rtol": tol, "atol": tol}, 0))
    return runs


def run_protocol(model, teacher, noise: torch.Tensor, steps: list[int], scorer: Scorer,
                 teacher_max_nfe: int = 256, log=print, progress: bool = True, sampler=None,
                 sampler_kind: str = "flow_map", kl_noise: torch.Tensor | None = None,
                 floors: dict[str, float] | None = None) -> Report:
    """The learned map at each step count (with `sampler(model, noise, steps)`, the flow-map chain by
    default), then every teacher solver of `teacher_grid`, all from `noise` (and from `kl_noise` for
    the histogram KL). Each run is one batched solve over the whole noise set; a progress bar counts
    the runs."""
    sampler = sampler or make_sampler("flow_map")
    grid = teacher_grid(teacher_max_nfe) if teacher is not None else []
    bar = tqdm(total=len(steps) + len(grid), desc="sampling", unit="run", disable=not progress)
    kl = kl_noise if "histogram_kl" in scorer.wanted else None

    def scores(run, paired: bool = True) -> tuple[dict[str, float], object, float]:
        out, secs = _timed(lambda: run(noise))
        values = scorer(out.samples, paired=paired)
        if kl is not None:
            values["histogram_kl"] = scorer.histogram(run(kl).samples)
        return values, out, secs

    rows = []
    with torch.no_grad(), bar:
        for n in steps:
            paired = n == 1 or not getattr(sampler, "renoises", False)
            values, out, secs = scores(lambda x: sampler(model, x, n), paired)
            rows.append(Row("flow_map", n, out.nfe, secs / len(noise), values))
            bar.update()
            log(f"[fmm] learned map ({sampler_kind} sampler), {n} step(s): " + ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].scores.items()))
        for name, kwargs, _ in grid:
            kwargs = dict(kwargs)
            method = kwargs.pop("method")
            bar.set_postfix_str(name)
            # An exact teacher computes in float64; a network teacher in the network's dtype.
            values, out, secs = scores(lambda x: solve_ode(teacher, x.double() if hasattr(teacher, "target") else x,
                                                           method, **kwargs))
            rows.append(Row(name, kwargs.get("steps", out.nfe), out.nfe, secs / len(noise), values))
            bar.update()
        if grid:
            log(f"[fmm] teacher: {len(grid)} solver runs")
    return Report(scorer.primary, len(noise), rows, speedup(rows, scorer.primary), sampler_kind, dict(floors or {}))


def first_within(rows: list[Row], primary: str, threshold: float) -> Row | None:
    """The row of smallest NFE from which every larger NFE also scores at most `threshold`."""
    rows = sorted(rows, key=lambda r: r.nfe)
    for i, row in enumerate(rows):
        if all(r.scores[primary] <= threshold for r in rows[i:]):
            return row
    return None


def speedup(rows: list[Row], primary: str) -> dict[str, dict]:
    """Within 10% of the teacher's best score: the learned map's first step count that gets there, each
    teacher solver's smallest NFE from which it stays there (an ODE solver's score settles as NFE grows;
    a few-step map's need not, and a user samples it at its best step count), and the ratio of the
    cheapest fixed-step solver's NFE and wall-clock at that quality to the learned map's."""
    teacher = [r for r in rows if r.method != "flow_map"]
    if not teacher:
        return {}
    best = min(r.scores[primary] for r in teacher)
    threshold = best + 0.1 * abs(best)
    out = {}
    for method in sorted({r.method for r in rows}):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.nfe)
        if method == "flow_map":
            hit = next((r for r in mine if r.scores[primary] <= threshold), None)
        else:
            hit = first_within(mine, primary, threshold)
        out[method] = None if hit is None else {"nfe": hit.nfe, "seconds_per_sample": hit.seconds_per_sample,
                                                primary: hit.scores[primary]}
    fixed = {m: v for m, v in out.items() if v is not None and m != "flow_map" and not m.startswith("dopri5")}
    flow = out.get("flow_map")
    if fixed and flow is not None:
        cheapest = min(fixed, key=lambda m: fixed[m]["nfe"])
        out["summary"] = {"teacher_best": best, "threshold": threshold, "teacher_solver": cheapest,
                          "teacher_nfe": fixed[cheapest]["nfe"], "flow_map_nfe": flow["nfe"],
                          "nfe_ratio": fixed[cheapest]["nfe"] / flow["nfe"],
                          "wallclock_ratio": fixed[cheapest]["seconds_per_sample"] / flow["seconds_per_sample"]}
    return out


@dataclass
class Protocol:
    """What every method of one comparison shares: the noise (already scaled by sigma0), the scorer with
    its reference set, and the exact velocity when the data is a toy target with ground truth."""

    noise: torch.Tensor
    scorer: Scorer
    exact: ExactVelocity | None = None
    kl_noise: torch.Tensor | None = None   # the histogram KL's own noise set (KL_SAMPLES points)
    floors: dict[str, float] = field(default_factory=dict)


def reference_set(exp: ExperimentConfig, shape: tuple[int, ...], samples: int, generator: torch.Generator,
                  labelled: bool = False):
    """(reference samples, (images, labels, dataset name) or None): exact draws of a toy target, or a
    seeded subset of the Parquet shards (with the whole labelled set when `labelled`, which the
    classifier-feature distance trains on)."""
    if exp.data.target is not None:
        target = make_target(exp.data.target)
        if (target.dim,) != shape:
            raise ValueError(f"the checkpoint's samples have shape {list(shape)} but {exp.data.target!r} has "
                             f"[{target.dim}].")
        return target.sample(samples, generator), None
    data, manifest = read_part(exp.data.path)
    if tuple(manifest["shape"]) != shape:
        raise ValueError(f"the checkpoint's samples have shape {list(shape)} but the data at "
                         f"{exp.data.path!r} has {manifest['shape']}.")
    reference = data[torch.randperm(len(data), generator=generator)[:samples]]
    if labelled and len(shape) == 3:
        try:
            return reference, (data, read_labels(exp.data.path), manifest.get("dataset", "images"))
        except ValueError:  # no label column: the classifier distance is refused by the Scorer
            pass
    return reference, None


def build_protocol(exp: ExperimentConfig, interpolant: Interpolant, shape: tuple[int, ...], samples: int,
                   seed: int = 0, metrics_wanted: list[str] | None = None, log=print) -> Protocol:
    """The seeded noise set and reference for experiment `exp`'s data: exact draws and the float64
    reference map of the same noise for a toy target, a seeded subset of the Parquet shards otherwise."""
    g = torch.Generator().manual_seed(seed)
    noise = interpolant.sigma0 * torch.randn((samples, *shape), generator=g)
    wants_classifier = metrics_wanted is None or "fd_classifier" in metrics_wanted
    reference, labelled = reference_set(exp, shape, samples, torch.Generator().manual_seed(seed + 1), wants_classifier)
    if exp.data.target is None:
        return Protocol(noise, Scorer(shape, reference, wanted=metrics_wanted, labelled=labelled))
    target = make_target(exp.data.target)
    exact = ExactVelocity(target, interpolant)
    reference_map = log_density = extent = None
    if metrics_wanted is None or "rmse_vs_ode" in metrics_wanted:
        log(f"[fmm] float64 reference map of {samples} noise points ...")
        reference_map = reference_flow_map(exact, 0.0, 1.0, noise.double())
    kl_noise, floors = None, {}
    if isinstance(target, BoxMixture) and shape == (2,):
        extent = float(target.highs.max())
        volume = (target.highs - target.lows).prod(1)

        def log_density(points):
            # Boxes half-open, [low, high), as a board indexed by floor() is: a bin centre on a square's
            # edge counts for the square that starts there. The paper's KL follows this convention
            # (exact samples score 0.067 to 0.069 at 64,000 with it, the paper about 0.066; 0.128 with closed
            # boxes, 0.009 with open ones).
            inside = ((points[:, None] >= target.lows) & (points[:, None] < target.highs)).all(-1)
            return torch.log((inside.double() * (target.weights / volume)).sum(1))
    scorer = Scorer(shape, reference, reference_map, log_density, extent, metrics_wanted)
    if "histogram_kl" in scorer.wanted:
        kl_noise = interpolant.sigma0 * torch.randn((KL_SAMPLES, *shape), generator=torch.Generator().manual_seed(seed + 3))
        floors["histogram_kl"] = scorer.histogram(target.sample(KL_SAMPLES, torch.Generator().manual_seed(seed + 4)))
    return Protocol(noise, scorer, exact, kl_noise, floors)


def evaluate_map(model: TwoTimeMap, exp: ExperimentConfig, interpolant: Interpolant, protocol: Protocol,
                 steps: list[int], *, seed: int = 0, teacher: VelocityField | None = None, teacher_max_nfe: int = 64,
                 log=print, progress: bool = True) -> tuple[Report, object]:
    """The evaluation sequence of `fmm evaluate` and of a study's members: the map sampled by its
    method's own sampler at each step count (and, given a teacher, that teacher's ODE solvers), all
    from the protocol's noise. Returns the report and the sampler (for sample figures)."""
    sampler, kind = sampler_for(exp.objective, interpolant, seed=seed + 2)
    report = run_protocol(model, teacher, protocol.noise, steps, protocol.scorer, teacher_max_nfe, log,
                          progress=progress, sampler=sampler, sampler_kind=kind, kl_noise=protocol.kl_noise,
                          floors=protocol.floors)
    return report, sampler


def format_report(report: Report) -> str:
    lines = [f"learned map sampled with the {report.sampler} sampler; teacher rows are ODE solvers",
             f"{'method':12s} {'steps':>5s} {'NFE':>5s} {'ms/sample':>10s}  " + report.primary]
    for row in sorted(report.rows, key=lambda r: (r.method != "flow_map", r.method, r.nfe)):
        lines.append(f"{row.method:12s} {row.steps:5d} {row.nfe:5d} {1000 * row.seconds_per_sample:10.4f}  "
                     f"{row.scores[report.primary]:.4g}")
    summary = report.speedup.get("summary")
    if summary:
        lines.append(f"within 10% of the teacher's best {report.primary} ({summary['teacher_best']:.4g}, "
                     f"{report.samples} samples): flow map at {summary['flow_map_nfe']} NFE, teacher "
                     f"{summary['teacher_solver']} at {summary['teacher_nfe']} NFE: NFE ratio {summary['nfe_ratio']:.1f}, "
                     f"wall-clock ratio {summary['wallclock_ratio']:.2f} (teacher / flow map)")
    elif "flow_map" in report.speedup and report.speedup["flow_map"] is None:
        lines.append(f"the flow map never comes within 10% of the teacher's best {report.primary}")
    for name, value in report.floors.items():
        size = KL_SAMPLES if name == "histogram_kl" else report.samples
        lines.append(f"floor: exact samples score {name} {value:.4g} at {size} samples (a perfect sampler's score)")
    if report.note:
        lines.append(report.note)
    return "\n".join(lines)


__all__ = ["Protocol", "Report", "Row", "Scorer", "build_protocol", "evaluate_map", "format_report", "speedup",
           "teacher_grid"]
