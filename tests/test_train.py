"""`fmm train` on real components: a local Ray cluster with two gloo workers, SQLite MLflow stores read
back through MlflowClient, and moto's S3 server on loopback for storage and data."""

import copy
import json
import os

import boto3
import pytest
import torch
from mlflow.tracking import MlflowClient

from fmm.cli import main
from fmm.experiment.builders import build_interpolant, build_model, build_optimiser
from fmm.experiment.data import prepare
from fmm.jobs.train import open_run, run_training
from fmm.worker.state import State, load_state, save_state
from support.experiments import TRAIN_BASE, experiment

def untrained_loss(exp) -> float:
    from fmm.objectives import make_objective
    from fmm.experiment.builders import build_teacher

    torch.manual_seed(exp.train.seed)
    interp = build_interpolant(exp)
    model = build_model(exp)
    objective = make_objective(dict(exp.objective), interp)
    teacher = build_teacher(exp, interp)
    x1 = teacher.target.sample(4096, torch.Generator().manual_seed(5)).float()
    with torch.no_grad():
        torch.manual_seed(6)
        return float(objective(model, x1, teacher=teacher)[0])


def test_checkpoint_round_trip_restores_model_optimiser_schedule_and_step(tmp_path):
    from fmm.objectives import make_objective

    exp = experiment(tmp_path)

    def fresh() -> State:
        torch.manual_seed(123)
        model = build_model(exp)
        objective = make_objective(dict(exp.objective), build_interpolant(exp))
        optimiser, scheduler = build_optimiser(exp, list(model.parameters()), exp.train.steps)
        return State(model, copy.deepcopy(model), objective, optimiser, scheduler)

    state = fresh()
    for _ in range(7):
        loss = state.model(torch.rand(32), torch.rand(32), torch.randn(32, 2)).pow(2).mean()
        state.optimiser.zero_grad()
        loss.backward()
        state.optimiser.step()
        state.scheduler.step()
        state.step += 1
    save_state(state, exp, str(tmp_path), {})
    other = fresh()
    load_state(other, str(tmp_path))
    assert other.step == 7 and other.scheduler.last_epoch == state.scheduler.last_epoch
    for a, b in zip(state.model.parameters(), other.model.parameters()):
        assert torch.equal(a, b)
    sa, sb = state.optimiser.state_dict(), other.optimiser.state_dict()
    for key in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa["state"][key][name]), torch.as_tensor(sb["state"][key][name]))


@pytest.mark.slow
def test_a_baseline_trains_through_the_same_loop_and_resumes_its_target_network(ray_cluster, tmp_path):
    """Consistency distillation on two workers, one of which SIGKILLs its own process at step 45
    (train.debug.kill_at_step: no exception and no clean-up in it, as the OOM killer leaves a worker): Ray
    Train starts a new worker group, which resumes from the step-40 checkpoint in the same MLflow run, with
    every logged step once; the EMA target network is objective state, broadcast, checkpointed and restored
    with the rest; the periodic evaluation samples it as a consistency model."""
    exp = experiment(tmp_path, name="cd-recovering", objective={"name": "cd", "steps": 10, "target_decay": 0.9},
                     train__debug={"kill_at_step": 45}, train__eval_every=30, train__eval_samples=200,
                     scaling__max_failures=1, scaling__num_workers=2)
    result = run_training(exp, log=lambda *_: None)
    assert result.return_value["step"] == 60  # and the replicas agreed (checked by the loop)
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                              "attributes.run_name = 'cd-recovering'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, continued
    assert runs[0].data.tags["restored_from"].endswith("step_00000040")  # the new group resumed there
    assert runs[0].data.params["train.debug.kill_at_step"] == "45"
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "train/loss")]
    assert sorted(steps) == list(range(10, 61, 10))  # no gap and no step logged twice
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "eval/sw2_steps001")] == [30, 60]


def test_objective_state_round_trips_through_a_checkpoint(tmp_path):
    from fmm.objectives import make_objective
    from fmm.experiment.builders import build_teacher

    exp = experiment(tmp_path, objective={"name": "cd", "target_decay": 0.5})
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_model(exp)
        objective = make_objective(dict(exp.objective), build_interpolant(exp))
        objective.prepare(model, build_teacher(exp, build_interpolant(exp)))
        optimiser, scheduler = build_optimiser(exp, list(model.parameters()), exp.train.steps)
        states.append(State(model, copy.deepcopy(model), objective, optimiser, scheduler))
    with torch.no_grad():
        for p in states[0].model.parameters():
            p.add_(0.5)
    states[0].objective.before_step(states[0].model, 3)
    save_state(states[0], exp, str(tmp_path), {})
    load_state(states[1], str(tmp_path))
    assert int(states[1].objective.target.step) == 3
    for a, b in zip(states[0].objective.target.parameters(), states[1].objective.target.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_two_workers_learn_and_their_mlflow_run_holds_params_metrics_artifacts_and_tags_and_serves_as_teacher(
        ray_cluster, tmp_path):
    exp = experiment(tmp_path, name="tracked", train__eval_every=30, train__eval_samples=300, scaling__num_workers=2)
    result = run_training(exp, log=lambda *_: None)  # the loop checks at its end that the replicas agree
    client = MlflowClient(result.tracking_uri)
    history = client.get_metric_history(result.mlflow_run_id, "train/loss")
    assert [m.step for m in history] == [10, 20, 30, 40, 50, 60]
    assert history[-1].value < 0.5 * untrained_loss(exp)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["objective.name"] == "lmd" and run.data.params["train.steps"] == "60"
    assert run.data.params["network.width"] == "64"
    for key in ("train/loss", "train/lr", "train/samples_per_s", "train/grad_norm"):
        assert key in run.data.metrics
    periodic = client.get_metric_history(run.info.run_id, "eval/sw2_steps001")
    assert [m.step for m in periodic] == [30, 60], [(m.step, m.value) for m in periodic]
    assert periodic[-1].value < 1.0, [(m.step, m.value) for m in periodic]  # the identity map scores 3.6
    tags = run.data.tags
    assert tags["objective"] == "lmd" and tags["schedule"] == "linear" and tags["dataset"] == "flower"
    assert tags["ray_run"] == "tracked" and tags["ray_checkpoint"].endswith("step_00000060") and tags["git_commit"]
    assert tags["checkpoint_latest"] == os.path.join(result.run_dir, "step_00000060")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/final.pt", "checkpoints/best.pt"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step_00000060.png"]
    record = json.load(open(os.path.join(result.run_dir, "fmm_run.json")))
    assert record["mlflow_run_id"] == run.info.run_id  # the Ray run points at the MLflow run and back

    from fmm.interpolants import Interpolant
    from fmm.experiment.teachers import make_teacher

    teacher = make_teacher({"kind": "checkpoint", "path": f"runs:/{run.info.run_id}",
                            "tracking_uri": result.tracking_uri}, Interpolant("linear"))
    assert teacher(torch.full((4,), 0.5), torch.randn(4, 2)).shape == (4, 2)


@pytest.mark.slow
def test_s3_storage_and_parquet_data_checkpoint_and_resume(ray_cluster, tmp_path, s3_server):
    prepare("flower", "s3://fmm/data/flower", shards=4, samples=4000)
    exp = experiment(tmp_path, name="on-s3", data={"path": "s3://fmm/data/flower"}, storage={"path": "s3://fmm/runs"},
                     train__steps=40, scaling__num_workers=2)
    result = run_training(exp, log=lambda *_: None)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="fmm", Prefix="runs/on-s3/")["Contents"]}
    assert "runs/on-s3/fmm_run.json" in keys and "runs/on-s3/step_00000040/state.pt" in keys
    assert result.checkpoint_path.endswith("step_00000040")

    from fmm.experiment.schema import load_experiment as load
    from fmm.infra.records import read_record

    record = read_record("s3://fmm/runs/on-s3")
    resumed = run_training(load(raw=record.config, overrides=["train.steps=60"]), resume=True,
                           log=lambda *_: None)
    assert resumed.return_value["step"] == 60 and resumed.mlflow_run_id == result.mlflow_run_id
    steps = [m.step for m in MlflowClient(resumed.tracking_uri).get_metric_history(resumed.mlflow_run_id, "train/loss")]
    assert steps == [10, 20, 30, 40, 50, 60]


def write_yaml(tmp_path, **changes) -> str:
    import yaml

    raw = copy.deepcopy(TRAIN_BASE)
    raw["storage"] = {"path": str(tmp_path / "runs")}
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}
    raw.update(changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("changes,args,message", [
    ({"optimiser": {"lr": 1}}, [], r"unknown key 'optimiser'"),
    ({}, ["--set", "train.steps=many"], r"'train.steps': Input should be a valid integer"),
    ({}, ["--set", "objective.name=consistency"], r"unknown objective 'consistency'"),
    ({"teacher": {"kind": "checkpoint", "path": "/nowhere/teacher.pt"}}, [], r"no flow-map checkpoint at '/nowhere"),
    ({"storage": {"path": "/proc/fmm-runs"}}, [], r"storage.path '/proc/fmm-runs' cannot be written"),
    ({"data": {"path": "/nowhere/shards"}}, [], r"no prepared dataset at '/nowhere/shards'"),
    ({"network": {"name": "mlp", "dim": 3}}, [], r"samples have shape \[2\] but network 'mlp' takes \[3\]"),
])
def test_bad_input_is_a_clear_error_before_any_worker_starts(tmp_path, monkeypatch, capsys, changes, args, message):
    import re

    monkeypatch.chdir(tmp_path)
    assert main(["train", write_yaml(tmp_path, **changes), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert not (tmp_path / "runs" / "toy").exists()  # nothing half-written


@pytest.mark.slow
def test_refused_s3_credentials_stop_the_run_before_it_starts(tmp_path, monkeypatch, capsys, refusing_s3):
    for key, value in {"AWS_ENDPOINT_URL": refusing_s3, "AWS_ACCESS_KEY_ID": "nobody",
                       "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    assert main(["train", write_yaml(tmp_path, storage={"path": "s3://fmm/runs"})]) == 2
    err = capsys.readouterr().err
    assert "storage.path 's3://fmm/runs' cannot be written" in err
    assert "ACCESS_DENIED" in err or "INVALID_ACCESS_KEY_ID" in err, err
    assert "Traceback" not in err


def test_an_existing_run_name_is_not_overwritten(tmp_path):
    exp = experiment(tmp_path, name="once", train__steps=20)
    open_run(exp)
    with pytest.raises(ValueError, match=r"a run named 'once' already exists .* --resume"):
        run_training(exp, log=lambda *_: None)


@pytest.mark.slow
def test_a_teacher_checkpoint_on_s3_is_fetched(s3_server):
    from fmm.infra import storage
    from fmm.checkpoint import save_flow_map
    from fmm.flowmap import FlowMap
    from fmm.interpolants import Interpolant
    from fmm.nets import make_network
    from fmm.experiment.teachers import make_teacher

    model = FlowMap(make_network("mlp", dim=2, width=16, depth=1))
    torch.nn.init.normal_(model.net.out.weight)
    local = os.path.join(os.environ.get("TMPDIR", "/tmp"), "fmm-teacher-test.pt")
    save_flow_map(local, model)
    storage.write_bytes("s3://fmm/teachers/t.pt", open(local, "rb").read())
    teacher = make_teacher({"kind": "checkpoint", "path": "s3://fmm/teachers/t.pt"}, Interpolant("linear"))
    x, t = torch.randn(8, 2), torch.rand(8)
    torch.testing.assert_close(teacher(t, x), model.velocity(t, x))
    with pytest.raises(ValueError, match="no flow-map checkpoint at 's3://fmm/teachers/missing.pt'"):
        make_teacher({"kind": "checkpoint", "path": "s3://fmm/teachers/missing.pt"}, Interpolant("linear"))
