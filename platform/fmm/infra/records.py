"""Run records: the JSON file that ties a storage folder to its MLflow run, written by every driver.

A training run keeps `<storage>/<name>/fmm_run.json`, a sweep `fmm_sweep.json`, a study
`fmm_study.json`. Each holds the MLflow run (the run itself, or the parent of a sweep's trials and a
study's members), the tracking URI it lives at and the configuration it started from, so that
`--resume` continues in the same MLflow run with the same settings; a study also keeps what it has
trained and scored so far (`state`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fmm.infra import storage, tracking

RUN_RECORD = "fmm_run.json"
SWEEP_RECORD = "fmm_sweep.json"
STUDY_RECORD = "fmm_study.json"


@dataclass
class RunRecord:
    name: str
    tracking_uri: str
    mlflow_run_id: str
    experiment_id: str
    config: dict[str, Any]                                # what the run was started from, as validated
    state: dict[str, Any] = field(default_factory=dict)  # what a driver keeps between resumes
    path: str = field(default="", compare=False)          # where the record lives (not written)

    def save(self) -> None:
        document = {k: v for k, v in asdict(self).items() if k != "path"}
        storage.write_bytes(self.path, json.dumps(document, indent=1).encode())


def read_record(folder: str, filename: str = RUN_RECORD, missing: str | None = None) -> RunRecord:
    """The record in `folder`; `missing` is the error when there is none."""
    path = storage.join(folder, filename)
    document = storage.read_json(path, missing or f"no fmm run at {folder!r} (missing {filename}): give the run's "
                                                  f"folder or URI, <storage.path>/<name>.")
    return RunRecord(**document, path=path)


def claim(folder: str, filename: str, *, kind: str, name: str, resume: bool, resume_hint: str,
          run_id: str | None = None) -> bool:
    """Whether a record exists in `folder`, refusing a name already taken (unless `resume`, or the caller
    reopens its own `run_id`) and a resume with nothing to resume; then checks that `folder` is writable."""
    found = storage.exists(storage.join(folder, filename))
    if found and not resume and run_id is None:
        raise ValueError(f"a {kind} named {name!r} already exists at {folder}: continue it with {resume_hint} or "
                         f"choose another name.")
    if resume and not found:
        raise ValueError(f"no {kind} to resume at {folder} (missing {filename}).")
    storage.check_writable(folder, "storage.path")
    return found


def open_record(folder: str, filename: str, *, kind: str, name: str, resume: bool, resume_hint: str,
                tracking_uri: str, experiment: str, config: dict[str, Any], params: dict[str, str],
                tags: dict[str, str], parent_run_id: str | None = None, run_id: str | None = None) -> RunRecord:
    """Claim `folder` for a new run, or reopen the one recorded there.

    New: a name already taken is refused (`resume_hint` says how to continue it; see `claim`), and a
    RUNNING MLflow run is created (nested under `parent_run_id`, with `config` as `config.yaml`) unless
    the caller already has one (`run_id`, a restarted sweep trial). Resume: the recorded run is set
    RUNNING again and tagged `resumed_at`, and the record and `config.yaml` take `config`. Either way
    the record is written before the caller starts any work."""
    path = storage.join(folder, filename)
    claim(folder, filename, kind=kind, name=name, resume=resume, resume_hint=resume_hint, run_id=run_id)
    if resume:
        record = read_record(folder, filename)
        tracking.client(record.tracking_uri).update_run(record.mlflow_run_id, status="RUNNING")
        tracking.set_tags(record.tracking_uri, record.mlflow_run_id, {"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        record.config = config  # what this start runs with (a resumed run may be given more steps)
        record.save()
        tracking.log_config(record.tracking_uri, record.mlflow_run_id, config)
        return record
    experiment_id = tracking.ensure_experiment(tracking_uri, experiment)
    if run_id is None:
        run_id = tracking.start_run(tracking_uri, experiment_id, name, params, tags, parent_run_id, config)
    record = RunRecord(name, tracking_uri, run_id, experiment_id, config, path=path)
    record.save()
    return record
