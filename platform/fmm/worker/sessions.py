"""What the training loop needs from the process running it: the `Session` seam.

The loop (fmm.worker.loop) is plain PyTorch; Ray touches it only through a session: its rank and
world size, its device, the latest checkpoint to resume from, and `report` at every checkpoint and
periodic evaluation. Three sessions ship:

- `RayTrainSession`: a Ray Train worker (`fmm train`, distributed or GPU sweep trials); Ray uploads
  each reported checkpoint to the run's storage and restarts failed workers from the latest one.
- `TuneTrialSession`: one CPU worker running inside a Ray Tune trial's own process.
- `LocalSession`: this process, no Ray: checkpoints are copied to `<run_dir>/<name>` as Ray Train
  would, reports are kept in `reports`. The loop's logic (checkpoint, rollback, periodic
  evaluation, resume) runs in-process in seconds with it.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Protocol

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train.v2._internal.execution import context as train_context

from fmm.infra import storage


class Session(Protocol):
    rank: int
    world: int
    device: torch.device
    local_rank: int    # 0 on one worker per node: that worker logs the node's system metrics
    node: str | None   # the node's label in system metrics (`system/<node>/...`) when a run spans nodes

    def latest_checkpoint(self) -> Any | None:
        """The latest checkpoint this run reported (a Ray Checkpoint: `.path` and `.filesystem`), or None."""

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None, name: str) -> None:
        """Called by every worker at the same step: metrics, and rank 0's checkpoint folder to keep as `name`."""


class RayTrainSession:
    """A Ray Train worker: a barrier at every report; only rank 0's metrics and checkpoint count."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.node = f"node{ctx.get_node_rank()}" if self.world > ctx.get_local_world_size() else None
        self.device = ray.train.torch.get_device()
        # Ray Train logs two INFO lines per checkpoint (one under its module's file name); the loop prints
        # its own progress, and warnings stay.
        for name in ("ray.train", train_context.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)

    def latest_checkpoint(self):
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None, name: str) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


class TuneTrialSession:
    """One process, one worker: the loop runs inside a Tune trial and reports to Tune directly."""

    rank, world, local_rank, node = 0, 1, 0, None

    def __init__(self):
        self.device = torch.device("cpu")

    def latest_checkpoint(self):
        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None, name: str) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None
        ray.tune.report(metrics, checkpoint=checkpoint)


class LocalSession:
    """The loop in this process, without Ray: one worker, checkpoints copied to the run's storage folder
    (a local folder or s3://) under the name the loop gives them, every report kept in `reports`."""

    rank, world, local_rank, node = 0, 1, 0, None

    def __init__(self, run_dir: str, device: str | torch.device = "cpu"):
        self.run_dir, self.device = run_dir, torch.device(device)
        self.reports: list[dict[str, Any]] = []

    def latest_checkpoint(self):
        return None  # restore_checkpoint finds the run's step_* folders itself

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None, name: str) -> None:
        self.reports.append(dict(metrics, checkpoint=name if checkpoint_folder else None))
        if checkpoint_folder is None:
            return
        fs, root = storage.filesystem(storage.join(self.run_dir, name))
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(root), exist_ok=True)
            shutil.copytree(checkpoint_folder, root, dirs_exist_ok=True)
        else:
            pafs.copy_files(checkpoint_folder, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
