"""The evaluation protocol: quality against number of steps for a flow map and its teacher's ODE solvers,
and the speed-up at equal quality. Pure: it scores and returns reports; the jobs log them.

Protocol: M evaluation sets (`sets`, seeded: set j draws its own noise and, for a toy target, its own
exact reference; for a dataset, the j-th of M disjoint reference subsets) serve every method, so that
two methods' scores are paired by set; each row holds its score on every set and their mean, and the
speed-up's verdicts are decided on paired differences with their 95% intervals
(fmm.evaluation.intervals), "not resolved" when an interval straddles the bar. The flow map is sampled with its EMA
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

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from fmm import metrics
from fmm.evaluation import fid
from fmm.evaluation.intervals import Estimate, difference, estimate
from fmm.evaluation.classifier_features import ClassifierFeatures
from fmm.experiment.data import read_labels, read_manifest, read_part
from fmm.experiment.schema import ExperimentConfig
from fmm.flowmap import TwoTimeMap, VelocityField
from fmm.groundtruth import BoxMixture, ExactVelocity, reference_flow_map
from fmm.infra import storage
from fmm.interpolants import Interpolant
from fmm.metrics import IMAGE_METRICS, VECTOR_METRICS
from fmm.objectives import sampler_for
from fmm.sampling import Solution, make_sampler, solve_ode


@dataclass
class Row:
    method: str           # "flow_map" or the teacher solver, e.g. "rk4-le"
    steps: int
    nfe: int
    seconds_per_sample: float
    scores: dict[str, float] = field(default_factory=dict)    # the mean over `sets`
    sets: dict[str, list[list[float]]] = field(default_factory=dict)  # metric -> seeds x sets scores

    def cells(self, metric: str) -> list[list[float]]:
        """The seeds x sets table of `metric` (one cell when the row was scored on one set)."""
        return self.sets.get(metric) or [[self.scores[metric]]]

    def estimate(self, metric: str) -> Estimate:
        return estimate(self.cells(metric))


@dataclass
class Report:
    primary: str
    samples: int
    rows: list[Row]
    speedup: dict[str, dict]
    sampler: str = "flow_map"     # how the learned map was sampled (the method's authors' sampler)
    floors: dict[str, float] = field(default_factory=dict)  # what exact samples score, at the same sizes
    note: str = ""                # why a part of the protocol was left out (e.g. no teacher rows)
    floor_sets: dict[str, list[float]] = field(default_factory=dict)  # the floors on each evaluation set
    provenance: dict[str, object] = field(default_factory=dict)  # FID: weights sha256, resize, counts, reference

    @property
    def sets(self) -> int:
        return max((len(t[0]) for r in self.rows for t in r.sets.values()), default=1)

    def table(self) -> list[dict]:
        return [{"method": r.method, "steps": r.steps, "nfe": r.nfe, "seconds_per_sample": r.seconds_per_sample,
                 **r.scores} for r in self.rows]


# The histogram KL as the self-distillation paper measures it on the checkerboard (2505.18825 §3.3,
# Table 1): 64,000 samples, a 50 x 50 histogram over the board, forward KL by bin-centre quadrature. It
# is scored on its own noise set of that size, beside the floor that exact samples score there.
KL_SAMPLES = 64_000
KL_BINS = 50


def samples_scored(metric: str, samples):
    """How many samples a score of `metric` takes: the histogram KL's own noise set, else `samples`."""
    return KL_SAMPLES if metric == "histogram_kl" else samples
EVAL_BATCH = 1000  # images sampled per call: a network on a GPU holds no 50,000 at once


class Scorer:
    """Scores samples against the reference set (and the reference map for the same noise, if any).

    `rmse_vs_ode` compares each sample with the reference map of its own noise, so it is scored only
    when the sampler is deterministic (`paired`); the histogram KL is scored by `histogram` on the
    protocol's KL noise set (KL_SAMPLES points), not on the reference set's."""

    def __init__(self, shape, reference, reference_map=None, log_density=None, extent=None, wanted=None,
                 labelled=None, fid_reference: fid.Statistics | None = None,
                 extractor: fid.InceptionFeatures | None = None):
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
        if "histogram_kl" in wanted and (log_density is None or shape != (2,)):
            raise ValueError(f"{metrics.HISTOGRAM_KL_DOMAIN}; this data is not one. Choose another metric "
                             f"(sw2, energy, mmd, w2_exact).")
        self.wanted, self.reference, self.reference_map = wanted, reference, reference_map
        self.log_density, self.extent = log_density, extent
        self.primary = wanted[0]
        self.provenance: dict[str, object] = {}   # what the FID was computed with (logged as MLflow tags)
        if "fid" in wanted:
            self.extractor = extractor or fid.InceptionFeatures(device="cuda" if torch.cuda.is_available() else "cpu")
            if fid_reference is None:  # the reference subset's statistics
                fid_reference = self.extractor.statistics(_batches(reference), f"a subset of {len(reference)} rows",
                                                          progress=True, total=-(-len(reference) // 64))
                fid_reference.key = f"subset-n{len(reference)}"
            self.fid_reference = fid_reference
            self.provenance = fid_reference.provenance()
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
                generated = self.extractor.statistics(_batches(x.float()), "generated samples", progress=True,
                                                      total=-(-len(x) // 64))
                out["fid"] = generated.distance(self.fid_reference)
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


def device_of(model) -> torch.device:
    """Where a network's parameters live (CPU for none, or for a closed-form velocity)."""
    parameters = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return parameters.device if parameters is not None else torch.device("cpu")


def _batches(x: torch.Tensor, n: int = 64):
    for start in range(0, len(x), n):
        yield x[start:start + n]


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


TOLERANCES = (1e-2, 1e-3, 1e-5)  # dopri5's rtol = atol in the teacher grid


def teacher_grid(max_nfe: int, tolerances=TOLERANCES) -> list[tuple[str, dict, int]]:
    """(solver, solve_ode kwargs, NFE) at NFE 1, 2, 4, ... up to max_nfe, plus dopri5 at `tolerances`."""
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
    for tol in tolerances:
        runs.append((f"dopri5-{tol:g}", {"method": "dopri5", "rtol": tol, "atol": tol}, 0))
    return runs


def run_protocol(model, teacher, noise: torch.Tensor, steps: list[int], scorer: Scorer,
                 teacher_max_nfe: int = 256, log=print, progress: bool = True, sampler=None,
                 sampler_kind: str = "flow_map", kl_noise: torch.Tensor | None = None,
                 floors: dict[str, float] | None = None, teacher_tolerances=TOLERANCES) -> Report:
    """The learned map at each step count (with `sampler(model, noise, steps)`, the flow-map chain by
    default), then every teacher solver of `teacher_grid`, all from `noise` (and from `kl_noise` for
    the histogram KL). Each run is one batched solve over the whole noise set; a progress bar counts
    the runs."""
    sampler = sampler or make_sampler("flow_map")
    grid = teacher_grid(teacher_max_nfe, teacher_tolerances) if teacher is not None else []
    bar = tqdm(total=len(steps) + len(grid), desc="sampling", unit="run", disable=not progress)
    kl = kl_noise if "histogram_kl" in scorer.wanted else None
    device = device_of(model if model is not None else getattr(teacher, "model", None))
    noise = noise.to(device)  # the noise moves to the network's device; the scores are computed from CPU copies
    kl = kl.to(device) if kl is not None else None

    def batched(run, x):
        """Images in batches of EVAL_BATCH (a network on a GPU holds no 50,000 at once); the samples come
        back to the CPU. Vectors in one solve."""
        if x.dim() < 4 or len(x) <= EVAL_BATCH:
            return run(x)
        parts = [run(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
        return Solution(torch.cat([p.samples.cpu() for p in parts]), max(p.nfe for p in parts))

    def scores(run, paired: bool = True) -> tuple[dict[str, float], object, float]:
        out, secs = _timed(lambda: batched(run, noise))
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
            values, out, secs = scores(lambda x: solve_ode(teacher, x.double().cpu() if hasattr(teacher, "target") else x,
                                                           method, **kwargs))
            rows.append(Row(name, kwargs.get("steps", out.nfe), out.nfe, secs / len(noise), values))
            bar.update()
        if grid:
            log(f"[fmm] teacher: {len(grid)} solver runs")
    provenance = {**scorer.provenance, "fid_generated": len(noise)} if scorer.provenance else {}
    return Report(scorer.primary, len(noise), rows, speedup(rows, scorer.primary), sampler_kind, dict(floors or {}),
                  provenance=provenance)


def within_verdicts(rows: list[Row], best: Row, primary: str) -> list[bool | None]:
    """For each row: is its score within 10% of `best`'s? Decided on the paired difference
    row - 1.1 best (per evaluation set) with its 95% interval; None when the interval straddles 0."""
    factor = 1 + 0.1 * math.copysign(1.0, best.scores[primary])
    return [difference(r.cells(primary), best.cells(primary), factor).below(0.0) for r in rows]


def first_within(rows: list[Row], primary: str, best: Row) -> dict | None:
    """The row of smallest NFE from which every larger NFE is resolved within 10% of `best` (an ODE
    solver's score settles as NFE grows), with `earliest`: the smallest NFE from which no row is resolved
    outside it (where the first hit could be, were the unresolved rows within). None if neither exists."""
    rows = sorted(rows, key=lambda r: r.nfe)
    verdicts = within_verdicts(rows, best, primary)
    hit = earliest = len(rows)
    while hit > 0 and verdicts[hit - 1] is True:
        hit -= 1
    while earliest > 0 and verdicts[earliest - 1] is not False:
        earliest -= 1
    if earliest == len(rows):
        return None
    out = {"nfe": rows[hit].nfe if hit < len(rows) else None, "earliest": rows[earliest].nfe,
           "resolved": hit == earliest}
    if hit < len(rows):
        out.update(seconds_per_sample=rows[hit].seconds_per_sample, **{primary: rows[hit].scores[primary]})
    return out


def first_hit(rows: list[Row], primary: str, best: Row) -> dict | None:
    """The learned map: its first step count resolved within 10% of `best` (`nfe`, None if none is),
    and `earliest`, its first step count not resolved outside (where the first hit could be). None if
    every step count is resolved outside."""
    rows = sorted(rows, key=lambda r: r.nfe)
    verdicts = within_verdicts(rows, best, primary)
    earliest = next((r for r, v in zip(rows, verdicts) if v is not False), None)
    hit = next((r for r, v in zip(rows, verdicts) if v is True), None)
    if earliest is None:
        return None
    shown = hit or earliest
    return {"nfe": hit.nfe if hit else None, "earliest": earliest.nfe, "resolved": hit is earliest,
            "seconds_per_sample": shown.seconds_per_sample, primary: shown.scores[primary]}


def speedup(rows: list[Row], primary: str) -> dict[str, dict]:
    """Within 10% of the teacher's best score (the teacher row of lowest mean): the learned map's first
    step count that gets there, each teacher solver's smallest NFE from which it stays there (an ODE
    solver's score settles as NFE grows; a few-step map's need not, and a user samples it at its best
    step count), and the ratio of the cheapest fixed-step solver's NFE and wall-clock at that quality
    to the learned map's. Every "within" is a verdict on a paired difference with its interval; the
    summary says `resolved: False` when an unresolved row could change the step counts compared."""
    teacher = [r for r in rows if r.method != "flow_map"]
    if not teacher:
        return {}
    best_row = min(teacher, key=lambda r: r.scores[primary])
    best = best_row.scores[primary]
    threshold = best + 0.1 * abs(best)
    out = {}
    for method in sorted({r.method for r in rows}):
        mine = [r for r in rows if r.method == method]
        out[method] = (first_hit if method == "flow_map" else first_within)(mine, primary, best_row)
    fixed = {m: v for m, v in out.items() if v is not None and m != "flow_map" and not m.startswith("dopri5")}
    hits = {m: v for m, v in fixed.items() if v["nfe"] is not None}
    flow = out.get("flow_map")
    if hits and flow is not None:
        cheapest = min(hits, key=lambda m: hits[m]["nfe"])
        teacher_nfe, teacher_low = hits[cheapest]["nfe"], min(v["earliest"] for v in fixed.values())
        flow_nfe = flow["nfe"] or flow["earliest"]
        # The ratio's range over what the unresolved rows could be: the teacher's first hit lies in
        # [teacher_low, teacher_nfe], the map's in [earliest, nfe] (no upper end if no step count is resolved).
        low = teacher_low / flow["nfe"] if flow["nfe"] else 0.0
        out["summary"] = {"teacher_best": best, "threshold": threshold, "teacher_solver": cheapest,
                          "teacher_nfe": teacher_nfe, "flow_map_nfe": flow_nfe,
                          "nfe_ratio": teacher_nfe / flow_nfe, "nfe_ratio_low": low,
                          "nfe_ratio_high": teacher_nfe / flow["earliest"],
                          "wallclock_ratio": hits[cheapest]["seconds_per_sample"] / flow["seconds_per_sample"],
                          "resolved": flow["resolved"] and teacher_low == teacher_nfe,
                          "sets": max(len(r.cells(primary)[0]) for r in rows)}
    return out


SET_STRIDE = 7919  # evaluation set j draws from seeds seed + SET_STRIDE * j (+ 0 .. 5): set 0 is the one-set protocol


@dataclass
class EvalSet:
    """One evaluation set: its noise (already scaled by sigma0), the scorer with its reference, the
    histogram KL's own noise, and what exact samples score on it (toy targets: the floor)."""

    noise: torch.Tensor
    scorer: Scorer
    kl_noise: torch.Tensor | None = None   # the histogram KL's own noise set (KL_SAMPLES points)
    floors: dict[str, float] = field(default_factory=dict)


@dataclass
class Protocol:
    """What every method of one comparison shares: M evaluation sets, and the exact velocity when the
    data is a toy target with ground truth. `noise`, `scorer`, `kl_noise` and `floors` are set 0's."""

    sets: list[EvalSet]
    exact: ExactVelocity | None = None

    @property
    def noise(self) -> torch.Tensor:
        return self.sets[0].noise

    @property
    def scorer(self) -> Scorer:
        return self.sets[0].scorer

    @property
    def kl_noise(self) -> torch.Tensor | None:
        return self.sets[0].kl_noise

    @property
    def floors(self) -> dict[str, float]:
        return self.sets[0].floors


def reference_sets(exp: ExperimentConfig, shape: tuple[int, ...], samples: int, sets: int, generator_for,
                   labelled: bool = False, subsets: bool = True):
    """([reference of each set], (images, labels, dataset name) or None): exact draws of a toy target
    (set j drawn from `generator_for(j)`), or `sets` disjoint subsets of one permutation of the Parquet
    shards (drawn from `generator_for(0)`; with the whole labelled set when `labelled`, which the
    classifier-feature distance trains on), or no reference rows (None per set) when no metric needs
    `subsets` (the FID against the whole training set's statistics)."""
    if exp.data.target is not None:
        target = exp.data.make_target()
        if (target.dim,) != shape:
            raise ValueError(f"the checkpoint's samples have shape {list(shape)} but {exp.data.target!r} has "
                             f"[{target.dim}].")
        return [target.sample(samples, generator_for(j)) for j in range(sets)], None
    if not subsets:
        manifest = read_manifest(exp.data.path)
        if tuple(manifest["shape"]) != shape:
            raise ValueError(f"the checkpoint's samples have shape {list(shape)} but the data at "
                             f"{exp.data.path!r} has {manifest['shape']}.")
        return [None] * sets, None
    data, manifest = read_part(exp.data.path)
    if tuple(manifest["shape"]) != shape:
        raise ValueError(f"the checkpoint's samples have shape {list(shape)} but the data at "
                         f"{exp.data.path!r} has {manifest['shape']}.")
    check_disjoint(len(data), samples, sets, exp.data.path)
    order = torch.randperm(len(data), generator=generator_for(0))
    references = [data[order[j * samples:(j + 1) * samples]] for j in range(sets)]
    if labelled and len(shape) == 3:
        try:
            return references, (data, read_labels(exp.data.path), manifest.get("dataset", "images"))
        except ValueError:  # no label column: the classifier distance is refused by the Scorer
            pass
    return references, None


def needs_subsets(shape: tuple[int, ...], metrics: list[str] | None, fid_reference: str) -> bool:
    """Whether a dataset's evaluation draws reference subsets: not when its one metric is the FID against
    the whole training set's statistics."""
    return not (len(shape) == 3 and fid_reference == "train" and list(metrics or ["fid"]) == ["fid"])


def check_disjoint(rows: int, samples: int, sets: int, where: str) -> None:
    """A dataset gives `sets` disjoint references of `samples` images only if it holds sets x samples."""
    if sets * samples > rows:
        raise ValueError(f"evaluation.sets: {sets} disjoint reference subsets of evaluation.samples {samples} need "
                         f"{sets * samples} rows but the data at {where!r} holds {rows}: allowed are sets <= "
                         f"{max(1, rows // samples)} at this sample size (or fewer samples).")


def box_log_density(target: BoxMixture):
    """The log density of a 2-D box target. Boxes half-open, [low, high), as a board indexed by floor()
    is: a bin centre on a square's edge counts for the square that starts there. The paper's KL follows
    this convention (exact samples score 0.067 to 0.069 at 64,000 with it, the paper about 0.066; 0.128
    with closed boxes, 0.009 with open ones)."""
    volume = (target.highs - target.lows).prod(1)

    def log_density(points):
        inside = ((points[:, None] >= target.lows) & (points[:, None] < target.highs)).all(-1)
        return torch.log((inside.double() * (target.weights / volume)).sum(1))
    return log_density


def build_protocol(exp: ExperimentConfig, interpolant: Interpolant, shape: tuple[int, ...], samples: int,
                   seed: int = 0, metrics_wanted: list[str] | None = None, log=print, sets: int = 1,
                   fid_reference: str = "train", fid_samples: int | None = None,
                   fid_stats: str | None = None, fid_weights: str | None = None,
                   device: str | torch.device | None = None) -> Protocol:
    """`sets` seeded evaluation sets for experiment `exp`'s data: per set, its noise, exact draws and the
    float64 reference map of the same noise for a toy target (and what another exact draw scores: the
    floor), or a disjoint subset of the Parquet shards otherwise. Set 0 is the one-set protocol.

    Images: `fid_samples` (default `samples`) generated per set; the FID's reference is the statistics
    of every training row when `fid_reference` is "train" (cached under `fid_stats`, by default
    <storage.path>/fid_stats; every set shares it), or each set's own subset of `samples` rows.
    `fid_weights`: the FID Inception file or s3:// URI (fmm.evaluation.fid.resolve_weights); `device`
    where the FID network runs (default CUDA when present)."""
    if sets < 1:
        raise ValueError(f"evaluation.sets is {sets}: give at least 1 evaluation set.")
    if fid_reference not in ("train", "subset"):
        raise ValueError(f"evaluation.fid_reference is {fid_reference!r}: allowed are 'train' (the whole training "
                         f"set's statistics) and 'subset'.")
    images = len(shape) == 3 and exp.data.target is None
    train_fid = extractor = None
    if images and "fid" in (metrics_wanted or ["fid"]):
        samples = fid_samples or samples
        extractor = fid.InceptionFeatures(fid_weights, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if fid_reference == "train":
            train_fid = fid.dataset_statistics(extractor, exp.data.path,
                                               fid_stats or storage.join(exp.storage.path, "fid_stats"), log=log)
    wants_classifier = metrics_wanted is None or "fd_classifier" in metrics_wanted
    references, labelled = reference_sets(exp, shape, samples, sets,
                                          lambda j: torch.Generator().manual_seed(seed + SET_STRIDE * j + 1),
                                          wants_classifier, subsets=needs_subsets(shape, metrics_wanted, fid_reference))
    target = exp.data.make_target() if exp.data.target is not None else None
    exact = ExactVelocity(target, interpolant) if target is not None else None
    out = []
    for j, reference in enumerate(references):
        base = seed + SET_STRIDE * j
        noise = interpolant.sigma0 * torch.randn((samples, *shape), generator=torch.Generator().manual_seed(base))
        if target is None:
            out.append(EvalSet(noise, Scorer(shape, reference, wanted=metrics_wanted, labelled=labelled,
                                             fid_reference=train_fid, extractor=extractor)))
            continue
        reference_map = log_density = extent = None
        if metrics_wanted is None or "rmse_vs_ode" in metrics_wanted:
            log(f"[fmm] float64 reference map of {samples} noise points (evaluation set {j + 1} of {sets}) ...")
            reference_map = reference_flow_map(exact, 0.0, 1.0, noise.double())
        if isinstance(target, BoxMixture) and shape == (2,):
            extent, log_density = float(target.highs.max()), box_log_density(target)
        scorer = Scorer(shape, reference, reference_map, log_density, extent, metrics_wanted)
        # The floor: what an exact sampler scores against this set's reference at the same sample size.
        floors = {k: v for k, v in scorer(target.sample(samples, torch.Generator().manual_seed(base + 5)),
                                          paired=False).items()}
        kl_noise = None
        if "histogram_kl" in scorer.wanted:
            kl_noise = interpolant.sigma0 * torch.randn((KL_SAMPLES, *shape), generator=torch.Generator().manual_seed(base + 3))
            floors["histogram_kl"] = scorer.histogram(target.sample(KL_SAMPLES, torch.Generator().manual_seed(base + 4)))
        out.append(EvalSet(noise, scorer, kl_noise, floors))
    return Protocol(out, exact)


def merge_sets(reports: list[Report]) -> Report:
    """One report from the same runs on M evaluation sets: each row's scores on every set (`sets`) and
    their mean, wall-clock per sample averaged, the floors per set, the speed-up decided on the sets."""
    first = reports[0]
    rows = []
    for i, row in enumerate(first.rows):
        same = [r.rows[i] for r in reports]
        tables = {k: [[r.scores.get(k, math.nan) for r in same]] for k in row.scores}
        rows.append(Row(row.method, row.steps, row.nfe, sum(r.seconds_per_sample for r in same) / len(same),
                        {k: sum(t[0]) / len(same) for k, t in tables.items()}, tables))
    floor_sets = {k: [r.floors.get(k, math.nan) for r in reports] for k in first.floors}
    return Report(first.primary, first.samples, rows, speedup(rows, first.primary), first.sampler,
                  {k: sum(v) / len(v) for k, v in floor_sets.items()}, first.note, floor_sets, first.provenance)


def merge_seeds(row_lists: list[list[Row]]) -> list[Row]:
    """One method's rows from its S seed runs (each scored on the same M sets): each row's seeds x sets
    table, the mean over it, wall-clock per sample averaged over the seeds."""
    rows = []
    for same in zip(*row_lists):
        tables = {k: [r.cells(k)[0] for r in same] for k in same[0].scores}
        rows.append(Row(same[0].method, same[0].steps, same[0].nfe, sum(r.seconds_per_sample for r in same) / len(same),
                        {k: sum(sum(c) for c in t) / sum(len(c) for c in t) for k, t in tables.items()}, tables))
    return rows


def run_sets(model, teacher, protocol: Protocol, steps: list[int], teacher_max_nfe: int = 256, log=print,
             progress: bool = True, sampler=None, sampler_kind: str = "flow_map", teacher_tolerances=TOLERANCES) -> Report:
    """run_protocol on each of the protocol's evaluation sets, merged (merge_sets)."""
    reports = []
    for j, ev in enumerate(protocol.sets):
        if len(protocol.sets) > 1:
            log(f"[fmm] evaluation set {j + 1} of {len(protocol.sets)}")
        reports.append(run_protocol(model, teacher, ev.noise, steps, ev.scorer, teacher_max_nfe, log,
                                    progress=progress, sampler=sampler, sampler_kind=sampler_kind,
                                    kl_noise=ev.kl_noise, floors=ev.floors, teacher_tolerances=teacher_tolerances))
    return merge_sets(reports)


def evaluate_map(model: TwoTimeMap, exp: ExperimentConfig, interpolant: Interpolant, protocol: Protocol,
                 steps: list[int], *, seed: int = 0, teacher: VelocityField | None = None, teacher_max_nfe: int = 64,
                 log=print, progress: bool = True) -> tuple[Report, object]:
    """The evaluation sequence of `fmm evaluate` and of a study's members: the map sampled by its
    method's own sampler at each step count (and, given a teacher, that teacher's ODE solvers), on each
    of the protocol's evaluation sets. Returns the report and the sampler (for sample figures)."""
    sampler, kind = sampler_for(exp.objective, interpolant, seed=seed + 2)
    report = run_sets(model, teacher, protocol, steps, teacher_max_nfe, log, progress=progress, sampler=sampler,
                      sampler_kind=kind)
    return report, sampler


def format_report(report: Report) -> str:
    sets = report.sets
    spread = (f"; mean ± 95% half-width over {sets} evaluation sets" if sets > 1 else "; one evaluation set, no interval")
    lines = [f"learned map sampled with the {report.sampler} sampler; teacher rows are ODE solvers{spread}",
             f"{'method':12s} {'steps':>5s} {'NFE':>5s} {'ms/sample':>10s}  " + report.primary]
    for row in sorted(report.rows, key=lambda r: (r.method != "flow_map", r.method, r.nfe)):
        lines.append(f"{row.method:12s} {row.steps:5d} {row.nfe:5d} {1000 * row.seconds_per_sample:10.4f}  "
                     f"{row.estimate(report.primary).text()}")
    summary = report.speedup.get("summary")
    if summary:
        verdict = "" if summary.get("resolved", True) else (
            f" NOT RESOLVED at this sample size: the NFE ratio lies between {summary['nfe_ratio_low']:.1f} and "
            f"{summary['nfe_ratio_high']:.1f}")
        lines.append(f"within 10% of the teacher's best {report.primary} ({summary['teacher_best']:.4g}, "
                     f"{report.samples} samples x {sets} set(s)): flow map at {summary['flow_map_nfe']} NFE, teacher "
                     f"{summary['teacher_solver']} at {summary['teacher_nfe']} NFE: NFE ratio {summary['nfe_ratio']:.1f}, "
                     f"wall-clock ratio {summary['wallclock_ratio']:.2f} (teacher / flow map){verdict}")
    elif "flow_map" in report.speedup and report.speedup["flow_map"] is None:
        lines.append(f"the flow map never comes within 10% of the teacher's best {report.primary}")
    for name, value in report.floors.items():
        size = samples_scored(name, report.samples)
        floor = estimate(report.floor_sets.get(name) or [value]).text()
        lines.append(f"floor: exact samples score {name} {floor} at {size} samples (a perfect sampler's score)")
    if report.note:
        lines.append(report.note)
    return "\n".join(lines)


__all__ = ["EvalSet", "Protocol", "Report", "Row", "Scorer", "build_protocol", "evaluate_map", "format_report",
           "merge_seeds", "merge_sets", "run_sets", "speedup", "teacher_grid"]
