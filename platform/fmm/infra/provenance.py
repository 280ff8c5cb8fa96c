"""Where a run's code came from and who started it: the tags every top-level MLflow run gets, and that
its nested runs (sweep trials, study members and seeds) copy from their parent.

- `git_commit` and `mlflow.source.git.commit`: the commit of the checkout that started the run,
  `git_dirty`: whether tracked files differed from it (`true`, `false`, or `unknown` outside a checkout);
- `mlflow.user`, `mlflow.source.name` (the fmm command) and `mlflow.source.type` (`JOB` under
  `ray job submit`, with `ray_job_submission_id`; `LOCAL` otherwise), which the MLflow UI shows;
- `fmm_version`: the version of the fmm package that ran (the shipped copy under `ray job submit`).

Code shipped to a cluster carries no `.git`: the submitting machine passes its own values in the
job's metadata (`ray job submit --metadata-json '{"fmm_git_commit": ..., "fmm_git_dirty": ...,
"fmm_user": ...}'`, as the README's command does), or the environment does (`FMM_GIT_COMMIT`,
`FMM_GIT_DIRTY`, `FMM_USER`: a job's, or the image's build argument); the metadata first.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import subprocess
import sys

from fmm import __version__

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INHERITED = ("git_commit", "git_dirty", "mlflow.source.git.commit", "mlflow.user", "mlflow.source.name",
             "mlflow.source.type", "ray_job_submission_id", "fmm_version")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=PACKAGE_DIR)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def checkout() -> tuple[str, str]:
    """(commit, dirty) of the checkout fmm is imported from, or the submitter's (environment, job metadata)."""
    commit = _given("git_commit") or _git("rev-parse", "HEAD") or "unknown"
    dirty = _given("git_dirty")
    if dirty is None:
        status = _git("status", "--porcelain", "--untracked-files=no") if commit != "unknown" else None
        dirty = "unknown" if status is None else str(bool(status)).lower()
    return commit, dirty


def _given(key: str) -> str | None:
    """A provenance value the submitter gave: fmm_<key> in the metadata of the `ray job submit` this
    process belongs to, else FMM_<KEY> in the environment (a job's, or the image's build argument)."""
    value = _job_metadata().get(f"fmm_{key}") or os.environ.get(f"FMM_{key.upper()}")
    return None if value in (None, "", "unknown") else value


def _user() -> str:
    try:
        return _given("user") or getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown"


def _job_metadata() -> dict[str, str]:
    """The metadata of the `ray job submit` this process is the entrypoint (or a worker) of, if any."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return {}
    return config.get("metadata") or {}


def run_tags() -> dict[str, str]:
    """The provenance tags of a run started by this process."""
    commit, dirty = checkout()
    command = os.environ.get("FMM_COMMAND") or os.path.basename(sys.argv[0] or "python")
    tags = {"git_commit": commit, "git_dirty": dirty, "mlflow.user": _user(), "mlflow.source.name": command,
            "mlflow.source.type": "LOCAL", "fmm_version": __version__}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    submission = _job_metadata().get("job_submission_id")
    if submission:
        tags.update({"mlflow.source.type": "JOB", "ray_job_submission_id": submission})
    return tags
