"""`fmm sweep SWEEP.yaml`: Ray Tune with Optuna over any experiment key, each trial a training run.

The file is described in fmm.experiment.sweep_schema.

Each trial applies its sampled values to the base and runs the same training loop as `fmm train`,
reporting the step, the loss and the periodic evaluation to Tune at every evaluation, where ASHA
may stop it (time attribute: the training step). A trial with one CPU worker runs the loop in the
trial's own process; a distributed or GPU trial starts a TorchTrainer with its own workers and
forwards their reports to Tune (Ray 2.60's Train-inside-Tune pattern). MLflow gets one parent run per sweep and
a nested child run per trial, tagged with the Ray trial id; the trial's results carry the child's
run id. `fmm sweep --resume SWEEP.yaml` restores the Tuner and runs only what is missing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

import mlflow
import optuna
import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from fmm.evaluation.figures import close, parallel_coordinates
from fmm.experiment.checks import check_environment
from fmm.experiment.sweep_schema import SweepConfig, holds, trial_experiment, trial_resources
from fmm.infra import storage, tracking
from fmm.infra.records import SWEEP_RECORD, claim, open_record
from fmm.jobs.cluster import check_resources, connect, node_types, started_here
from fmm.jobs.train import open_run
from fmm.worker.loop import run_loop
from fmm.worker.sessions import TuneTrialSession
from fmm.worker.trainer import loop_config, make_trainer


# -- the trial -----------------------------------------------------------------------------------

def finished_report(run, steps: int) -> dict[str, Any]:
    """The last report of a finished trial, rebuilt from its MLflow run: the step, the loss and the
    periodic evaluation's latest values, as the loop reports them."""
    metrics = run.data.metrics
    return {"step": steps, "loss": metrics.get("train/loss", float("nan")), "mlflow_run_id": run.info.run_id,
            **{k: v for k, v in metrics.items() if k.startswith("eval/")}}


def make_sampler(sweep: SweepConfig, concurrency: int) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for the sweep: TPE over grouped (conditional) parameters, with the constant liar
    when trials run side by side (a running trial counts as a bad result, so that parallel suggestions
    spread out instead of piling onto one region), or random search."""
    if sweep.search.sampler != "tpe":
        return optuna.samplers.RandomSampler(seed=sweep.search.seed)
    return optuna.samplers.TPESampler(seed=sweep.search.seed, group=True, multivariate=True,
                                      constant_liar=concurrency > 1)


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: build the trial's experiment, open (or on a restart, find) its nested MLflow
    run, train, and close the run with its status and, on failure, the reason."""
    sweep = SweepConfig(**context["sweep"])
    trial_id = ray.tune.get_context().get_trial_id()
    exp = trial_experiment(sweep, context["base"], config, f"{sweep.name}-{trial_id}", context["tracking_uri"])
    uri, parent = context["tracking_uri"], context["parent_run_id"]
    found = tracking.client(uri).search_runs(
        [context["experiment_id"]], f"tags.ray_trial_id = '{trial_id}' and tags.mlflow.parentRunId = '{parent}'")
    if found and found[0].info.status == "FINISHED":
        # The trial ended after the sweep's last snapshot and before the sweep was killed: Tune restarts it
        # on resume. Report what it ended with instead of training it a second time.
        ray.tune.report(finished_report(found[0], exp.train.steps))
        return
    if found and found[0].data.tags.get("diverged") == "true":
        # Tune retries every errored trial (search.max_failures, for trials lost to the infrastructure);
        # one that diverged would diverge again: fail at once, with the reason it failed for.
        tracking.set_tags(uri, found[0].info.run_id, {"retry_refused": "the trial diverged"})
        raise FloatingPointError(f"not trained again, it diverged: {found[0].data.tags.get('failure_reason', '')}")
    record = open_run(exp, parent_run_id=parent, run_id=found[0].info.run_id if found else None,
                      extra_tags={"ray_trial_id": trial_id, "sweep": sweep.name},
                      extra_params={f"sweep.{k}": str(v) for k, v in config.items()})
    in_process, _ = trial_resources(exp, sweep.trial_mode)
    status = "FAILED"
    try:
        if in_process:
            run_loop(loop_config(exp, record), TuneTrialSession())
        else:
            make_trainer(exp, record, callbacks=[TuneReportCallback()]).fit()
        status = "FINISHED"
    except SystemExit:  # how Tune ends a trial its scheduler stopped
        status = "KILLED"
        try:
            tracking.set_tags(uri, record.mlflow_run_id, {"stopped": "by the scheduler"})
        except mlflow.exceptions.MlflowException:
            pass  # the sweep's driver tagged it first (close_stopped_trials)
        raise
    except BaseException as err:
        reason = f"{type(err).__name__}: {err}"
        tracking.set_tags(uri, record.mlflow_run_id, {"failure_reason": reason[:5000],
                                                      **({"diverged": "true"} if diverged(err) else {})})
        raise
    finally:
        tracking.end_run(uri, record.mlflow_run_id, status)


def diverged(err: BaseException) -> bool:
    """Whether a trial failed because its training diverged (the loop's FloatingPointError after its
    rollbacks, raised in this process or, for a TorchTrainer trial, in a worker), not because a process
    or node went away."""
    return isinstance(err, FloatingPointError) or "FloatingPointError" in str(err)


# -- the driver ----------------------------------------------------------------------------------

class SearchSpace:
    """Optuna's define-by-run space (picklable: Tune saves the searcher with the sweep's state)."""

    def __init__(self, sweep: SweepConfig, base: dict[str, Any]):
        self.space, self.base = sweep.space, base

    def __call__(self, trial) -> None:
        values: dict[str, Any] = {}
        for key, dist in self.space.items():
            if holds(dist.when, values, self.base):
                values[key] = dist.suggest(trial, key)


def run_sweep(sweep: SweepConfig, base: dict[str, Any], *, resume: bool = False, address: str | None = None,
              log=print, parent_run_id: str | None = None):
    """Run (or resume) the sweep; returns the ResultGrid after logging the summary into the sweep's run
    (nested under `parent_run_id`, a study's run, when given)."""
    sweep_dir = storage.join(storage.absolute(sweep.storage.path), sweep.name)
    where = dict(kind="sweep", name=sweep.name, resume=resume, resume_hint="'fmm sweep --resume'")
    claim(sweep_dir, SWEEP_RECORD, **where)
    probe = trial_experiment(sweep, base, {}, f"{sweep.name}-probe")
    check_environment(probe)
    in_process, resources = trial_resources(probe, sweep.trial_mode)
    connect(address)
    concurrency = check_resources(probe, ray.cluster_resources(), sweep.search.max_concurrent_trials, node_types(),
                                  fixed=started_here(), log=log)

    record = open_record(sweep_dir, SWEEP_RECORD, **where, tracking_uri=tracking.resolve_uri(sweep.tracking.uri),
                         experiment=sweep.tracking.experiment,
                         config={"sweep": sweep.model_dump(by_alias=True), "base": base},
                         params=tracking.flatten({"sweep": sweep.model_dump(by_alias=True, exclude={"space"}),
                                                  "base": base}),
                         tags={"sweep": sweep.name, "ray_storage": sweep_dir, "kind": "sweep"},
                         parent_run_id=parent_run_id)
    uri, parent, experiment_id = record.tracking_uri, record.mlflow_run_id, record.experiment_id
    if not resume:
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
            # Errored trials continue from their checkpoints: a trial that diverged fails again at once (run_trial).
            tuner = ray.tune.Tuner.restore(where["storage_path"], trainable=trainable, resume_unfinished=True,
                                           resume_errored=True, restart_errored=False,
                                           storage_filesystem=where.get("storage_filesystem"))
        else:
            metrics = sweep.metrics
            single = len(metrics) == 1
            sampler = make_sampler(sweep, concurrency)
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
                failure_config=ray.tune.FailureConfig(max_failures=sweep.search.max_failures),
                callbacks=[JsonLoggerCallback(), CSVLoggerCallback()]))
        grid = tuner.fit()
        status = "FINISHED"
    finally:
        close_stopped_trials(uri, experiment_id, parent)
        tracking.end_run(uri, parent, status)
    summarise(grid, sweep, uri, parent)
    return grid


def close_stopped_trials(uri: str, experiment_id: str, parent: str) -> None:
    """Trials stopped by ASHA (or a killed sweep) may not reach their own `finally`: mark them KILLED. A
    stopped trial that is closing its run itself at the same moment may write the same tag first (the
    store then refuses the second insert): what counts is that the run ends up closed."""
    c = tracking.client(uri)
    for run in c.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"):
        try:
            c.set_tag(run.info.run_id, "stopped", "by the scheduler or an interrupted sweep")
        except mlflow.exceptions.MlflowException:
            pass  # set by the trial itself meanwhile
        if c.get_run(run.info.run_id).info.status == "RUNNING":
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


def summarise(grid, sweep: SweepConfig, uri: str, parent: str) -> None:
    """The parent run's results table (CSV), best trial or Pareto front, and parallel-coordinates figure."""
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
    close(fig)
    tags = {"trials": str(len(rows)), "trials_failed": str(sum(r["status"] == "ERROR" for r in rows))}
    if len(best) == 1:
        tags.update({"best_trial_id": str(best[0]["trial_id"]), "best_mlflow_run_id": str(best[0]["mlflow_run_id"])})
        c.log_metric(parent, f"best/{sweep.metrics[0].name}", float(best[0][sweep.metrics[0].name]))
    tracking.set_tags(uri, parent, tags)


__all__ = ["best_rows", "results_table", "run_sweep"]
