"""`fmm evaluate`: quality against number of steps for a trained flow map and its teacher's ODE solvers,
and the speed-up at equal quality, logged into the training run's MLflow run.

The protocol (fmm.evaluation.protocol): `--sets` evaluation sets (seeded noise and references) serve
every method, so that scores are paired by set and carry 95% intervals. The flow
map is sampled with its EMA weights by its method's own sampler at each step count. The teacher is
the exact velocity when the run's data is a toy target with ground truth, else the flow map's own
diagonal v(t, t, x); it is integrated by Euler, Heun and RK4 (both with an Euler last step, so no
stage touches t = 1) at NFE 1 to `teacher_max_nfe`, and by dopri5 at a few tolerances. Every
speed-up names the teacher's solver, its NFE and the sample size: against an Euler teacher a flow
map looks 4 to 16 times better than against RK4.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings

import ray

from fmm.checkpoint import read_flow_map
from fmm.evaluation.fid import usable_device
from fmm.evaluation.figures import close, quality_figure, sample_figure
from fmm.evaluation.protocol import Protocol, Report, Row, build_protocol, device_of, evaluate_map
from fmm.experiment.builders import build_interpolant, build_objective, build_teacher
from fmm.experiment.schema import ExperimentConfig
from fmm.experiment.teachers import fetch_checkpoint, load_trained, on_path
from fmm.flowmap import FlowMap, ModelVelocity, VelocityField
from fmm.infra import storage
from fmm.infra.tracking import RunLogger
from fmm.jobs.cluster import check_evaluation_fits, connect, evaluation_device, node_shapes, ray_options


def on_device(velocity, device) -> None:
    """A network velocity (ModelVelocity, or one moved between paths) onto `device`."""
    inner = getattr(velocity, "velocity", velocity)
    if hasattr(inner, "to"):
        inner.to(device)


def where() -> dict[str, str]:
    """Where an evaluation ran, as MLflow tags: the Ray node and whether in a Ray task or the driver."""
    if ray.is_initialized():
        context = ray.get_runtime_context()
        return {"eval_node": context.get_node_id(), "eval_worker": "task" if context.worker.mode == ray.WORKER_MODE
                else "driver"}
    return {"eval_node": "local", "eval_worker": "driver"}


def parse_steps(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]; zero, negative or non-integer entries are refused by name."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"--steps takes positive integers separated by commas (e.g. 1,2,4,8,16); got {item!r}.")
        values.append(int(item))
    return sorted(set(values))


def parse_resources(text: str) -> dict[str, float]:
    """'GPU=1,CPU=8' -> {'GPU': 1.0, 'CPU': 8.0}: what an evaluation task asks Ray for."""
    resources = {}
    for item in str(text).split(","):
        name, _, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = float("nan")
        if not name.strip() or not value > 0 or not math.isfinite(value):
            raise ValueError(f"--resources takes NAME=AMOUNT pairs separated by commas, each amount positive (e.g. "
                             f"GPU=1,CPU=8; memory in bytes; other names are custom resources); got {item!r}.")
        resources[name.strip()] = value
    return resources


def score_metrics(row: Row, prefix: str = "") -> dict[str, float]:
    """A row's scores as MLflow metrics: `<metric>` the mean over seeds x sets; with more than one
    score, `<metric>/low` and `<metric>/high` (its 95% interval, fmm.evaluation.intervals) and
    `<metric>/n`; with one seed and several sets, each set's score as `<metric>/set<j>`."""
    values = {}
    for k in row.scores:
        est, cells = row.estimate(k), row.cells(k)
        values[f"{prefix}{k}"] = est.mean
        if est.n > 1:
            values[f"{prefix}{k}/n"] = est.n
        if est.has_interval:
            values.update({f"{prefix}{k}/low": est.low, f"{prefix}{k}/high": est.high})
        if len(cells) == 1 and len(cells[0]) > 1:
            values.update({f"{prefix}{k}/set{j}": v for j, v in enumerate(cells[0])})
    return values


def log_rows(logger, rows: list[Row], solver_prefix: str = "teacher") -> None:
    """Each row's scores at step = NFE (score_metrics): the learned map's as `<metric>` (and
    `<metric>_stepsNNN`, `nfe`), an ODE solver's as `<solver_prefix>/<solver>/<metric>`, each with its
    seconds per sample."""
    for row in rows:
        prefix = "" if row.method == "flow_map" else f"{solver_prefix}/{row.method}/"
        if row.method != "flow_map" and row.nfe == 0:
            continue
        values = score_metrics(row, prefix)
        values[f"{prefix}seconds_per_sample"] = row.seconds_per_sample
        if row.method == "flow_map":
            values["nfe"] = row.nfe
            values.update({f"{k}_steps{row.steps:03d}": v for k, v in row.scores.items()})
        for key, value in values.items():
            if not math.isfinite(value):  # logged as it is (MLflow keeps NaN and infinity), and said
                warnings.warn(f"{key} is {value} at NFE {row.nfe} ({row.method}); logged as such", stacklevel=2)
        logger.log_metrics(values, step=row.nfe)


def log_floors(logger, report: Report) -> None:
    """What exact samples score at the study's sample size (`floor/<metric>`, with its interval and each
    set's value when there are several sets), at step 0."""
    for name, value in report.floors.items():
        per_set = report.floor_sets.get(name) or [value]
        logger.log_metrics(score_metrics(Row("floor", 0, 0, 0.0, {name: value}, {name: [per_set]}), "floor/"), step=0)


def log_report(report: Report, tracking_uri: str, run_id: str, model=None, steps: list[int] | None = None,
               sampler=None, sigma0: float = 1.0) -> None:
    """The primary metric at step = NFE (MLflow's chart is then the quality-vs-steps curve), the other
    metrics, NFE and wall-clock per sample alongside, teacher curves, the figure, the table and the
    samples at each step count."""
    logger = RunLogger(tracking_uri, run_id)
    log_rows(logger, report.rows)
    summary = report.speedup.get("summary")
    if summary:
        logger.log_metrics({"speedup/nfe_ratio": summary["nfe_ratio"],
                            "speedup/wallclock_ratio": summary["wallclock_ratio"],
                            "speedup/resolved": float(summary["resolved"])}, step=0)
    logger.set_tags({"eval_sampler": report.sampler, "eval_metric": report.primary, "eval_samples": report.samples,
                     "eval_sets": report.sets, **report.provenance, **where(),
                     "eval_device": str(device_of(model)) if model is not None else "cpu",
                     **({"eval_note": report.note} if report.note else {})})
    log_floors(logger, report)
    logger.flush()
    fig = quality_figure(report)
    logger.log_figure(fig, f"evaluation/{report.primary}_vs_steps.png")
    close(fig)
    if model is not None and steps:
        shape = tuple(model.sample_shape)
        if len(shape) == 3 or shape == (2,):
            fig = sample_figure(model, shape, steps, next(model.parameters()).device, seed=0, sampler=sampler,
                                sigma0=sigma0)
            logger.log_figure(fig, "evaluation/samples.png")
            close(fig)
    with tempfile.TemporaryDirectory() as folder:
        table = os.path.join(folder, "evaluation.json")
        with open(table, "w") as f:
            json.dump({"primary": report.primary, "samples": report.samples, "rows": report.table(),
                       "speedup": report.speedup}, f, indent=1)
        csv = os.path.join(folder, "evaluation.csv")
        keys = sorted({k for row in report.table() for k in row}, key=lambda k: (k not in
                      ("method", "steps", "nfe", "seconds_per_sample"), k))
        with open(csv, "w") as f:
            f.write(",".join(keys) + "\n")
            for row in report.table():
                f.write(",".join(str(row.get(k, "")) for k in keys) + "\n")
        logger.log_artifact(table, "evaluation")
        logger.log_artifact(csv, "evaluation")


def own_teacher(model: FlowMap, exp: ExperimentConfig, protocol: Protocol,
                teacher_path: str | None = None) -> tuple[VelocityField | None, str]:
    """The velocity whose ODE solvers a run is compared with, and a note when there is none: the exact
    velocity of a toy target, else `teacher_path` (a flow-map file whose diagonal is the teacher), else
    the run's own distillation teacher, else the run's diagonal v(t, t, x) if its objective trains it.
    A consistency model learns X_{s,1} only: its diagonal is no velocity, so it gets no teacher rows."""
    interpolant = build_interpolant(exp)
    if protocol.exact is not None:
        return protocol.exact, ""
    if teacher_path is not None:
        model, config = read_flow_map(fetch_checkpoint(teacher_path, exp.tracking.uri))
        return on_path(ModelVelocity(model), (config or {}).get("interpolant"), interpolant, teacher_path), ""
    if (exp.teacher or {}).get("kind") == "checkpoint":
        return build_teacher(exp, interpolant), ""
    if build_objective(exp, interpolant).learns_velocity():
        return ModelVelocity(model), ""
    return None, (f"no teacher rows: {exp.objective['name']} never trains its diagonal v(t, t, x), so the run has no "
                  f"velocity of its own to solve; give --teacher CHECKPOINT (a flow-map file) to compare with a "
                  f"teacher's ODE solvers.")


def evaluate(source: str, steps: list[int], *, samples: int = 4000, seed: int = 0, metrics_wanted=None,
             teacher_max_nfe: int = 256, log_mlflow: bool = True, log=print, with_teacher: bool = True,
             teacher_path: str | None = None, sets: int = 1, fid_reference: str = "train",
             fid_stats: str | None = None, fid_weights: str | None = None, device: str | None = "cpu") -> Report:
    """Score the run (or flow-map file) at `source` by the protocol on `device` (the flow map, a network
    teacher and the FID network; a closed-form velocity stays on the CPU in float64; None: CUDA when
    this process has it), logging into its MLflow run if it has one."""
    device = usable_device(device or evaluation_device())
    model, exp, record = load_trained(source)
    model.to(device).eval()
    if exp is None:
        raise ValueError(f"{source!r} carries no experiment config: evaluate a training run or a final.pt it wrote.")
    interpolant = build_interpolant(exp)
    if metrics_wanted is None and exp.data.target is not None:
        metrics_wanted = ["sw2", "energy", "mmd", "w2_exact", "rmse_vs_ode"]
    protocol = build_protocol(exp, interpolant, tuple(model.sample_shape), samples, seed, metrics_wanted, log,
                              sets=sets, fid_reference=fid_reference, fid_stats=fid_stats,
                              fid_weights=fid_weights, device=device)
    teacher, note = own_teacher(model, exp, protocol, teacher_path) if with_teacher else (None, "")
    if teacher is not None and teacher is not protocol.exact:
        on_device(teacher, device)
    report, sampler = evaluate_map(model, exp, interpolant, protocol, steps, seed=seed, teacher=teacher,
                                   teacher_max_nfe=teacher_max_nfe, log=log)
    report.note = note
    if log_mlflow and record is not None:
        log_report(report, record.tracking_uri, record.mlflow_run_id, model=model, steps=steps, sampler=sampler,
                   sigma0=interpolant.sigma0)
        log(f"[fmm] logged into MLflow run {record.mlflow_run_id} at {record.tracking_uri}")
    elif log_mlflow:
        log(f"[fmm] not logged into MLflow: {source} belongs to no run (name its run folder, runs:/<run id> or "
            f"models:/<name>@<alias> to log into that run)")
    return report


def evaluate_on_cluster(resources: dict[str, float], source: str, steps: list[int], *, address: str | None = None,
                        **options) -> Report:
    """`evaluate` as one Ray task that asks for `resources` (e.g. {GPU: 1}): it runs on a node that holds
    them, on that node's GPU unless `device` says otherwise (its CPU when it has no CUDA), and logs into
    the run from there; this process (e.g. the CPU head under `ray job submit`) loads neither model nor
    data. A request no node can hold is refused before anything is asked for."""
    def absolute(path: str | None) -> str | None:  # a task's working directory is not this one
        return path if path is None else storage.absolute(path)

    connect(address)
    check_evaluation_fits(resources, *node_shapes())
    paths = {k: absolute(options.get(k)) for k in ("teacher_path", "fid_stats", "fid_weights")}
    task = ray.remote(**ray_options(resources))(evaluate)
    try:
        return ray.get(task.remote(absolute(source), steps, **{**options, **paths}))
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None  # the evaluation's own error (a bad run, metric, weights file), as here
