"""The training loop's logic in this process, through LocalSession (no Ray): checkpoints on the run's
storage, periodic evaluation, rollback after a non-finite step, resume from the newest intact checkpoint,
and a clear failure when a run keeps diverging. Each run is a few dozen steps of a small MLP against a
real SQLite MLflow store."""

import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from fmm.jobs.train import open_run
from fmm.worker.loop import run_loop
from fmm.worker.sessions import LocalSession
from fmm.worker.state import verify_state
from fmm.worker.trainer import loop_config
from support.experiments import experiment

SMALL = dict(network={"name": "mlp", "dim": 2, "width": 32, "depth": 2}, train__batch_size=64, train__steps=40,
             train__checkpoint_every=10, train__log_every=5)


def run(tmp_path, resume=False, **changes):
    """Open (or reopen) the run's record and MLflow run, then train it in this process."""
    exp = experiment(tmp_path, **{**SMALL, **changes})
    record = open_run(exp, resume=resume)
    config = loop_config(exp, record)
    session = LocalSession(config["run_dir"])
    result = run_loop(config, session)
    return exp, record, session, result


def history(record, key):
    return [(m.step, m.value) for m in MlflowClient(record.tracking_uri).get_metric_history(record.mlflow_run_id, key)]


def test_a_local_run_checkpoints_on_storage_reports_and_logs_every_interval(tmp_path, capsys):
    exp, record, session, result = run(tmp_path, train__eval_every=20, train__eval_samples=200)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[fmm] step")]
    assert [line[:len("[fmm] step      5/40 ( 12%)")] for line in lines] == \
        [f"[fmm] step {k:6d}/40 ({100 * k // 40:3d}%)" for k in range(5, 41, 5)]
    assert lines[-1].endswith("ETA 00:00:00") and all(" ETA " in line for line in lines)
    run_dir = os.path.join(exp.storage.path, exp.name)
    assert result["step"] == 40
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("step_")) == [f"step_{k:08d}" for k in (10, 20, 30, 40)]
    for k in (10, 20, 30, 40):
        verify_state(os.path.join(run_dir, f"step_{k:08d}"))  # every checkpoint intact, with its checksum
    assert [r["step"] for r in session.reports] == [10, 20, 30, 40]
    assert "eval/sw2_steps001" in session.reports[1] and "eval/sw2_steps001" not in session.reports[0]
    assert [s for s, _ in history(record, "train/loss")] == list(range(5, 41, 5))
    assert [s for s, _ in history(record, "eval/sw2_steps001")] == [20, 40]
    assert [s for s, _ in history(record, "sw2_vs_steps")] == [1, 2, 4]  # the quality-versus-steps curve
    artifacts = {a.path for a in MlflowClient(record.tracking_uri).list_artifacts(record.mlflow_run_id, "checkpoints")}
    assert artifacts == {"checkpoints/final.pt", "checkpoints/best.pt"}


def test_a_resumed_run_continues_from_its_newest_checkpoint_in_the_same_mlflow_run(tmp_path):
    _, first, _, _ = run(tmp_path, train__steps=20)
    _, again, _, result = run(tmp_path, resume=True, train__steps=40)
    assert again.mlflow_run_id == first.mlflow_run_id and result["step"] == 40
    steps = [s for s, _ in history(again, "train/loss")]
    assert steps == list(range(5, 41, 5))  # 5..20 from the first start, 25..40 after the resume, none twice
    tags = MlflowClient(again.tracking_uri).get_run(again.mlflow_run_id).data.tags
    assert tags["restored_from"].endswith("step_00000020") and "resumed_at" in tags


def test_a_corrupt_newest_checkpoint_is_passed_over_for_the_one_before(tmp_path):
    exp, first, _, _ = run(tmp_path, train__steps=20)
    newest = os.path.join(exp.storage.path, exp.name, "step_00000020", "state.pt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    _, again, _, result = run(tmp_path, resume=True, train__steps=30)
    tags = MlflowClient(again.tracking_uri).get_run(again.mlflow_run_id).data.tags
    assert result["step"] == 30 and tags["restored_from"].endswith("step_00000010")
    assert "step_00000020" in tags["corrupt_checkpoint"] and "checksum" in tags["corrupt_checkpoint"]


def test_an_injected_failure_is_raised_once_and_not_again_after_the_restart(tmp_path):
    with pytest.raises(RuntimeError, match=r"injected failure at step 15 \(train.debug.fail_at_step\)"):
        run(tmp_path, train__steps=20, train__debug={"fail_at_step": 15})
    _, record, _, result = run(tmp_path, resume=True, train__steps=20, train__debug={"fail_at_step": 15})
    assert result["step"] == 20  # restored from step 10, past step 15 without failing again
    assert [s for s, _ in history(record, "train/loss")] == [5, 10, 15, 20]


def test_a_non_finite_step_rolls_back_to_the_last_checkpoint_with_a_lower_learning_rate(tmp_path):
    _, record, _, result = run(tmp_path, train__debug={"nan_at_step": 15}, optim={"lr": 4e-3})
    assert result["step"] == 40
    assert history(record, "train/rollbacks") == [(10, 1.0)]
    lrs = dict(history(record, "train/lr"))
    assert lrs[10] == pytest.approx(2e-3) and lrs[40] == pytest.approx(2e-3)  # halved from the rollback on
    steps = [s for s, _ in history(record, "train/loss")]
    assert steps == sorted(set(steps)) == list(range(5, 41, 5))  # steps 11..15 are logged once, after the rollback


def test_a_run_that_keeps_diverging_fails_with_the_reason(tmp_path):
    with pytest.raises(FloatingPointError, match="after 2 rollback"):
        run(tmp_path, optim={"lr": 1e30, "grad_clip": None}, train__max_rollbacks=2)


def test_the_loop_is_a_function_of_its_config(tmp_path):
    """Two runs of the same config from scratch end at the same weights (seeded data and noise)."""
    _, a, _, _ = run(tmp_path / "a")
    _, b, _, _ = run(tmp_path / "b")
    weights = [torch.load(os.path.join(tmp_path / x, "runs", "toy", "step_00000040", "state.pt"),
                          weights_only=True)["model"] for x in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_periodic_evaluation_over_several_sets_is_their_mean_and_set_zero_is_the_one_set_evaluation(tmp_path):
    """train.eval_sets: M: the metric a sweep optimises is the mean over M evaluation sets; the first set
    is the one-set evaluation's noise and reference, so eval_sets: 1 scores what it always did."""
    from fmm.experiment.builders import build_interpolant, build_model
    from fmm.worker.loop import PeriodicEvaluation

    one = experiment(tmp_path, train__eval_samples=300, train__eval_steps=[1, 2])
    three = experiment(tmp_path, train__eval_samples=300, train__eval_steps=[1, 2], train__eval_sets=3)
    torch.manual_seed(0)
    model = build_model(one)
    single = PeriodicEvaluation(one, build_interpolant(one), (2,), "cpu")
    several = PeriodicEvaluation(three, build_interpolant(three), (2,), "cpu")
    assert torch.equal(single.noise[0], several.noise[0])
    assert torch.equal(single.scorers[0].reference, several.scorers[0].reference)
    assert len(several.noise) == 3 and not torch.equal(several.noise[1], several.noise[2])
    per_set = [PeriodicEvaluation(one, build_interpolant(one), (2,), "cpu") for _ in range(3)]
    for j, ev in enumerate(per_set):
        ev.noise, ev.scorers = [several.noise[j]], [several.scorers[j]]
    mean = several(model)
    for key, value in mean.items():
        assert value == pytest.approx(sum(ev(model)[key] for ev in per_set) / 3, rel=1e-12)
    assert single(model)["eval/sw2_steps001"] == per_set[0](model)["eval/sw2_steps001"]


# -- what MLflow shows of a run -------------------------------------------------------------------------------

def test_metrics_are_live_and_a_restart_neither_repeats_nor_loses_a_step(tmp_path):
    """tracking.flush_seconds: 0 writes at every log line: step 15 is in MLflow before the failure at step
    19, though the last checkpoint is step 10; the restart from step 10 runs 11..20 again but logs only
    what MLflow lacks, so each step holds one value, the one logged first."""
    live = dict(tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tests", "flush_seconds": 0})
    with pytest.raises(RuntimeError, match="injected failure at step 19"):
        run(tmp_path, train__steps=20, train__debug={"fail_at_step": 19}, **live)
    exp = experiment(tmp_path, **{**SMALL, "train__steps": 20})
    record = open_run(exp, resume=True)
    before = history(record, "train/loss")
    assert [s for s, _ in before] == [5, 10, 15]
    _, record, _, result = run(tmp_path, resume=True, train__steps=20, train__debug={"fail_at_step": 19}, **live)
    after = history(record, "train/loss")
    assert result["step"] == 20 and [s for s, _ in after] == [5, 10, 15, 20]
    assert after[:3] == before
    lrs = [s for s, _ in history(record, "train/lr")]
    assert lrs == sorted(set(lrs)) == [5, 10, 15, 20]


def test_a_run_carries_its_config_dataset_images_and_system_metrics_into_mlflow(tmp_path):
    import yaml

    from fmm.experiment.schema import load_experiment

    exp, record, _, _ = run(tmp_path, train__steps=120, train__eval_every=40, train__eval_samples=200,
                            tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tests",
                                      "system_metrics_seconds": 0.1})
    client = MlflowClient(record.tracking_uri)
    run_ = client.get_run(record.mlflow_run_id)
    assert client.get_experiment(run_.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    config = yaml.safe_load(open(client.download_artifacts(record.mlflow_run_id, "config.yaml", str(tmp_path))))
    assert load_experiment(raw=config) == exp  # the artifact runs again as it is
    (dataset,) = run_.inputs.dataset_inputs
    assert dataset.dataset.name == "flower" and "fmm:target/flower" in dataset.dataset.source
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["training"]
    images = [a.path for a in client.list_artifacts(record.mlflow_run_id, "images")]
    steps = sorted({int(p.split("+step+")[1].split("+")[0]) for p in images if p.startswith("images/samples+step+")})
    assert steps == [40, 80, 120]  # the step slider: each periodic evaluation (and the end)
    assert "system/cpu_utilization_percentage" in run_.data.metrics
    assert run_.data.metrics["system/system_memory_usage_megabytes"] > 0
    assert "train.debug" not in " ".join(run_.data.params)  # debug knobs only when set
