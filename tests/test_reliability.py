"""Failures survived with nothing lost, on real components (local Ray, SQLite MLflow, local and loopback-S3
storage): a non-finite step that leaves the weights untouched, credentials kept out of every record and log,
transient S3 errors retried and a refusal reported, a lost node survived. (Rollback, corrupt checkpoints and
a SIGKILLed worker: tests/test_loop.py and tests/test_train.py.)"""

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from mlflow.tracking import MlflowClient

from fmm.flowmap import FlowMap
from fmm.groundtruth import ExactVelocity, make_target
from fmm.interpolants import Interpolant
from fmm.nets import TwoTimeMLP
from fmm.objectives import make_objective
from fmm.training import train_step, trainable_parameters

from support.ray_ports import RAY, free_port, kill_node, own_ports, start_worker_node, stop_ray_under

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# -- divergence -------------------------------------------------------------------------------------------

def test_a_non_finite_step_leaves_the_weights_and_the_optimiser_untouched():
    interp = Interpolant("linear")
    target = make_target("flower")
    model = FlowMap(TwoTimeMLP(dim=2, width=32, depth=2))
    objective = make_objective({"name": "lmd"}, interp)
    teacher = ExactVelocity(target, interp)
    objective.prepare(model, teacher)
    optimiser = torch.optim.Adam(trainable_parameters(model, objective), lr=1e-2)
    x1 = target.sample(64, torch.Generator().manual_seed(0)).float()
    assert not train_step(model, objective, optimiser, x1, teacher=teacher, step=0, grad_clip=1.0)["skipped"]
    before = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in optimiser.state.values()]
    logs = train_step(model, objective, optimiser, x1 * float("nan"), teacher=teacher, step=1, grad_clip=1.0)
    assert logs["skipped"] and not torch.isfinite(logs["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, optimiser.state.values()))


# Rollback after a non-finite step, restoring past a corrupt checkpoint and the failure of a run that keeps
# diverging are tested in-process through LocalSession (tests/test_loop.py); a run that fails under Ray Train
# ends FAILED in MLflow with its reason (below, the S3 refusal; tests/test_sweep.py, a diverging trial).


# -- secrets ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_credentials_in_the_environment_never_reach_mlflow_records_checkpoints_or_logs(tmp_path, s3_server):
    import uuid

    import boto3
    import yaml

    secrets = {key: f"fmm-secret-{key.lower()}-{uuid.uuid4().hex}" for key in
               ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")}
    import shutil
    import tempfile

    ray_temp = tempfile.mkdtemp(prefix="/tmp/fmms")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_temp, **secrets)
    env.pop("MLFLOW_TRACKING_URI", None)
    exp = {"name": "secretive", "data": {"target": "flower"},
           "network": {"name": "mlp", "dim": 2, "width": 32, "depth": 2}, "objective": {"name": "lmd"},
           "teacher": {"kind": "exact", "target": "flower"},
           "train": {"steps": 40, "batch_size": 128, "checkpoint_every": 20, "log_every": 10},
           "scaling": {"num_workers": 1, "cpus_per_worker": 1}, "storage": {"path": "s3://fmm/secretive"},
           "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "secrets"}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    outputs = []
    for argv in (["train", "exp.yaml"], ["evaluate", "s3://fmm/secretive/secretive", "--steps", "1,2",
                                          "--samples", "200", "--teacher-max-nfe", "4"]):
        out = subprocess.run([sys.executable, "-m", "fmm.cli", *argv], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        outputs.append(out.stdout + out.stderr)

    def leaks(data: bytes) -> list[str]:
        return [key for key, value in secrets.items() if value.encode() in data]

    found = {"console": leaks("".join(outputs).encode())}
    scanned = 0
    for root in (str(tmp_path), ray_temp):  # the MLflow store and its artifacts; Ray's session logs
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        found[path] = leaks(f.read())
                    scanned += 1
    shutil.rmtree(ray_temp, ignore_errors=True)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fmm", Prefix="secretive/")["Contents"]]
    assert any(k.endswith("state.pt") for k in keys) and any(k.endswith("fmm_run.json") for k in keys)
    for key in keys:  # checkpoints and run records
        found[f"s3://fmm/{key}"] = leaks(s3.get_object(Bucket="fmm", Key=key)["Body"].read())
    assert any("/logs/" in p for p in found) and scanned > 20, sorted(found)[:20]
    assert not {where: what for where, what in found.items() if what}


# A worker that dies by SIGKILL (train.debug.kill_at_step) is restarted from its last checkpoint in the same
# MLflow run: tests/test_train.py, with a baseline's target network on two workers.


# -- flaky and failing storage ----------------------------------------------------------------------------

def s3_run(tmp_path, flaky_s3, name, steps, checkpoint_every, watch=None, attempts="8"):
    """`fmm train` on storage s3://fmm/<name> reached through the flaky endpoint, in its own process and Ray."""
    import shutil
    import tempfile

    import yaml


    ray_temp = tempfile.mkdtemp(prefix="/tmp/fmmf")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_temp, AWS_ENDPOINT_URL=flaky_s3.url,
               FMM_S3_ATTEMPTS=attempts)
    exp = {"name": name, "data": {"target": "flower"},
           "network": {"name": "mlp", "dim": 2, "width": 128, "depth": 2}, "objective": {"name": "lmd"},
           "teacher": {"kind": "exact", "target": "flower"},
           "train": {"steps": steps, "batch_size": 512, "checkpoint_every": checkpoint_every, "log_every": 10},
           "scaling": {"num_workers": 1, "cpus_per_worker": 1}, "storage": {"path": f"s3://fmm/{name}"},
           "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": name}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    proc = subprocess.Popen([sys.executable, "-m", "fmm.cli", "train", "exp.yaml"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if watch is not None:
                watch(line)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_ray_under(ray_temp)
        shutil.rmtree(ray_temp, ignore_errors=True)
    return proc.returncode, "".join(lines)


@pytest.mark.slow
def test_transient_s3_errors_are_retried_and_a_refusal_stops_the_run_clearly_with_checkpoints_readable(
        tmp_path, flaky_s3, s3_server):
    """One run on S3: 503 SlowDown to the first four requests in a row and every tenth after (more than
    pyarrow's default of 3 attempts survives), through the checkpoints at 50 and 100; from step 120 on
    every request is refused (403), as when a bucket's policy or credentials go."""
    import boto3

    from fmm.worker.state import verify_state

    flaky_s3.mode = "flaky"
    transient = {}

    def refuse_later(line):
        if "step    120" in line and flaky_s3.mode == "flaky":
            transient.update(injected=flaky_s3.injected, requests=flaky_s3.requests)
            flaky_s3.mode = "refuse"

    code, text = s3_run(tmp_path, flaky_s3, "s3faults", steps=200, checkpoint_every=50, watch=refuse_later)
    assert transient["injected"] >= 10, transient  # the retried 503s, before the refusal
    print(f"{transient['injected']} of {transient['requests']} S3 requests answered 503 before step 120")
    assert code == 1, text[-4000:]
    verdict = [line for line in text.splitlines() if line.startswith("fmm train: ")]
    assert len(verdict) == 1 and verdict[0].startswith("fmm train: the run failed:"), text[-3000:]
    assert "ACCESS_DENIED" in verdict[0] or "Access Denied" in verdict[0], verdict
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("s3faults").experiment_id])[0]
    assert run.info.status == "FAILED" and run.data.tags.get("failure_reason")
    assert max(s for s, _ in history(client, run.info.run_id, "train/loss")) >= 100
    s3 = boto3.client("s3", endpoint_url=s3_server)  # the storage itself, not through the faulty endpoint
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="fmm", Prefix="s3faults/")["Contents"]}
    assert {"s3faults/s3faults/fmm_run.json", "s3faults/s3faults/step_00000050/state.pt"} <= keys
    folder = tmp_path / "last"
    folder.mkdir()
    for name in ("state.pt", "state.sha256"):
        s3.download_file("fmm", f"s3faults/s3faults/step_00000100/{name}", str(folder / name))
    payload = torch.load(verify_state(str(folder)), map_location="cpu", weights_only=True)
    assert payload["step"] == 100


# -- a lost node ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_lost_node_is_survived_elastically_or_by_waiting_for_a_node_to_return(tmp_path):
    import shutil
    import tempfile

    import yaml


    temp = tempfile.mkdtemp(prefix="/tmp/fmmn")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray notices a dead node after its health checks fail (3 missed checks 0.5 s apart here), and Train retries
    # a worker group that could not start, with the workers that fit, after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    # (the wait for the group's placement group, not for its processes: a few seconds suffice on one machine).
    env.update(RAY_AUTH_MODE="disabled", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="3",
               RAY_health_check_initial_delay_ms="1000", RAY_health_check_period_ms="500",
               RAY_health_check_timeout_ms="500", RAY_health_check_failure_threshold="3")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env["RAY_ADDRESS"] = address  # the head's own processes too: Ray Train's cleaner asks this cluster, no other
    head = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                           f"--temp-dir={temp}", "--num-cpus=1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={free_port()}", "--disable-usage-stats",
                           f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
                           *own_ports()], capture_output=True, text=True, env=env, timeout=180)
    assert head.returncode == 0, head.stderr[-3000:]

    def train(name: str, scaling: dict, on_line) -> str:
        exp = {"name": name, "data": {"target": "flower"},
               "network": {"name": "mlp", "dim": 2, "width": 64, "depth": 2}, "objective": {"name": "lmd"},
               "teacher": {"kind": "exact", "target": "flower"},
               "train": {"steps": 150, "batch_size": 256, "checkpoint_every": 50, "log_every": 10},
               "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2, **scaling},
               "storage": {"path": str(tmp_path / "runs")},
               "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "nodes"}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(exp))
        proc = subprocess.Popen([sys.executable, "-m", "fmm.cli", "train", f"{name}.yaml"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            on_line(line)
        proc.wait(timeout=600)
        text = "".join(lines)
        assert proc.returncode == 0, text[-4000:]
        return text

    nodes = []  # every node joined, lost or not: each is killed with its temp dir at the end

    def join() -> int:
        nodes.append(start_worker_node(address, env))
        return nodes[-1]

    try:
        # Elastic (min_workers 1): the node goes, training goes on with the worker left on the head.
        node = join()
        lost = []
        text = train("elastic", {"min_workers": 1},
                     lambda line: "step    120" in line and not lost and lost.append(kill_node(node)))
        assert lost == [1], text[-3000:]
        assert "elastic: steps 100 -> 150, 1 worker(s)" in text, text[-3000:]

        # Fixed size (the default): the run waits for a node to take the lost one's place, then resumes.
        node = join()
        state = {}

        def lose_then_replace(line):
            if "step    120" in line and "lost" not in state:
                state["lost"] = kill_node(node)
                threading.Timer(1, lambda: state.setdefault("new", join())).start()

        text = train("fixed", {}, lose_then_replace)
        assert state.get("lost") == 1 and "new" in state, text[-3000:]
        assert "fixed: steps 100 -> 150, 2 worker(s)" in text, text[-3000:]
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
        for run in runs:
            assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(range(10, 151, 10))
    finally:
        for node in nodes:
            kill_node(node)
        stop_ray_under(temp)
        shutil.rmtree(temp, ignore_errors=True)
