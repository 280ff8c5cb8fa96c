"""The training state of one run and its checkpoints: write, verify, restore, roll back, export.

A checkpoint is a folder `step_NNNNNNNN` under the run's storage folder holding `state.pt` (model,
EMA, objective, optimiser, schedule, step, rollbacks, resolved config) and `state.sha256`; it counts
only once both are there and agree, so a worker killed mid-write leaves a checkpoint that restore
passes over with a warning. The EMA weights of a checkpoint export to a flow-map file (what teachers
and samplers load).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from fmm.checkpoint import load_payload
from fmm.experiment.schema import ExperimentConfig
from fmm.flowmap import TwoTimeMap
from fmm.infra import storage
from fmm.objectives import Objective

CHECKSUM = "state.sha256"


@dataclass
class State:
    model: TwoTimeMap
    ema: TwoTimeMap
    objective: Objective
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    rollbacks: int = 0   # how often a non-finite step sent the run back to its last checkpoint


def state_payload(state: State, exp: ExperimentConfig, metrics: dict[str, float]) -> dict[str, Any]:
    return {"format": "fmm-train/1", "model": state.model.state_dict(), "ema": state.ema.state_dict(),
            "objective": state.objective.state_dict(), "optimiser": state.optimiser.state_dict(),
            "scheduler": state.scheduler.state_dict(), "step": state.step, "rollbacks": state.rollbacks,
            "config": exp.model_dump(), "network": state.model.net.config, "form": state.model.form,
            "metrics": metrics}


def save_state(state: State, exp: ExperimentConfig, folder: str, metrics: dict[str, float]) -> None:
    """state.pt, then its SHA-256 in state.sha256."""
    path = os.path.join(folder, "state.pt")
    torch.save(state_payload(state, exp, metrics), path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(folder, CHECKSUM), "w") as f:
        f.write(digest + "\n")


class CorruptCheckpoint(ValueError):
    pass


def verify_state(folder: str) -> str:
    """The path of the folder's state.pt if its checksum holds; else CorruptCheckpoint naming the file."""
    path = os.path.join(folder, "state.pt")
    if not os.path.isfile(path):
        raise CorruptCheckpoint(f"{path} is missing")
    try:
        with open(os.path.join(folder, CHECKSUM)) as f:
            expected = f.read().strip()
    except OSError:
        raise CorruptCheckpoint(f"{path} has no {CHECKSUM} (written partly, or not by fmm)") from None
    with open(path, "rb") as f:
        actual = hashlib.sha256(f.read()).hexdigest()
    if actual != expected:
        raise CorruptCheckpoint(f"{path} does not match its checksum (truncated or corrupt)")
    return path


def apply_payload(state: State, payload: dict[str, Any]) -> None:
    state.model.load_state_dict(payload["model"])
    state.ema.load_state_dict(payload["ema"])
    state.objective.load_state_dict(payload["objective"])
    state.optimiser.load_state_dict(payload["optimiser"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.step = payload["step"]
    state.rollbacks = payload.get("rollbacks", 0)


def load_state(state: State, folder: str) -> None:
    apply_payload(state, load_payload(verify_state(folder)))


@contextlib.contextmanager
def _local_folder(fs: pafs.FileSystem, path: str) -> Iterator[str]:
    """A checkpoint folder on storage as a local folder (copied from S3 into a temporary one)."""
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory() as local:
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield local


def restore_checkpoint(state: State, latest, run_dir: str, log=print) -> tuple[str, str | None] | None:
    """Load the newest intact checkpoint of the run: among `latest` (the session's latest checkpoint, with
    `.path` and `.filesystem`, or None) and the run's step_* folders, the newest whose checksum holds.
    A worker can die after its checkpoint is on storage but before Ray's controller has registered it;
    that checkpoint is complete, and the metrics up to it are in MLflow, so it is the one to continue
    from. A corrupt one is passed over with a warning naming the file. Returns where the state came from
    and the warning, if any; None when the run has no checkpoint yet."""
    fs, root = storage.filesystem(run_dir)
    latest_name = os.path.basename(latest.path.rstrip("/")) if latest is not None else None
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if info.type == pafs.FileType.Directory and info.base_name.startswith("step_")}
    if latest_name is not None:
        names.add(latest_name)
    if not names:
        return None
    bad: list[str] = []
    for name in sorted(names, reverse=True):
        # Each worker copies a remote checkpoint into a folder of its own: Ray's Checkpoint.as_directory()
        # shares one temporary folder among the workers of a node, and a second worker's download into it
        # (or the first one's clean-up) can land while another is still reading (seen as torch.load's
        # "file read failed" after the checksum had held).
        opened = (_local_folder(latest.filesystem, latest.path) if name == latest_name
                  else _local_folder(fs, f"{root}/{name}"))
        with opened as folder:
            try:
                load_state(state, folder)
            except CorruptCheckpoint as err:
                bad.append(str(err))
                continue
        warning = None
        if bad:
            warning = f"checkpoint {'; '.join(bad)}; resuming from the previous one, {run_dir}/{name}"
            log(f"[fmm] warning: {warning}")
        return f"{run_dir}/{name}", warning
    raise CorruptCheckpoint(f"no intact checkpoint under {run_dir} ({'; '.join(bad)})")


def export_flow_map(state_path: str, out_path: str) -> None:
    """A training checkpoint's EMA weights as a flow-map file (what teachers and samplers load)."""
    payload = load_payload(state_path)
    torch.save({"format": "fmm-flowmap/1", "network": payload["network"], "model": payload["ema"], "ema": None,
                "form": payload.get("form", "linear"), "config": payload["config"], "step": payload["step"]}, out_path)


def ema_decay_at(decay: float, step: int) -> float:
    """The configured decay, warmed up as (1 + step) / (10 + step) so that the average forgets the
    untrained initial weights early (with a fixed 0.995, 22% of them would remain after 300 steps)."""
    return min(decay, (1 + step) / (10 + step))


def update_ema(ema: TwoTimeMap, model: TwoTimeMap, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)
        for be, b in zip(ema.buffers(), model.buffers()):
            be.copy_(b)


def snapshot(state: State, exp: ExperimentConfig) -> bytes:
    """The training state, serialised in memory (on the CPU, whatever the device)."""
    buffer = io.BytesIO()
    torch.save(state_payload(state, exp, {}), buffer)
    return buffer.getvalue()


def rollback(state: State, saved: bytes, lr_factor: float) -> None:
    """Back to the snapshot `saved`, one rollback more, every learning rate (the schedule's base) times
    `lr_factor`."""
    rollbacks = state.rollbacks + 1
    device = next(state.model.parameters()).device
    apply_payload(state, load_payload(io.BytesIO(saved), device, "the rollback snapshot"))
    scheduler = state.scheduler  # a LambdaLR: lr = base * lambda(step); the snapshot's base has its own rollbacks
    scheduler.base_lrs = [lr * lr_factor ** (rollbacks - state.rollbacks) for lr in scheduler.base_lrs]
    state.rollbacks = rollbacks
    for group, base, factor in zip(state.optimiser.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in state.optimiser.param_groups]
