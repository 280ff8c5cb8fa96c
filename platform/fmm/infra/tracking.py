"""The one module that talks to MLflow: tracking URI, experiments, runs, batched metrics, artifacts, queries.

The tracking URI comes from the config, else MLFLOW_TRACKING_URI, else a SQLite store in the
working folder (MLflow 3 refuses the old ./mlruns file store). A relative SQLite path is made
absolute once, on the driver, because Ray workers and Tune trials run in other folders; local
artifacts go beside the database (`mlartifacts/`) rather than into the current folder.

Rank 0 of a training run logs through `RunLogger`, which buffers metrics and writes them with one
`log_batch` call per flush: per-value logging to SQLite costs about 3 ms a value.
"""

from __future__ import annotations

import os
import time
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from fmm.infra import provenance
from fmm.infra.storage import refuse_credentials

PARAM_CHUNK = 100  # MLflow's limit of params per log_batch
# One checkpoint download per teacher, sampler or evaluation: a progress bar for each is noise in the logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def resolve_uri(uri: str | None = None) -> str:
    source = "tracking.uri" if uri else "MLFLOW_TRACKING_URI"
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    refuse_credentials(uri, source)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


def _artifact_location(uri: str) -> str | None:
    """Local artifacts beside a SQLite database; a tracking server chooses its own."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return None


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    c = client(uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_artifact_location(uri))
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        return c.get_experiment_by_name(name).experiment_id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


def start_run(uri: str, experiment_id: str, run_name: str, params: dict[str, str], tags: dict[str, str],
              parent_run_id: str | None = None) -> str:
    """Create a run (status RUNNING) with its params and tags; returns the run id. A top-level run gets
    this process's provenance tags (fmm.infra.provenance), a nested one its parent's: a study member
    trained in a Ray task, or a sweep trial, names the checkout and the user that started the study."""
    c = client(uri)
    if parent_run_id:
        held = c.get_run(parent_run_id).data.tags
        tags = {**{k: held[k] for k in provenance.INHERITED if k in held}, **tags, "mlflow.parentRunId": parent_run_id}
    else:
        tags = {**provenance.run_tags(), **tags}
    run = c.create_run(experiment_id, run_name=run_name, tags=tags)
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), PARAM_CHUNK):
        c.log_batch(run.info.run_id, params=items[i:i + PARAM_CHUNK])
    return run.info.run_id


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def download_artifact(uri: str, run_id: str, path: str, dst: str) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst, tracking_uri=uri)


class RunLogger:
    """Buffered metric logging and artifact upload into one existing run (used by rank 0)."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = client(uri), run_id
        self.buffer: list[Metric] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def discard_after(self, step: int) -> None:
        """Forget the buffered metrics of steps after `step` (a rollback will log them again)."""
        self.buffer = [m for m in self.buffer if m.step <= step]

    def flush(self) -> None:
        for i in range(0, len(self.buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self.buffer[i:i + 1000])
        self.buffer = []

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
