"""Flow maps as MLflow models: every run logs its final and best maps as pyfunc models whose `predict`
samples as `fmm sample` does; a registered teacher (models:/NAME@ALIAS) is distilled from, started from
and evaluated, and the student's run names the version; a URI naming nothing is one clear error."""

import os

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from fmm import cli
from fmm.infra import models
from fmm.jobs.evaluate import evaluate
from fmm.jobs.sample import sample
from fmm.jobs.train import open_run
from fmm.worker.loop import run_loop
from fmm.worker.sessions import LocalSession
from fmm.worker.trainer import loop_config
from fmm.checkpoint import save_flow_map
from support.experiments import experiment, trained_looking

NETWORK = {"name": "mlp", "dim": 2, "width": 32, "depth": 2}


def train(tmp_path, name, **changes):
    exp = experiment(tmp_path, name=name, network=NETWORK, train__steps=20, train__checkpoint_every=10,
                     train__log_every=5, train__eval_every=10, train__eval_samples=200, **changes)
    record = open_run(exp)
    config = loop_config(exp, record)
    run_loop(config, LocalSession(config["run_dir"]))
    return record


@pytest.fixture
def teacher(tmp_path):
    """A flow-matching teacher trained in this process and registered as flow-teacher@champion."""
    record = train(tmp_path, "teacher", objective={"name": "flow_matching"}, teacher=None)
    ref = models.register(record.tracking_uri, record.mlflow_run_id, "flow-teacher", "champion")
    return record, ref


def test_a_run_logs_its_maps_as_pyfunc_models_whose_predict_samples_as_fmm_sample_does(tmp_path, teacher):
    record, ref = teacher
    uri, run_id = record.tracking_uri, record.mlflow_run_id
    mlflow.set_tracking_uri(uri)
    try:
        for path in ("model", "best_model"):
            info = mlflow.models.get_model_info(f"runs:/{run_id}/{path}")
            assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 2]
            assert [p.name for p in info.signature.params] == ["steps"]
            assert info.metadata["fmm.format"] == "fmm-flowmap/1" and info.metadata["fmm.sample_shape"] == [2]
        (logged,) = [m for m in MlflowClient(uri).search_logged_models([record.experiment_id])
                     if m.source_run_id == run_id and m.name == "model"]
        assert logged.model_type == "fmm-flow-map" and "READY" in str(logged.status)
        files = {a.path for a in MlflowClient(uri).list_logged_model_artifacts(logged.model_id)}
        assert "MLmodel" in files and "python_model.pkl" not in files  # models from code: nothing pickled
        loaded = mlflow.pyfunc.load_model("models:/flow-teacher@champion")
    finally:
        mlflow.set_tracking_uri(None)
    noise = np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    for steps in (1, 3):
        ours = sample(f"runs:/{run_id}/checkpoints/final.pt", steps, noise_path=str(tmp_path / "noise.npy"),
                      tracking_uri=uri)
        np.testing.assert_array_equal(loaded.predict(noise, params={"steps": steps}), ours)
    assert ref.uri == "models:/flow-teacher/1" and ref.run_id == run_id


def test_a_student_distils_from_and_starts_from_the_registered_teacher_and_names_its_version(tmp_path, teacher,
                                                                                             monkeypatch):
    record, ref = teacher
    student = train(tmp_path, "student", objective={"name": "lmd"}, init="models:/flow-teacher/1",
                    teacher={"kind": "checkpoint", "path": "models:/flow-teacher@champion"})
    tags = MlflowClient(student.tracking_uri).get_run(student.mlflow_run_id).data.tags
    assert tags["teacher.model"] == "flow-teacher/1" and tags["teacher.model_alias"] == "champion"
    assert tags["teacher.model_run_id"] == record.mlflow_run_id and tags["init.model"] == "flow-teacher/1"
    assert "init.model_alias" not in tags  # named by version

    # `fmm evaluate models:/...` logs into the run that logged the model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", record.tracking_uri)
    evaluate("models:/flow-teacher@champion", [1, 2], samples=200, metrics_wanted=["sw2"], with_teacher=False,
             log=lambda *_: None)
    client = MlflowClient(record.tracking_uri)
    assert {a.path for a in client.list_artifacts(record.mlflow_run_id, "evaluation")} >= \
        {"evaluation/evaluation.json", "evaluation/evaluation.csv"}
    assert client.get_run(record.mlflow_run_id).data.tags["eval_samples"] == "200"


def test_a_models_uri_that_names_nothing_fmm_can_read_is_one_clear_error(tmp_path, teacher, capsys, monkeypatch):
    record, _ = teacher
    uri = record.tracking_uri
    with pytest.raises(ValueError, match="no registered model named 'nope'"):
        models.resolve("models:/nope@champion", uri)
    with pytest.raises(ValueError, match="exists but its alias 'gone' is not set"):
        models.resolve("models:/flow-teacher@gone", uri)
    with pytest.raises(ValueError, match="its version 7 does not exist"):
        models.resolve("models:/flow-teacher/7", uri)
    with pytest.raises(ValueError, match="not a registered model's URI"):
        models.resolve("models:/flow-teacher", uri)

    # a model of another flavour: a plain pyfunc, registered under another name
    code = tmp_path / "other.py"
    code.write_text("import mlflow\n\nclass Echo(mlflow.pyfunc.PythonModel):\n"
                    "    def predict(self, context, model_input, params=None):\n        return model_input\n\n"
                    "mlflow.models.set_model(Echo())\n")
    mlflow.pyfunc.save_model(str(tmp_path / "echo"), python_model=str(code), pip_requirements=["mlflow"])
    MlflowClient(uri).log_artifacts(record.mlflow_run_id, str(tmp_path / "echo"), "echo")
    models.register(uri, record.mlflow_run_id, "echo", "live", model="echo")
    with pytest.raises(ValueError, match="flavour\\(s\\) python_function, not an fmm flow map"):
        models.resolve("models:/echo@live", uri)

    # the CLI: one paragraph, exit 2, nothing written
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "x.npy"
    assert cli.main(["sample", "models:/flow-teacher@gone", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "alias 'gone' is not set" in err and len(err.strip().splitlines()) == 1 and not out.exists()

    # a registered flow map of another sample shape than the student's
    wide = str(tmp_path / "wide.pt")
    save_flow_map(wide, trained_looking(dim=3))
    models.log_flow_map_model(uri, record.mlflow_run_id, wide, "wide_model")
    models.register(uri, record.mlflow_run_id, "wide-teacher", "live", model="wide_model")
    with open(tmp_path / "student.yaml", "w") as f:
        yaml.safe_dump({"name": "narrow", "data": {"target": "flower"}, "objective": {"name": "lmd"},
                        "network": NETWORK, "teacher": {"kind": "checkpoint", "path": "models:/wide-teacher@live"},
                        "storage": {"path": str(tmp_path / "runs")}, "tracking": {"uri": uri, "experiment": "tests"}}, f)
    assert cli.main(["train", str(tmp_path / "student.yaml")]) == 2
    err = capsys.readouterr().err
    assert "teacher 'models:/wide-teacher@live'" in err and "shape [3] but the model on [2]" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "runs" / "narrow")


def test_logging_a_map_as_a_model_prints_none_of_mlflow_s_advice(tmp_path, recwarn):
    """MLflow warns at every models-from-code save unless predict's input hint is one it infers nothing
    from, and resets warning filters around that check: a run's log would repeat the advice per model."""
    train(tmp_path, "quiet", objective={"name": "flow_matching"}, teacher=None)
    advice = [str(w.message) for w in recwarn if "type hints" in str(w.message) or "input example" in str(w.message)]
    assert advice == []
