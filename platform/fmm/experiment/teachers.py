"""Velocity teachers for distillation, and trained checkpoints fetched from wherever they live.

A teacher is the exact velocity of a toy target or a trained checkpoint's diagonal; either way a
plain field b(t, x) with `sample_shape` (checked against the student before training) and `t_max`
(the last time it may be evaluated; None when it is smooth on [0, 1]). Checkpoints are local files,
s3:// URIs, runs:/<mlflow run id>[/artifact path] or registered models (models:/NAME@ALIAS,
models:/NAME/VERSION), fetched once per process.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from typing import Literal


from fmm.checkpoint import load_flow_map, read_flow_map
from fmm.config import StrictModel, validate
from fmm.experiment.schema import ExperimentConfig, InterpolantConfig
from fmm.flowmap import FlowMap, ModelVelocity, VelocityField
from fmm.groundtruth import ExactVelocity, make_target
from fmm.infra import models, storage, tracking
from fmm.infra.records import RUN_RECORD, RunRecord, read_record
from fmm.interpolants import Interpolant, VelocityOnPath, make_schedule


class TeacherConfig(StrictModel):
    kind: Literal["exact", "checkpoint"]
    target: str | None = None
    target_options: dict = {}        # the target's options; by default the data's, when it is the data's target
    path: str | None = None          # a local file, an s3:// URI, runs:/<mlflow run id>[/artifact path] or models:/...
    use_ema: bool = True
    tracking_uri: str | None = None  # for runs:/ and models:/ paths; default as for training


@functools.lru_cache(maxsize=1)
def _fetched() -> str:
    """One folder per process for downloaded checkpoints, removed when the process ends."""
    folder = tempfile.mkdtemp(prefix=f"fmm-fetched-{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def fetch_checkpoint(path: str, tracking_uri: str | None = None) -> str:
    """A local file holding the checkpoint at `path` (downloaded from S3 or MLflow if needed)."""
    if path.startswith("models:/"):
        uri = tracking.resolve_uri(tracking_uri)
        return models.download_checkpoint(models.resolve(path, uri), uri, tempfile.mkdtemp(dir=_fetched()))
    if path.startswith("runs:/"):
        run_id, _, artifact = path[len("runs:/"):].partition("/")
        uri = tracking.resolve_uri(tracking_uri)
        try:
            return tracking.download_artifact(uri, run_id, artifact or "checkpoints/final.pt",
                                              tempfile.mkdtemp(dir=_fetched()))
        except Exception as err:
            raise ValueError(f"teacher {path!r}: cannot fetch it from MLflow at {uri}: "
                             f"{str(err).splitlines()[0]}") from None
    if storage.is_remote(path):
        try:
            data = storage.read_bytes(path)
        except Exception as err:
            raise ValueError(f"no flow-map checkpoint at {path!r}: {str(err).splitlines()[0]}") from None
        local = os.path.join(tempfile.mkdtemp(dir=_fetched()), os.path.basename(path))
        with open(local, "wb") as f:
            f.write(data)
        return local
    return path


def make_teacher(spec: dict | TeacherConfig, interpolant: Interpolant) -> VelocityField:
    cfg = validate(TeacherConfig, spec, "teacher")
    if cfg.kind == "exact":
        if cfg.target is None:
            raise ValueError("teacher: kind 'exact' needs 'target' (one of the toy targets, e.g. 'flower').")
        return ExactVelocity(make_target(cfg.target, cfg.target_options), interpolant)
    if cfg.path is None:
        raise ValueError("teacher: kind 'checkpoint' needs 'path' (a flow-map checkpoint file).")
    model, config = read_flow_map(fetch_checkpoint(cfg.path, cfg.tracking_uri), use_ema=cfg.use_ema)
    return on_path(ModelVelocity(model), (config or {}).get("interpolant"), interpolant, cfg.path)


def on_path(velocity: ModelVelocity, trained_on: dict | None, interpolant: Interpolant,
            where: str) -> VelocityField:
    """A checkpoint's velocity on the experiment's interpolant: as is when it was trained on the same one
    (or its file does not say), else moved to it (fmm.interpolants.VelocityOnPath)."""
    if trained_on is None:
        return velocity
    spec = InterpolantConfig(**trained_on)
    source = Interpolant(make_schedule(spec.schedule, **spec.params), spec.sigma0, spec.latent_noise)
    if repr(source) == repr(interpolant):
        return velocity
    try:
        return VelocityOnPath(velocity, source, interpolant)
    except ValueError as err:
        raise ValueError(f"teacher {where!r} was trained on {source!r} and this experiment runs on {interpolant!r}; "
                         f"{err} Train on the teacher's interpolant, or give a teacher trained on this one.") from None


def load_trained(source: str, tracking_uri: str | None = None) -> tuple[FlowMap, ExperimentConfig | None, RunRecord | None]:
    """(flow map with EMA weights, its experiment or None, its run record or None) for a run folder or URI,
    a flow-map file, runs:/<id> or models:/NAME@ALIAS|VERSION (on `tracking_uri`, by default as for
    training; a registered model's record is that of the run that logged it)."""
    if not source.startswith(storage.MLFLOW_SCHEMES) and storage.exists(storage.join(source, RUN_RECORD)):
        record = read_record(source)
        path = fetch_checkpoint(f"runs:/{record.mlflow_run_id}/checkpoints/final.pt", record.tracking_uri)
        return load_flow_map(path), ExperimentConfig(**record.config), record
    model, config = read_flow_map(fetch_checkpoint(source, tracking_uri))
    exp = ExperimentConfig(**config) if config else None
    if source.startswith(storage.MLFLOW_SCHEMES):  # the run it names (or that logged the model) is the one to log into
        uri = tracking.resolve_uri(tracking_uri)
        run_id = (models.resolve(source, uri).run_id if source.startswith("models:/")
                  else source[len("runs:/"):].partition("/")[0])
        run = tracking.client(uri).get_run(run_id)
        return model, exp, RunRecord(run.info.run_name, uri, run.info.run_id, run.info.experiment_id, config or {})
    return model, exp, None
