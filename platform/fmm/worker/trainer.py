"""The Ray Train side of a run: the TorchTrainer whose workers run the loop, and what they are given."""

from __future__ import annotations

from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train import ScalingConfig as RayScaling
from ray.train.torch import TorchTrainer

from fmm.experiment.schema import ExperimentConfig
from fmm.infra import storage
from fmm.infra.records import RunRecord
from fmm.worker.loop import run_loop
from fmm.worker.sessions import RayTrainSession


def loop_config(exp: ExperimentConfig, record: RunRecord) -> dict[str, Any]:
    """What a worker needs: the experiment, its MLflow run and its storage folder (plain data, pickled to Ray)."""
    return {"experiment": exp.model_dump(), "mlflow_run_id": record.mlflow_run_id,
            "tracking_uri": record.tracking_uri, "run_dir": storage.join(exp.storage.path, exp.name)}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    return run_loop(config, RayTrainSession())


def make_trainer(exp: ExperimentConfig, record: RunRecord, callbacks=None) -> TorchTrainer:
    """The TorchTrainer of one run: its workers, storage at <storage>/<name> (a stable name, so a restart
    resumes), worker-level retries and the number of checkpoints kept."""
    scaling = exp.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(exp, record),
        # A fixed group waits for lost resources to come back; an elastic one (min_workers) goes on with
        # the workers that fit, from the last checkpoint, and grows again when nodes return.
        scaling_config=RayScaling(num_workers=(scaling.min_workers, scaling.num_workers)
                                  if scaling.min_workers and scaling.min_workers < scaling.num_workers
                                  else scaling.num_workers,
                                  use_gpu=scaling.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=exp.name, **storage.ray_storage(exp.storage.path),
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=exp.train.keep_checkpoints),
                             callbacks=callbacks),
    )
