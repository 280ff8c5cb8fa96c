"""`fmm train`: one experiment as a Ray Train TorchTrainer job, tracked in MLflow.

The driver checks everything that can fail before workers start (check_config, then the data, the
teacher and the storage), opens or reopens the run's record and MLflow run, starts or joins Ray
and fits the TorchTrainer (fmm.worker.trainer). The Ray run name and the MLflow run id point at each
other (the run's tag `ray_run` and the record's `mlflow_run_id`), so a restarted or resumed run logs
into the same MLflow run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from fmm.experiment.builders import map_form, resolve_init
from fmm.experiment.checks import check_config, check_environment
from fmm.experiment.data import content_key, read_manifest
from fmm.experiment.schema import ExperimentConfig
from fmm.infra import models, storage, tracking
from fmm.infra.records import RUN_RECORD, RunRecord, open_record
from fmm.jobs.cluster import connect
from fmm.worker.trainer import make_trainer


@dataclass
class TrainResult:
    name: str
    run_dir: str
    mlflow_run_id: str
    tracking_uri: str
    return_value: dict[str, Any] | None
    checkpoint_path: str | None


def run_params(exp: ExperimentConfig) -> dict[str, str]:
    """The experiment as MLflow params, with what the student starts from (`init`) and the form of its
    flow map (`map_form`: linear, or trig for sCM's TrigFlow) resolved; the fault-injection section only
    when it is set."""
    config = exp.model_dump()
    if config["train"]["debug"] is None:
        del config["train"]["debug"]
    config["init"] = resolve_init(exp)
    config["map_form"] = map_form(exp)
    return tracking.flatten(config)


def open_run(exp: ExperimentConfig, *, resume: bool = False, parent_run_id: str | None = None,
             extra_tags: dict[str, str] | None = None, extra_params: dict[str, str] | None = None,
             run_id: str | None = None) -> RunRecord:
    """The run's record at <storage>/<name>/fmm_run.json: a new MLflow run (nested under `parent_run_id`
    for a sweep trial or a study member), or the recorded one on `resume`, or `run_id` when the caller
    already has one (a restarted sweep trial)."""
    run_dir = storage.join(exp.storage.path, exp.name)
    tags = {"objective": exp.objective["name"], "schedule": exp.interpolant.schedule,
            "dataset": exp.data.target or exp.data.path, "network": exp.network["name"],
            "ray_run": exp.name, "ray_storage": run_dir, **(extra_tags or {})}
    record = open_record(run_dir, RUN_RECORD, kind="run", name=exp.name, resume=resume,
                         resume_hint=f"'fmm train --resume {run_dir}'", tracking_uri=tracking.resolve_uri(exp.tracking.uri),
                         experiment=exp.tracking.experiment, config=exp.model_dump(),
                         params={**run_params(exp), **(extra_params or {})}, tags=tags, parent_run_id=parent_run_id,
                         run_id=run_id)
    if not resume and run_id is None:
        tracking.log_dataset(record.tracking_uri, record.mlflow_run_id, **dataset_input(exp))
    registered = registered_models(exp)
    if registered:
        tracking.set_tags(record.tracking_uri, record.mlflow_run_id, registered)
    return record


def registered_models(exp: ExperimentConfig) -> dict[str, str]:
    """Tags naming the registered model versions a run starts from: `teacher.model` (name/version, and
    the alias that pointed at it when the run started) and `init.model`."""
    tags = {}
    teacher = exp.teacher or {}
    for key, path, uri in (("teacher", teacher.get("path"), teacher.get("tracking_uri") or exp.tracking.uri),
                           ("init", exp.init, exp.tracking.uri)):
        if isinstance(path, str) and path.startswith("models:/"):
            ref = models.resolve(path, tracking.resolve_uri(uri))
            tags.update({f"{key}.model": f"{ref.name}/{ref.version}", f"{key}.model_run_id": ref.run_id,
                         **({f"{key}.model_alias": ref.alias} if ref.alias else {})})
    return tags


def dataset_input(exp: ExperimentConfig) -> dict[str, Any]:
    """What the run trains on, as MLflow's dataset input: a prepared dataset by its manifest (name, URI,
    the manifest's sha256, rows and shape), an analytic target by name (sampled exactly: no file)."""
    if exp.data.path is not None:
        manifest = read_manifest(exp.data.path)
        return dict(name=manifest.get("dataset") or exp.data.path.rstrip("/").rsplit("/", 1)[-1],
                    source=exp.data.path, digest=content_key(exp.data.path),
                    profile={"rows": manifest["rows"], "shape": manifest["shape"], "encoding": manifest["encoding"]})
    return dict(name=exp.data.target, source=f"fmm:target/{exp.data.target}",
                digest=hashlib.sha256(f"target/{exp.data.target}".encode()).hexdigest()[:16],
                profile={"rows": "unbounded (sampled exactly)"})


def run_training(exp: ExperimentConfig, *, address: str | None = None, resume: bool = False,
                 log=print, parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> TrainResult:
    """Check, record, track and fit. `resume` continues the run of the same name and storage; a new run
    is nested under `parent_run_id` (a study's run) when given."""
    check_config(exp)
    check_environment(exp)
    record = open_run(exp, resume=resume, parent_run_id=parent_run_id, extra_tags=extra_tags)
    uri, run_id, run_dir = record.tracking_uri, record.mlflow_run_id, storage.join(exp.storage.path, exp.name)
    log(f"[fmm] run {exp.name}: storage {run_dir}, MLflow run {run_id} at {uri}")

    status = "FAILED"
    try:
        connect(address)
        result = make_trainer(exp, record).fit()
        status = "FINISHED"
    except BaseException as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        tracking.set_tags(uri, run_id, {"failure_reason": reason[:5000]})
        raise
    finally:
        tracking.end_run(uri, run_id, status)
    checkpoint = storage.uri_of(exp.storage.path, result.checkpoint.path) if result.checkpoint is not None else None
    if checkpoint:
        tracking.set_tags(uri, run_id, {"ray_checkpoint": checkpoint})
    return TrainResult(exp.name, run_dir, run_id, uri, result.return_value, checkpoint)
