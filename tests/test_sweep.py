"""`fmm sweep` on real components: Ray Tune with OptunaSearch and ASHA on a local Ray cluster, trials
that are real training runs, SQLite MLflow stores read back through MlflowClient, a resumed sweep, and
a real `ray start --head` + `ray job submit` of the toy sweep."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from support.experiments import SWEEP_BASE as BASE, write_sweep
from support.ray_ports import RAY, free_port, own_ports, stop_ray_under
from fmm.experiment.sweep_schema import load_sweep
from fmm.jobs.sweep import run_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def children(tmp_path, parent_name):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("kind") == "sweep" and r.info.run_name == parent_name]
    assert len(parent) == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    return client, parent[0], kids


# -- bad input, all before any trial starts -------------------------------------------------------

@pytest.mark.parametrize("changes,message", [
    ({"space": {"optim.lrr": {"float": [1e-3, 1e-2]}}}, "optim.lrr"),
    ({"space": {"objective.invertibility_weight": {"float": [0.1, 1.0]}}}, "invertibility_weight"),
    ({"space": {"interpolant.schedule": {"categorical": []}}}, "at least one choice"),
    ({"space": {"optim.lr": {"float": [1e-2, 1e-3]}}}, "must not exceed high"),
    ({"space": {"optim.lr": {"float": [0.0, 1e-3], "log": True}}}, "low > 0"),
    ({"space": {"optim.lr": {"float": [1e-3, 1e-2], "int": [1, 2]}}}, "exactly one of"),
    ({"metric": "eval/fid_steps001"}, "not reported by the trials"),
    ({"metric": [{"name": "eval/sw2_steps001"}, {"name": "eval/sw2_steps002"}]}, "multi-objective"),
    ({"space": {}}, "space is empty"),
])
def test_bad_sweeps_are_refused_before_any_trial(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_sweep(tmp_path, **changes))


def test_a_conditional_key_is_checked_under_its_condition(tmp_path):
    path = write_sweep(tmp_path, space={
        "objective.name": {"categorical": ["lmd", "two_map"]},
        "objective.invertibility_weight": {"float": [0.1, 10.0], "log": True, "when": {"objective.name": "two_map"}}})
    sweep, _ = load_sweep(path)
    assert sweep.space["objective.invertibility_weight"].when == {"objective.name": "two_map"}


def test_a_trial_larger_than_the_cluster_is_refused(ray_cluster, tmp_path):
    base = dict(BASE, scaling={"num_workers": 2, "cpus_per_worker": 3})
    sweep, tree = load_sweep(write_sweep(tmp_path, base=base))
    with pytest.raises(ValueError, match="one trial needs 6 CPU"):
        run_sweep(sweep, tree, log=lambda *_: None)


def test_on_an_autoscaling_cluster_trials_are_checked_against_its_node_types():
    from fmm.experiment.schema import load_experiment
    from fmm.jobs.cluster import check_resources

    gpu_trial = load_experiment(raw=dict(BASE, scaling={"num_workers": 4, "cpus_per_worker": 8, "use_gpu": True}))
    types = [("head", {"CPU": 4.0}, 0), ("gpu_1x", {"CPU": 8.0, "GPU": 1.0}, 8), ("gpu_4x", {"CPU": 48.0, "GPU": 4.0}, 2)]
    # none up yet: the autoscaler can still add 8 + 2 x 4 = 16 one-GPU workers, so 4 trials of 4 at a time
    assert check_resources(gpu_trial, {"CPU": 4.0}, 8, types) == 4
    assert check_resources(gpu_trial, {"CPU": 4.0}, 2, types) == 2
    big = load_experiment(raw=dict(BASE, scaling={"num_workers": 1, "cpus_per_worker": 64, "use_gpu": True}))
    with pytest.raises(ValueError, match="no node type of this cluster can hold one worker.*gpu_1x"):
        check_resources(big, {"CPU": 4.0}, 2, types)
    many = load_experiment(raw=dict(BASE, scaling={"num_workers": 32, "cpus_per_worker": 8, "use_gpu": True}))
    with pytest.raises(ValueError, match="hold at most 16 such workers"):
        check_resources(many, {"CPU": 4.0}, 2, types)


def test_the_cli_reports_bad_sweeps_in_one_paragraph(tmp_path):
    path = write_sweep(tmp_path, space={"optim.lrr": {"float": [1e-3, 1e-2]}})
    out = subprocess.run([sys.executable, "-m", "fmm.cli", "sweep", path], capture_output=True, text=True)
    assert out.returncode == 2 and "optim.lrr" in out.stderr and "Traceback" not in out.stderr


# -- real sweeps -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_sweep_runs_trials_with_asha_and_records_parent_and_child_runs(ray_cluster, tmp_path):
    sweep, base = load_sweep(write_sweep(tmp_path))
    grid = run_sweep(sweep, base, log=lambda *_: None)
    assert len(grid) == 4 and not grid.errors
    client, parent, kids = children(tmp_path, "toy-sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["trials"] == "4"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {
        "sweep/space.json", "sweep/results.csv", "sweep/best.json", "sweep/parallel_coordinates.png"}
    assert "best/eval/sw2_steps001" in parent.data.metrics
    # each trial's child run and its Ray trial id point at each other
    by_trial = {r.data.tags["ray_trial_id"]: r for r in kids}
    assert len(by_trial) == 4
    for result in grid:
        kid = by_trial[result.metrics["trial_id"]]
        assert result.metrics["mlflow_run_id"] == kid.info.run_id
        assert kid.info.status in ("FINISHED", "KILLED")  # KILLED: stopped by ASHA
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "eval/sw2_steps001")]
        assert steps[0] == 20 and steps == sorted(steps)
        assert kid.data.params["sweep.interpolant.schedule"] in ("linear", "trig")
    finished = [r for r in kids if r.info.status == "FINISHED"]
    assert finished and parent.data.tags["best_mlflow_run_id"] in {r.info.run_id for r in finished}
    for kid in finished:  # quality against sampling steps, and the final map
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "sw2_vs_steps")] == [1, 2]
        assert "checkpoints/final.pt" in {a.path for a in client.list_artifacts(kid.info.run_id, "checkpoints")}


@pytest.mark.slow
def test_a_sweep_on_s3_storage_keeps_its_state_and_trial_checkpoints_there(ray_cluster, tmp_path, s3_server):
    import boto3

    path = write_sweep(tmp_path, name="s3-sweep", search={"num_samples": 2, "max_concurrent_trials": 2},
                       scheduler={"kind": "fifo"}, storage={"path": "s3://fmm/sweeps"})
    sweep, base = load_sweep(path)
    grid = run_sweep(sweep, base, log=lambda *_: None)
    assert len(grid) == 2 and not grid.errors
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket="fmm", Prefix="sweeps/s3-sweep/")["Contents"]]
    assert "sweeps/s3-sweep/fmm_sweep.json" in keys
    assert any(k.startswith("sweeps/s3-sweep/tune/") and "experiment_state" in k for k in keys)
    assert sum(k.endswith("/state.pt") for k in keys) >= 2  # the trials' checkpoints
    assert sum(k.endswith("/fmm_run.json") for k in keys) == 2


@pytest.mark.slow
def test_a_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(ray_cluster, tmp_path):
    path = write_sweep(tmp_path, name="nan-sweep", space={"optim.lr": {"categorical": [1.0e30]}},
                       search={"num_samples": 2, "max_concurrent_trials": 2}, scheduler={"kind": "fifo"})
    sweep, base = load_sweep(path)
    grid = run_sweep(sweep, base, log=lambda *_: None)
    assert len(grid) == 2 and len(grid.errors) == 2
    _, parent, kids = children(tmp_path, "nan-sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_failed"] == "2"
    assert len(kids) == 2
    for kid in kids:  # Tune retried each (search.max_failures) and the retry refused to train it again
        assert kid.info.status == "FAILED" and kid.data.tags["diverged"] == "true"
        assert "FloatingPointError: loss is" in kid.data.tags["failure_reason"]
        assert kid.data.tags["retry_refused"] == "the trial diverged"


@pytest.mark.slow
def test_a_trial_whose_process_is_killed_is_retried_from_its_checkpoint_and_finishes(ray_cluster, tmp_path):
    """The trial's process SIGKILLs itself at step 25 (train.debug.kill_at_step), as when its node goes:
    Tune starts the trial again (search.max_failures) from its step-20 checkpoint, in the same MLflow run."""
    base = {**BASE, "train": {**BASE["train"], "checkpoint_every": 20, "debug": {"kill_at_step": 25}}}
    path = write_sweep(tmp_path, name="killed", base=base, space={"optim.lr": {"categorical": [3.0e-3]}},
                       search={"num_samples": 1, "max_concurrent_trials": 1, "max_failures": 1},
                       scheduler={"kind": "fifo"})
    sweep, tree = load_sweep(path)
    grid = run_sweep(sweep, tree, log=lambda *_: None)
    assert len(grid) == 1 and not grid.errors and grid[0].metrics["step"] == 40
    client, _, kids = children(tmp_path, "killed")
    assert [k.info.status for k in kids] == ["FINISHED"]
    assert kids[0].data.tags["restored_from"].endswith("checkpoint_000000")  # Tune's first: step 20
    assert "diverged" not in kids[0].data.tags
    assert sorted(m.step for m in client.get_metric_history(kids[0].info.run_id, "train/loss")) == [20, 40]


@pytest.mark.slow
def test_distributed_trials_run_as_torch_trainers(ray_cluster, tmp_path):
    base = dict(BASE, scaling={"num_workers": 2, "cpus_per_worker": 1})
    path = write_sweep(tmp_path, name="ddp-sweep", base=base, search={"num_samples": 1, "max_concurrent_trials": 1},
                       scheduler={"kind": "fifo"})
    sweep, tree = load_sweep(path)
    grid = run_sweep(sweep, tree, log=lambda *_: None)
    assert len(grid) == 1 and not grid.errors
    result = grid[0]
    assert result.metrics["step"] == 40 and "checkpoint_path" in result.metrics  # forwarded from Train
    _, _, kids = children(tmp_path, "ddp-sweep")
    assert [r.info.status for r in kids] == ["FINISHED"] and kids[0].data.params["scaling.num_workers"] == "2"


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_repeating_finished_trials(tmp_path, ray_cluster, capsys, monkeypatch):
    """The sweep's driver, joined to a running cluster (this session's), is SIGKILLed once two trials have
    finished, as when the machine that submitted it goes; `--resume` finishes the sweep in one parent run
    and does not train the finished trials again."""
    from fmm import cli

    path = write_sweep(tmp_path, name="resumed", search={"num_samples": 3, "max_concurrent_trials": 1},
                       scheduler={"kind": "fifo"})
    address = ray_cluster.get_runtime_context().gcs_address
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "fmm.cli", "sweep", path, "--address", address]
    driver_log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=driver_log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    finished = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(2)
        if not list(tmp_path.rglob("fmm_sweep.json")):  # the driver has not made its MLflow store and run yet:
            continue  # opening the store here would create it too, racing the driver's own creation
        try:
            _, _, kids = children(tmp_path, "resumed")
        except Exception:  # the store or the parent run may not exist yet
            continue
        finished = sum(r.info.status == "FINISHED" for r in kids)
        if finished >= 2:
            break
    assert finished >= 2, (f"the sweep did not finish two trials in time (driver exit {proc.poll()}): "
                           f"{(tmp_path / 'driver.log').read_text()[-3000:]}")
    os.killpg(proc.pid, signal.SIGKILL)  # Ray ends the dead driver's job: its running trial goes with it
    proc.wait(30)
    client, _, kids = children(tmp_path, "resumed")
    done_before = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "train/loss"))
                   for r in kids if r.info.status == "FINISHED"}
    monkeypatch.chdir(tmp_path)  # resumed in this process, already joined: no second interpreter start-up
    code = cli.main(["sweep", path, "--resume", "--address", address])
    out = capsys.readouterr()
    assert code == 0, (out.out + out.err)[-3000:]
    assert "3 trials (0 failed)" in out.out
    _, _, kids = children(tmp_path, "resumed")
    assert len({r.data.tags["ray_trial_id"] for r in kids}) == 3 and len(kids) == 3
    assert all(r.info.status == "FINISHED" for r in kids)
    for run_id, logged in done_before.items():  # a trial that had finished did not train again
        assert len(client.get_metric_history(run_id, "train/loss")) == logged


def test_a_trial_finished_before_the_sweep_was_killed_reports_its_end_again_from_mlflow(tmp_path):
    """Tune snapshots a sweep between trial events: a trial that finished just before the driver was killed
    is started again on resume, finds its FINISHED run and reports what it ended with (not training twice)."""
    from fmm.jobs.sweep import finished_report

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("sweeps")).info.run_id
    for step, loss, sw2 in ((20, 0.9, 0.5), (40, 0.4, 0.2)):
        client.log_metric(run_id, "train/loss", loss, step=step)
        client.log_metric(run_id, "eval/sw2_steps001", sw2, step=step)
    client.log_metric(run_id, "sw2_vs_steps", 0.2, step=1)
    client.set_terminated(run_id, "FINISHED")
    assert finished_report(client.get_run(run_id), 40) == {"step": 40, "loss": 0.4, "mlflow_run_id": run_id,
                                                            "eval/sw2_steps001": 0.2}


@pytest.mark.slow
def test_ray_job_submit_ships_the_checkouts_code_with_token_auth_on_and_refuses_a_submitter_without_the_token(
        tmp_path):
    """The README's submission on a head started with Ray's token authentication: the job ships the
    package of the submitting checkout (cluster/runtime_env.yaml's py_modules) and a copy whose fmm
    differs from the installed one is the code that runs, in the driver and the trial's worker; the
    trial's run records the version and the commit passed in the job's metadata. A submitter without
    the token, or with a wrong one, is refused."""
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=str(tmp_path),  # no ~/.ray/auth_token of ours
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))  # `fmm`, as installed
    port, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="/tmp/fmmray")  # short (socket paths) and ours alone, to stop only this head
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            f"--temp-dir={temp}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                            "--include-dashboard=true", "--disable-usage-stats",
                            f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
                            *own_ports()],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    checkout = tmp_path / "checkout"  # a copy of the repository whose package says another version
    shutil.copytree(os.path.join(ROOT, "platform", "fmm"), checkout / "platform" / "fmm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = checkout / "platform" / "fmm" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.1.0+shipped"'))
    with open(os.path.join(ROOT, "cluster", "runtime_env.yaml")) as f:
        runtime_env = yaml.safe_load(f)
    with open(checkout / "runtime_env.yaml", "w") as f:  # the shipped file, minus the cloud's bucket and server
        yaml.safe_dump({"py_modules": runtime_env["py_modules"], "excludes": runtime_env["excludes"]}, f)
    try:
        write_sweep(checkout, name="submitted", search={"num_samples": 1, "max_concurrent_trials": 1})
        command = [RAY, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir=.",
                   "--runtime-env=runtime_env.yaml",
                   '--metadata-json={"fmm_git_commit": "c0ffee", "fmm_git_dirty": "false"}',
                   "--", "fmm", "sweep", "sweep.yaml"]
        deadline = time.time() + 180
        while True:  # the head's job agent comes up a little after `ray start` returns
            job = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=checkout)
            if "No available agent" not in job.stderr or time.time() > deadline:
                break
            time.sleep(5)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert "succeeded" in job.stdout and "1 trial (0 failed)" in job.stdout
        assert "fmm 0.1.0+shipped" in job.stdout  # the trial's training worker runs the shipped copy
        client = MlflowClient(f"sqlite:///{checkout}/mlflow.db")
        (trial,) = [r for r in client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
                    if r.data.tags.get("kind") != "sweep"]
        tags = trial.data.tags
        assert (tags["fmm_version"], tags["git_commit"], tags["git_dirty"], tags["mlflow.source.type"]) == \
            ("0.1.0+shipped", "c0ffee", "false", "JOB")

        # A runtime env that cannot ship the package (the checkout's platform/fmm is not there): refused by the
        # job CLI before anything is submitted, naming the path.
        with open(checkout / "broken_env.yaml", "w") as f:
            yaml.safe_dump({"py_modules": ["platform/fmm_missing"]}, f)
        broken = subprocess.run([c if c != "--runtime-env=runtime_env.yaml" else "--runtime-env=broken_env.yaml"
                                 for c in command], capture_output=True, text=True, env=env, timeout=120, cwd=checkout)
        assert broken.returncode != 0 and "fmm_missing" in broken.stdout + broken.stderr
        assert "submitted successfully" not in broken.stdout

        for missing in ({"RAY_AUTH_TOKEN": ""}, {"RAY_AUTH_TOKEN": "not-the-token-" + token[:8]}):
            refused = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=checkout,
                                     env={**{k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"},
                                          **{k: v for k, v in missing.items() if v}})
            assert refused.returncode != 0 and "authentication token" in refused.stderr, refused.stderr[-2000:]
            assert "succeeded" not in refused.stdout
    finally:  # `ray stop` would stop every Ray on the machine: end only the processes of this head
        stop_ray_under(temp)
        shutil.rmtree(temp, ignore_errors=True)


# -- the shipped sweep files ---------------------------------------------------------------------------

def test_parallel_tpe_spreads_its_suggestions_with_the_constant_liar(tmp_path):
    """Trials side by side: TPE counts the running ones as bad results (constant liar) and so suggests
    elsewhere; one at a time there is nothing to lie about. Random search stays random."""
    from fmm.jobs.sweep import make_sampler

    sweep, _ = load_sweep(os.path.join(ROOT, "experiments", "sweeps", "flower_toy.yaml"), [f"storage.path={tmp_path}"])
    assert sweep.search.sampler == "tpe"
    assert make_sampler(sweep, 4)._constant_liar is True and make_sampler(sweep, 1)._constant_liar is False
    sweep.search.sampler = "random"
    assert type(make_sampler(sweep, 4)).__name__ == "RandomSampler"


def test_the_toy_sweep_file_is_valid(tmp_path):
    sweep, base = load_sweep(os.path.join(ROOT, "experiments", "sweeps", "flower_toy.yaml"),
                             [f"storage.path={tmp_path}"])
    assert sweep.metrics[0].name == "eval/sw2_steps001" and base["train"]["eval_every"] == 100
