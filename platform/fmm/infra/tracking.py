"""MLflow tracking: tracking URI, experiments, runs, batched metrics, artifacts, queries (models and the
registry: fmm.infra.models).

The tracking URI comes from the config, else MLFLOW_TRACKING_URI, else a SQLite store in the
working folder (MLflow 3 refuses the old ./mlruns file store). A relative SQLite path is made
absolute once, on the driver, because Ray workers and Tune trials run in other folders; local
artifacts go beside the database (`mlartifacts/`) rather than into the current folder.

Metrics are buffered and written with one `log_batch` call per flush (per-value logging to SQLite
costs about 3 ms a value): `RunLogger` for evaluations, `LiveLogger` for rank 0 of a training run,
which flushes every few seconds in the background so that curves are live.

Experiments are created as model-training experiments (`mlflow.experimentKind`), so the MLflow UI
opens them in its training view rather than its GenAI one; every new run carries the resolved
configuration as `config.yaml`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from fmm.infra import provenance
from fmm.infra.storage import refuse_credentials

PARAM_CHUNK = 100  # MLflow's limit of params per log_batch
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # the UI's training view
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


def ui_link(uri: str, run_id: str) -> str:
    """How to open a run in the MLflow UI, in its model-training view: the UI opens in its GenAI view
    unless the browser chose otherwise or the link says `workflowType=machine_learning`."""
    page = f"#/experiments/{client(uri).get_run(run_id).info.experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/{page}"


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, created as a model-training experiment if it does not exist (and marked as
    one if it exists without a kind). The first request every job makes: a server that refuses fmm's
    credentials is a ValueError that says which variables to set."""
    c = client(uri)
    try:
        found = c.get_experiment_by_name(name)
    except mlflow.exceptions.MlflowException as err:
        # the authentication app answers in plain text: the status is in the message, not the error's code
        refused = re.search(r"error code (401|403)\b", str(err))
        if refused is None:
            raise
        given = "MLFLOW_TRACKING_USERNAME" in os.environ or "MLFLOW_TRACKING_TOKEN" in os.environ
        raise ValueError(
            f"the MLflow tracking server at {uri} refused fmm ({refused.group(1)}: "
            f"{'the credentials given are not accepted' if given else 'no credentials given'}); set "
            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for a user "
            f"the server knows, with permission on experiment {name!r}, in the environment of the command "
            f"(and of the cluster's nodes: see cluster/mlflow.md).") from None
    if found is None:
        try:
            return c.create_experiment(name, artifact_location=_artifact_location(uri), tags={KIND_TAG: KIND})
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            found = c.get_experiment_by_name(name)
    if KIND_TAG not in found.tags:
        c.set_experiment_tag(found.experiment_id, KIND_TAG, KIND)
    return found.experiment_id


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
              parent_run_id: str | None = None, config: dict[str, Any] | None = None) -> str:
    """Create a run (status RUNNING) with its params, tags and `config` (as `config.yaml`); returns the
    run id. A top-level run gets this process's provenance tags (fmm.infra.provenance), a nested one its
    parent's: a study member trained in a Ray task, or a sweep trial, names the checkout and the user
    that started the study."""
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
    if config is not None:
        log_config(uri, run.info.run_id, config)
    return run.info.run_id


def log_config(uri: str, run_id: str, config: dict[str, Any]) -> None:
    """The configuration a run starts from, as the `config.yaml` artifact: `fmm train config.yaml`
    runs it again (a resumed run logs the configuration it continues with)."""
    client(uri).log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")


def log_dataset(uri: str, run_id: str, *, name: str, source: str, digest: str, profile: dict[str, Any],
                context: str = "training") -> None:
    """The data a run trains on as an MLflow dataset input (the run page's "Datasets used"): its name,
    where it is (`source`: a storage URI, or `fmm:target/<name>` for an analytic target), a digest that
    changes with its content, and a profile (rows, shape)."""
    scheme = source.split("://", 1)[0] if "://" in source else ("code" if source.startswith("fmm:") else "local")
    dataset = Dataset(name=name, digest=digest[:36], source_type=scheme, source=yaml.safe_dump({"uri": source}).strip(),
                      profile=yaml.safe_dump(profile).strip())
    client(uri).log_inputs(run_id, [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def download_artifact(uri: str, run_id: str, path: str, dst: str) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst, tracking_uri=uri)


class RunLogger:
    """Buffered metric logging and artifact upload into one existing run (used by rank 0)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.client, self.run_id = uri, client(uri), run_id
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

    def log_image(self, figure, key: str, step: int) -> None:
        """A matplotlib figure as the image `key` at `step` (the run's images, with a step slider)."""
        figure.canvas.draw()
        pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
        self.client.log_image(self.run_id, pixels, key=key, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def system_metrics(uri: str, run_id: str, seconds: float, node: str | None = None, resume: bool = False):
    """MLflow's system metrics (`system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`,
    disk, network, and `system/gpu_*` where NVIDIA's management library finds a GPU) of this machine,
    sampled every `seconds` in a background thread into the run (the run page's "System metrics" tab),
    under `system/<node>/` when a run spans nodes; `resume` continues the step count of an earlier start.
    Returns the started monitor (`.finish()` stops it), or None when `seconds` is 0."""
    if not seconds:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # imports psutil, pynvml

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # two INFO lines a run: noise
    monitor = SystemMetricsMonitor(run_id, sampling_interval=seconds, samples_before_logging=1,
                                   resume_logging=resume, node_id=node, tracking_uri=uri)
    monitor.start()
    return monitor


class LiveLogger(RunLogger):
    """Rank 0's logger during training: live curves, each step once.

    Live: what is logged reaches MLflow within `flush_seconds` (the next log call after that much time
    flushes, by MLflow's asynchronous `log_batch`, so the step does not wait on the store); a checkpoint
    and the end of the run wait until everything is written. Each training-step series (`log_metrics`)
    holds one value per step: a step already in MLflow for a key (logged before a restart from a
    checkpoint, or before a rollback) is not logged again, so a curve neither loses nor repeats a step.
    `log_event` (rollbacks, the quality-versus-steps curve) is not held to that.
    """

    def __init__(self, uri: str, run_id: str, flush_seconds: float):
        super().__init__(uri, run_id)
        self.flush_seconds, self.last_flush = flush_seconds, time.monotonic()
        self.pending: list = []
        held = self.client.get_run(run_id).data.metrics
        self.through = {key: max(m.step for m in self.client.get_metric_history(run_id, key)) for key in held}
        self.flushed = dict(self.through)  # what is in MLflow (or on its way); `through` adds the buffer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.through.get(k, -1)}
        self.through.update((k, step) for k in fresh)
        super().log_metrics(fresh, step)
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush(wait=False)

    def log_event(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics(metrics, step)

    def discard_after(self, step: int) -> None:
        super().discard_after(step)
        self.through = {**self.flushed, **{m.key: max(m.step, self.flushed.get(m.key, -1)) for m in self.buffer}}

    def flush(self, wait: bool = True) -> None:
        for i in range(0, len(self.buffer), 1000):
            self.pending.append(self.client.log_batch(self.run_id, metrics=self.buffer[i:i + 1000], synchronous=False))
        for m in self.buffer:
            self.flushed[m.key] = max(m.step, self.flushed.get(m.key, -1))
        self.buffer, self.last_flush = [], time.monotonic()
        if wait:
            for operation in self.pending:
                operation.wait()
            self.pending = []
