"""Every run names the code and the person that started it: MLflow's standard source tags and fmm's own,
computed by the process that creates a top-level run and copied into the runs nested under it."""

import getpass
import json
import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from fmm.infra import provenance, tracking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh(monkeypatch):
    for key in ("FMM_GIT_COMMIT", "FMM_GIT_DIRTY", "FMM_USER", "FMM_COMMAND", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    provenance.checkout.cache_clear()
    yield monkeypatch
    provenance.checkout.cache_clear()


def git(*args):
    out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() if out.returncode == 0 else None


def test_a_run_names_its_commit_dirtiness_user_and_command_and_nested_runs_copy_them(tmp_path, fresh):
    fresh.setenv("FMM_COMMAND", "fmm study")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = tracking.ensure_experiment(uri, "provenance")
    parent = tracking.start_run(uri, experiment, "study", {}, {"kind": "study"})
    tags = MlflowClient(uri).get_run(parent).data.tags
    commit = git("rev-parse", "HEAD")
    if commit is None:  # an exported tree without .git
        assert tags["git_commit"] == "unknown" and "mlflow.source.git.commit" not in tags
    else:
        assert tags["git_commit"] == tags["mlflow.source.git.commit"] == commit
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        assert tags["git_dirty"] == str(dirty).lower()
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.name"] == "fmm study"
    assert tags["mlflow.source.type"] == "LOCAL" and "ray_job_submission_id" not in tags

    # A member created elsewhere (a Ray task, another checkout, another user) takes the study's.
    fresh.setenv("FMM_GIT_COMMIT", "0" * 40)
    fresh.setenv("FMM_USER", "someone-else")
    provenance.checkout.cache_clear()
    child = tracking.start_run(uri, experiment, "member", {}, {"study_member": "lmd"}, parent)
    held = MlflowClient(uri).get_run(child).data.tags
    assert {k: held.get(k) for k in provenance.INHERITED} == {k: tags.get(k) for k in provenance.INHERITED}
    assert held["mlflow.parentRunId"] == parent and held["study_member"] == "lmd"


def test_a_submitted_job_passes_the_submitting_checkout_and_is_marked_as_a_job(tmp_path, fresh):
    """Code shipped to a cluster has no .git: the submitter's commit, dirtiness and user come in the job's
    environment, and Ray's job config names the submission."""
    fresh.setenv("FMM_GIT_COMMIT", "a" * 40)
    fresh.setenv("FMM_GIT_DIRTY", "true")
    fresh.setenv("FMM_USER", "alice")
    fresh.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": {
        "job_submission_id": "raysubmit_abc", "job_name": "raysubmit_abc"}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.start_run(uri, tracking.ensure_experiment(uri, "jobs"), "sweep", {}, {})
    tags = MlflowClient(uri).get_run(run).data.tags
    assert (tags["git_commit"], tags["mlflow.source.git.commit"], tags["git_dirty"], tags["mlflow.user"]) == \
        ("a" * 40, "a" * 40, "true", "alice")
    assert (tags["mlflow.source.type"], tags["ray_job_submission_id"]) == ("JOB", "raysubmit_abc")
