"""`fmm sweep SWEEP.yaml`: Ray Tune with Optuna over any experiment key, each trial a training run.

    name: flower-schedules
    base: ../train/flower_lmd.yaml        # the experiment every trial starts from (relative to this file)
    set: {train.steps: 300, train.eval_every: 100}     # overrides of the base, for every trial
    space:                                # dotted experiment keys; Optuna distributions
      interpolant.schedule: {categorical: [linear, trig]}
      objective.diagonal_fraction: {float: [0.0, 0.5]}
      optim.lr: {float: [1.0e-4, 1.0e-2], log: true}
      network.depth: {int: [2, 4]}
      objective.invertibility_weight: {float: [0.1, 10], log: true, when: {objective.name: two_map}}
    metric: eval/sw2_steps001             # or a list of {name, mode} for a multi-objective search
    mode: min
    search: {sampler: tpe, seed: 0, num_samples: 8, max_concurrent_trials: 2}
    scheduler: {kind: asha, grace_period: 100, reduction_factor: 2}      # or {kind: fifo}
    storage: {path: ./sweeps}             # or s3://bucket/prefix
    tracking: {experiment: fmm-sweeps}

Each trial applies its sampled values to the base and runs the same training loop as `fmm train`,
reporting the step, the loss and the periodic evaluation to Tune at every evaluation, where ASHA
may stop it (time attribute: the training step). A trial with one CPU worker runs the loop in the
trial's own process; a distributed or GPU trial starts a TorchTrainer with its own workers and
forwards their reports to Tune (Ray 2.60's Train-inside-Tune pattern). `when` makes a key
conditional on values sampled before it (or the base's). MLflow gets one parent run per sweep and
a nested child run per trial, tagged with the Ray trial id; the trial's results carry the child's
run id. `fmm sweep --resume SWEEP.yaml` restores the Tuner and runs only what is missing.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from fmm import storage
from fmm.config import StrictModel, validate
from fmm.experiment import (ExperimentConfig, TrackingConfig, apply_overrides, load_experiment, read_yaml,
                            set_key)

SWEEP_RECORD = "fmm_sweep.json"


class Distribution(StrictModel):
    """One key of the search space: exactly one of categorical, float, int; `when` conditions it."""

    categorical: list[Any] | None = None
    float_: tuple[float, float] | None = Field(None, alias="float")
    int_: tuple[int, int] | None = Field(None, alias="int")
    log: bool = False
    step: float | None = Field(None, gt=0)
    when: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        kinds = [k for k, v in (("categorical", self.categorical), ("float", self.float_), ("int", self.int_))
                 if v is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of categorical: [...], float: [low, high] or int: [low, high]")
        if self.categorical is not None and not self.categorical:
            raise ValueError("categorical needs at least one choice")
        bounds = self.float_ or self.int_
        if bounds is not None:
            low, high = bounds
            if low > high:
                raise ValueError(f"low ({low}) must not exceed high ({high})")
            if self.log and low <= 0:
                raise ValueError(f"a log-scale range needs low > 0; got {low}")
        return self

    def probes(self) -> list[Any]:
        """The values that bound what a trial can be given: every choice, or both ends."""
        if self.categorical is not None:
            return list(self.categorical)
        return list(self.float_ or self.int_)

    def suggest(self, trial, name: str) -> Any:
        if self.categorical is not None:
            return trial.suggest_categorical(name, self.categorical)
        if self.float_ is not None:
            return trial.suggest_float(name, *self.float_, log=self.log, step=self.step)
        return trial.suggest_int(name, *self.int_, log=self.log, step=int(self.step or 1))


class MetricSpec(StrictModel):
    name: str
    mode: Literal["min", "max"] = "min"


class SearchSettings(StrictModel):
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    num_samples: int = Field(8, ge=1, le=100_000)
    max_concurrent_trials: int = Field(2, ge=1, le=10_000)


class SchedulerSettings(StrictModel):
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int | None = Field(None, ge=1)   # training steps; default: the evaluation interval
    reduction_factor: float = Field(2.0, gt=1.0)


class SweepStorage(StrictModel):
    path: str = "./sweeps"


class SweepConfig(StrictModel):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    base: str
    set: dict[str, Any] = {}
    space: dict[str, Distribution]
    metric: str | list[MetricSpec]
    mode: Literal["min", "max"] = "min"
    search: SearchSettings = SearchSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    storage: SweepStorage = SweepStorage()
    tracking: TrackingConfig = TrackingConfig(experiment="fmm-sweeps")
    trial_mode: Literal["auto", "in_process", "trainer"] = "auto"

    @model_validator(mode="after")
    def _checks(self) -> SweepConfig:
        storage.refuse_credentials(self.storage.path, "storage.path")
        storage.refuse_credentials(self.tracking.uri, "tracking.uri")
        if not self.space:
            raise ValueError("space is empty: name at least one experiment key to search over")
        if isinstance(self.metric, list):
            if not self.metric:
                raise ValueError("metric: give a name, or a non-empty list of {name, mode}")
            if self.scheduler.kind == "asha" and len(self.metric) > 1:
                raise ValueError("scheduler 'asha' stops trials on one metric: a multi-objective search "
                                 "needs scheduler: {kind: fifo}")
        return self

    @property
    def metrics(self) -> list[MetricSpec]:
        return [MetricSpec(name=self.metric, mode=self.mode)] if isinstance(self.metric, str) else self.metric


# -- loading and validation (all before any trial starts) ----------------------------------------

def _absolute_paths(raw: dict[str, Any]) -> None:
    """Tune trials run in their own folders: make the experiment's local paths absolute here."""
    data = raw.get("data") or {}
    if isinstance(data.get("path"), str):
        data["path"] = storage.absolute(data["path"])
    teacher = raw.get("teacher") or {}
    if isinstance(teacher.get("path"), str) and not teacher["path"].startswith("runs:/"):
        teacher["path"] = storage.absolute(teacher["path"])


def _holds(when: dict[str, Any], values: dict[str, Any], base: dict[str, Any]) -> bool:
    for key, wanted in when.items():
        value = values[key] if key in values else _lookup(base, key)
        if value != wanted:
            return False
    return True


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def load_sweep(path: str, overrides: list[str] | None = None) -> tuple[SweepConfig, dict[str, Any]]:
    """The validated sweep and the base experiment tree (with `set` applied), every trial's starting point."""
    raw = apply_overrides(read_yaml(path, "sweep"), overrides, "search.num_samples=4")
    sweep = validate(SweepConfig, raw, f"sweep {path}")
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), sweep.base)
    if not os.path.isfile(base_path):
        raise ValueError(f"sweep {path}: base experiment {sweep.base!r} not found (looked for {base_path}).")
    base = read_yaml(base_path, "base experiment")
    for key, value in sweep.set.items():
        set_key(base, key, value)
    _absolute_paths(base)
    check_sweep(sweep, base)
    return sweep, base


def trial_experiment(sweep: SweepConfig, base: dict[str, Any], values: dict[str, Any], name: str,
                     tracking_uri: str | None = None) -> ExperimentConfig:
    """The experiment of one trial: the base with the sampled values, its own name, the sweep's storage
    and the sweep's (resolved, absolute) tracking URI."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        set_key(raw, key, value)
    raw["name"] = name
    raw["storage"] = {"path": storage.join(storage.absolute(sweep.storage.path), sweep.name, "runs")}
    raw["tracking"] = {"uri": tracking_uri or sweep.tracking.uri, "experiment": sweep.tracking.experiment}
    if raw.get("train", {}).get("eval_every"):
        raw["train"]["checkpoint_every"] = raw["train"]["eval_every"]  # every report carries the metric
    return load_experiment(raw=raw)


def check_sweep(sweep: SweepConfig, base: dict[str, Any]) -> None:
    """Every key of the space exists (each probe value gives a valid experiment), the metric is one
    the trials report, and the evaluation interval divides the run."""
    from fmm.train import reported_metrics, validate_before_start

    try:
        exp = trial_experiment(sweep, base, {}, f"{sweep.name}-probe")
    except ValueError as err:
        raise ValueError(f"sweep {sweep.name}: the base experiment {sweep.base!r} is invalid: {err}") from None
    for key, dist in sweep.space.items():
        for probe in dist.probes():
            values = {k: v for k, v in dist.when.items()}
            values[key] = probe
            try:
                validate_before_start(trial_experiment(sweep, base, values, f"{sweep.name}-probe"))
            except ValueError as err:
                raise ValueError(f"sweep {sweep.name}: space key {key!r} with value {probe!r}"
                                 f"{' (when ' + str(dist.when) + ')' if dist.when else ''} does not give a "
                                 f"valid experiment: {err}") from None
    trial_resources(exp, sweep.trial_mode)
    reported = reported_metrics(exp)
    for metric in sweep.metrics:
        if metric.name not in reported:
            hint = "" if exp.train.eval_every else " (set train.eval_every to report evaluation metrics)"
            raise ValueError(f"sweep {sweep.name}: metric {metric.name!r} is not reported by the trials; they "
                             f"report {reported}{hint}.")
    if exp.train.eval_every and exp.train.steps % exp.train.eval_every:
        raise ValueError(f"sweep {sweep.name}: train.steps ({exp.train.steps}) must be a multiple of "
                         f"train.eval_every ({exp.train.eval_every}), so every trial reports at its end.")


def trial_resources(exp: ExperimentConfig, mode: str = "auto") -> tuple[bool, dict[str, float]]:
    """(in_process, resources of the trial's own actor). One CPU worker (mode auto or in_process): the
    loop runs in the trial, which holds its CPUs. Otherwise (or mode trainer) a TorchTrainer's workers
    hold theirs and the trial a sliver."""
    scaling = exp.scaling
    single = scaling.num_workers == 1 and not scaling.use_gpu
    if mode == "in_process" and not single:
        raise ValueError(f"trial_mode 'in_process' runs one CPU worker in the trial's process; this experiment has "
                         f"{scaling.num_workers} workers{' on GPUs' if scaling.use_gpu else ''}: use auto or trainer.")
    if single and mode != "trainer":
        return True, {"CPU": scaling.cpus_per_worker}
    return False, {"CPU": 0.01}


CLUSTER_CONFIG = "~/ray_bootstrap_config.yaml"  # where the Ray cluster launcher puts the head's cluster file


def node_types() -> list[tuple[str, dict[str, float], int]] | None:
    """(name, resources, max_workers) of each node type of an autoscaling cluster, or None on a fixed one.

    From the autoscaler's published config (autoscaler v2, as Ray Train itself checks), else from the
    cluster file: $FMM_CLUSTER_CONFIG, or the launcher's ~/ray_bootstrap_config.yaml on the head."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # no autoscaler state on this cluster
        config = None
    if config is not None and config.node_group_configs:
        return [(g.name, dict(g.resources), g.max_count) for g in config.node_group_configs]
    path = os.path.expanduser(os.environ.get("FMM_CLUSTER_CONFIG", CLUSTER_CONFIG))
    if not os.path.isfile(path):
        return None
    cluster = read_yaml(path, "cluster")
    types = cluster.get("available_node_types") or {}
    head = cluster.get("head_node_type")
    return [(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
             1 if name == head else int(spec.get("max_workers", cluster.get("max_workers", 0))))
            for name, spec in types.items()]


def check_resources(exp: ExperimentConfig, cluster: dict[str, float], max_concurrent: int,
                    types: list[tuple[str, dict[str, float], int]] | None = None) -> int:
    """The concurrency at which trials never wait on each other's workers. On an autoscaling cluster
    (`types`) a worker must fit one node type and the types' node limits bound the concurrency; on a
    fixed cluster the resources it has now do. A trial the cluster can never hold is an error."""
    scaling = exp.scaling
    worker = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        worker["GPU"] = float(scaling.gpus_per_worker or 1)
    what = f"{scaling.num_workers} worker(s) of {worker}"
    if types:
        def per_node(resources: dict[str, float]) -> int:
            return int(min(resources.get(k, 0.0) // v for k, v in worker.items()))

        fitting = [(name, per_node(res), count) for name, res, count in types if per_node(res) >= 1]
        if not fitting:
            listing = "; ".join(f"{name}: {res}" for name, res, _ in types)
            raise ValueError(f"one trial needs {what} and no node type of this cluster can hold one worker "
                             f"({listing}): lower scaling.* or add a node type that fits.")
        if any(count < 0 for _, _, count in fitting):
            return max_concurrent
        workers = sum(n * count for _, n, count in fitting)
        if workers < scaling.num_workers:
            raise ValueError(f"one trial needs {what} but the cluster's node types hold at most {workers} such "
                             f"workers ({', '.join(f'{name} x{count}' for name, _, count in fitting)}).")
        return max(1, min(max_concurrent, workers // scaling.num_workers))
    need_cpu = scaling.num_workers * worker["CPU"]
    need_gpu = scaling.num_workers * worker.get("GPU", 0.0)
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if need_cpu > have_cpu or need_gpu > have_gpu:
        raise ValueError(f"one trial needs {need_cpu:g} CPU and {need_gpu:g} GPU ({what}) but the cluster offers "
                         f"{have_cpu:g} CPU and {have_gpu:g} GPU: lower scaling.* in the base or the sweep's set, "
                         f"or add nodes (on an autoscaling cluster whose node types fmm cannot read, point "
                         f"FMM_CLUSTER_CONFIG at its cluster file).")
    fits = int(have_cpu // need_cpu)
    if need_gpu:
        fits = min(fits, int(have_gpu // need_gpu))
    return max(1, min(max_concurrent, fits))


# -- the trial -----------------------------------------------------------------------------------

def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: build the trial's experiment, open (or on a restart, find) its nested MLflow
    run, train, and close the run with its status and, on failure, the reason."""
    import ray.tune

    from fmm import tracking
    from fmm.train import TuneTrialSession, loop_config, make_trainer, open_run, run_loop

    sweep = SweepConfig(**context["sweep"])
    trial_id = ray.tune.get_context().get_trial_id()
    exp = trial_experiment(sweep, context["base"], config, f"{sweep.name}-{trial_id}", context["tracking_uri"])
    uri, parent = context["tracking_uri"], context["parent_run_id"]
    found = tracking.client(uri).search_runs(
        [context["experiment_id"]], f"tags.ray_trial_id = '{trial_id}' and tags.mlflow.parentRunId = '{parent}'")
    record = open_run(exp, parent_run_id=parent, run_id=found[0].info.run_id if found else None,
                      extra_tags={"ray_trial_id": trial_id, "sweep": sweep.name},
                      extra_params={f"sweep.{k}": str(v) for k, v in config.items()})
    in_process, _ = trial_resources(exp, sweep.trial_mode)
    status = "FAILED"
    try:
        if in_process:
            run_loop(loop_config(exp, record), TuneTrialSession())
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            make_trainer(exp, record, callbacks=[TuneReportCallback()]).fit()
        status = "FINISHED"
    except SystemExit:  # how Tune ends a trial its scheduler stopped
        status = "KILLED"
        tracking.set_tags(uri, record["mlflow_run_id"], {"stopped": "by the scheduler"})
        raise
    except BaseException as err:
        tracking.set_tags(uri, record["mlflow_run_id"], {"failure_reason": f"{type(err).__name__}: {err}"[:5000]})
        raise
    finally:
        tracking.end_run(uri, record["mlflow_run_id"], status)


# -- the driver ----------------------------------------------------------------------------------

class SearchSpace:
    """Optuna's define-by-run space (picklable: Tune saves the searcher with the sweep's state)."""

    def __init__(self, sweep: SweepConfig, base: dict[str, Any]):
        self.space, self.base = sweep.space, base

    def __call__(self, trial) -> None:
        values: dict[str, Any] = {}
        for key, dist in self.space.items():
            if _holds(dist.when, values, self.base):
                values[key] = dist.suggest(trial, key)


def run_sweep(sweep: SweepConfig, base: dict[str, Any], *, resume: bool = False, address: str | None = None,
              log=print, parent_run_id: str | None = None):
    """Run (or resume) the sweep; returns the ResultGrid after logging the summary into the sweep's run
    (nested under `parent_run_id`, a study's run, when given)."""
    import optuna
    import ray
    import ray.tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from fmm import tracking

    sweep_dir = storage.join(storage.absolute(sweep.storage.path), sweep.name)
    record_path = storage.join(sweep_dir, SWEEP_RECORD)
    exists = storage.claim(sweep_dir, SWEEP_RECORD, "sweep", sweep.name, resume)
    probe = trial_experiment(sweep, base, {}, f"{sweep.name}-probe")
    in_process, resources = trial_resources(probe, sweep.trial_mode)

    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        ray.init(address=address, log_to_driver=True)
    concurrency = check_resources(probe, ray.cluster_resources(), sweep.search.max_concurrent_trials, node_types())

    uri = tracking.resolve_uri(sweep.tracking.uri)
    if exists:
        record = storage.read_json(record_path, f"unreadable {record_path}")
        uri, parent, experiment_id = record["tracking_uri"], record["parent_run_id"], record["experiment_id"]
        tracking.set_tags(uri, parent, {"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    else:
        experiment_id = tracking.ensure_experiment(uri, sweep.tracking.experiment)
        parent = tracking.start_run(uri, experiment_id, sweep.name, tracking.flatten(
            {"sweep": sweep.model_dump(by_alias=True, exclude={"space"}), "base": base}),
            {"sweep": sweep.name, "ray_storage": sweep_dir, "kind": "sweep"}, parent_run_id)
        record = {"name": sweep.name, "tracking_uri": uri, "parent_run_id": parent, "experiment_id": experiment_id,
                  "sweep": sweep.model_dump(by_alias=True), "base": base}
        storage.write_bytes(record_path, json.dumps(record, indent=1).encode())
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "space.json")
            with open(path, "w") as f:
                json.dump({k: v.model_dump(by_alias=True, exclude_none=True) for k, v in sweep.space.items()}, f,
                          indent=1)
            tracking.client(uri).log_artifact(parent, path, "sweep")
    log(f"[fmm] sweep {sweep.name}: {sweep.search.num_samples} trials, {concurrency} at a time, "
        f"{'in the trial process' if in_process else 'each a TorchTrainer'}; storage {sweep_dir}; "
        f"MLflow parent run {parent} at {uri}")

    context = {"sweep": sweep.model_dump(by_alias=True), "base": base, "tracking_uri": uri,
               "parent_run_id": parent, "experiment_id": experiment_id}
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, context=context), resources)
    tuner_path = storage.join(sweep_dir, "tune")
    # Tune snapshots the sweep's state (trials, searcher) at most every 10 s by default, so a driver
    # killed in between forgets the trials it started since, and a resumed sweep starts them afresh.
    # Locally a snapshot costs milliseconds: take one at every controller step. On S3 every two seconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2" if storage.is_remote(sweep_dir) else "0")
    status = "FAILED"
    try:
        where = storage.ray_storage(tuner_path)
        if resume and ray.tune.Tuner.can_restore(where["storage_path"], where.get("storage_filesystem")):
            tuner = ray.tune.Tuner.restore(where["storage_path"], trainable=trainable, resume_unfinished=True,
                                           resume_errored=False, restart_errored=False,
                                           storage_filesystem=where.get("storage_filesystem"))
        else:
            metrics = sweep.metrics
            single = len(metrics) == 1
            sampler_cls = optuna.samplers.TPESampler if sweep.search.sampler == "tpe" else optuna.samplers.RandomSampler
            sampler = (sampler_cls(seed=sweep.search.seed, group=True) if sweep.search.sampler == "tpe"
                       else sampler_cls(seed=sweep.search.seed))
            search = OptunaSearch(space=SearchSpace(sweep, base),
                                  metric=metrics[0].name if single else [m.name for m in metrics],
                                  mode=metrics[0].mode if single else [m.mode for m in metrics], sampler=sampler)
            if sweep.scheduler.kind == "asha":
                grace = sweep.scheduler.grace_period or probe.train.eval_every or probe.train.checkpoint_every
                # max_t lies past the last report: a trial that reaches the end finishes by returning
                # (logging its final map), not by a stop at its last report.
                scheduler = ASHAScheduler(time_attr="step", max_t=probe.train.steps + 1, grace_period=grace,
                                          reduction_factor=sweep.scheduler.reduction_factor)
            else:
                scheduler = FIFOScheduler()
            tune_config = ray.tune.TuneConfig(
                search_alg=search, scheduler=scheduler, num_samples=sweep.search.num_samples,
                max_concurrent_trials=concurrency, reuse_actors=in_process,
                metric=metrics[0].name if single else None, mode=metrics[0].mode if single else None)
            # The result loggers are named so that results load even where auto-loggers are switched off.
            tuner = ray.tune.Tuner(trainable, tune_config=tune_config, run_config=ray.tune.RunConfig(
                name="tune", **storage.ray_storage(sweep_dir), verbose=1,
                callbacks=[JsonLoggerCallback(), CSVLoggerCallback()]))
        grid = tuner.fit()
        status = "FINISHED"
    finally:
        close_stopped_trials(uri, experiment_id, parent)
        tracking.end_run(uri, parent, status)
    summarise(grid, sweep, uri, parent)
    return grid


def close_stopped_trials(uri: str, experiment_id: str, parent: str) -> None:
    """Trials stopped by ASHA (or a killed sweep) never reach their own `finally`: mark them KILLED."""
    from fmm import tracking

    c = tracking.client(uri)
    for run in c.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"):
        c.set_tag(run.info.run_id, "stopped", "by the scheduler or an interrupted sweep")
        c.set_terminated(run.info.run_id, status="KILLED")


def results_table(grid, sweep: SweepConfig) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        row = {"trial_id": metrics.get("trial_id", ""), "status": "ERROR" if result.error else "OK",
               "mlflow_run_id": metrics.get("mlflow_run_id", ""), "step": metrics.get("step", "")}
        row.update({f"param.{k}": v for k, v in (result.config or {}).items()})
        row.update({m.name: metrics.get(m.name, math.nan) for m in sweep.metrics})
        rows.append(row)
    return rows


def best_rows(rows: list[dict[str, Any]], sweep: SweepConfig) -> list[dict[str, Any]]:
    """The best trial (one metric) or the Pareto front (several), among the trials that reported at the
    largest step any reached (an early-stopped trial's score is from a smaller budget)."""
    specs = sweep.metrics
    ok = [r for r in rows if all(isinstance(r.get(m.name), (int, float)) and math.isfinite(r[m.name]) for m in specs)]
    longest = max((r["step"] for r in ok if isinstance(r["step"], int)), default=None)
    if longest is not None:  # trials the scheduler stopped early were scored on a smaller budget
        ok = [r for r in ok if r["step"] == longest]

    def key(r):
        return [r[m.name] if m.mode == "min" else -r[m.name] for m in specs]

    if len(specs) == 1:
        return sorted(ok, key=key)[:1]
    return [r for r in ok if not any(all(a <= b for a, b in zip(key(o), key(r))) and key(o) != key(r) for o in ok)]


def parallel_coordinates(rows: list[dict[str, Any]], sweep: SweepConfig):
    """One line per trial across the searched keys (categoricals by index), coloured by the first metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sweep.metrics[0].name
    keys = list(sweep.space)
    axes_names = keys + [metric]
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


def summarise(grid, sweep: SweepConfig, uri: str, parent: str) -> None:
    """The parent run's results table (CSV), best trial or Pareto front, and parallel-coordinates figure."""
    import matplotlib.pyplot as plt

    from fmm import tracking

    rows = results_table(grid, sweep)
    best = best_rows(rows, sweep)
    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as folder:
        keys = sorted({k for r in rows for k in r})
        path = os.path.join(folder, "results.csv")
        with open(path, "w") as f:
            f.write(",".join(keys) + "\n")
            for r in rows:
                f.write(",".join(str(r.get(k, "")).replace(",", ";") for k in keys) + "\n")
        c.log_artifact(parent, path, "sweep")
        path = os.path.join(folder, "best.json")
        with open(path, "w") as f:
            json.dump(best, f, indent=1, default=str)
        c.log_artifact(parent, path, "sweep")
    fig = parallel_coordinates(rows, sweep)
    c.log_figure(parent, fig, "sweep/parallel_coordinates.png")
    plt.close(fig)
    tags = {"trials": str(len(rows)), "trials_failed": str(sum(r["status"] == "ERROR" for r in rows))}
    if len(best) == 1:
        tags.update({"best_trial_id": str(best[0]["trial_id"]), "best_mlflow_run_id": str(best[0]["mlflow_run_id"])})
        c.log_metric(parent, f"best/{sweep.metrics[0].name}", float(best[0][sweep.metrics[0].name]))
    tracking.set_tags(uri, parent, tags)


__all__ = ["SweepConfig", "load_sweep", "run_sweep"]
