"""Every experiment, sweep and study file shipped under experiments/ passes the static checks (check_config:
shapes, options, metrics, every probe of a sweep's space), with no data, storage or network at hand."""

import glob
import os

import pytest

from fmm.experiment.checks import check_config
from fmm.experiment.schema import load_experiment
from fmm.experiment.study_schema import load_study, plan_study
from fmm.experiment.sweep_schema import load_sweep
from support.experiments import ROOT


@pytest.fixture(autouse=True)
def bucket(monkeypatch):
    """The cluster files keep data and storage under ${FMM_BUCKET} (set by the cluster's runtime env)."""
    monkeypatch.setenv("FMM_BUCKET", "s3://a-bucket/fmm")


def shipped(kind: str) -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "experiments", kind, "*.yaml")))


def test_every_kind_of_file_is_shipped():
    assert shipped("train") and shipped("sweeps") and shipped("studies") and shipped("papers")


@pytest.mark.parametrize("path", shipped("train"), ids=os.path.basename)
def test_shipped_experiment_passes_check_config(path):
    check_config(load_experiment(path))


@pytest.mark.parametrize("path", shipped("sweeps"), ids=os.path.basename)
def test_shipped_sweep_gives_a_valid_experiment_for_every_probe(path):
    sweep, base = load_sweep(path)
    assert sweep.space and base


@pytest.mark.parametrize("path", shipped("studies") + shipped("papers"), ids=os.path.basename)
def test_shipped_study_plans_every_member(path):
    study = load_study(path)
    plan = plan_study(study, "sqlite:///unused.db")
    assert [m.label for m in plan.methods] == list(study.methods)
