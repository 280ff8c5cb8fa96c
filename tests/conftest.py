"""Real services for the platform tests: a loopback S3 server (moto's server mode), a local Ray cluster,
SQLite MLflow stores. Environment first: Ray workers inherit it when the cluster starts."""

import os
import socket
import subprocess
import sys
import time

import pytest

from support.flaky_s3 import FlakyS3
from support.ray_ports import free_port, kill_node, start_worker_node

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Every Ray a test does not point at a head it started is an embedded one of its own. Without an address,
# Ray's ray.init() joins the cluster a `ray start` on this machine recorded in /tmp/ray/ray_current_cluster
# (a developer's, or one a test left), and Ray's state API answers from that cluster even inside another:
# Ray Train's placement-group cleaner, an actor in the run's own cluster, looks its controller up there,
# does not find it, and removes the placement group of a run still training.
os.environ["RAY_ADDRESS"] = "local"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Ray Train's controller polls its workers every 2 s by default; in tests that is seconds per run of waiting
# for a finished loop to be noticed.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Every Ray Train run starts a controller and helper actors, each its own process; two of them serve
# nothing a test on one machine checks: the spot-preemption watcher and the Prometheus metrics.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the machine: one intra-op thread each. Two processes each spinning as
    # many OpenMP threads as there are cores slow each other down many times over.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback, for pyarrow, s3fs, boto3 and Ray workers alike."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="fmm")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def gpu_node(ray_cluster):
    """A second node joined to the session's cluster that declares one logical GPU (Ray accepts them on a
    CPU machine), the head declaring none: work that asks for a GPU must be scheduled there, and finds no
    CUDA. Yields the node's id."""
    port = start_worker_node(ray_cluster.get_runtime_context().gcs_address, dict(os.environ), cpus=1, gpus=1)
    deadline = time.time() + 60
    while not (nodes := [n for n in ray_cluster.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) >= 1]):
        assert time.time() < deadline, "the GPU node did not join"
        time.sleep(0.2)
    yield nodes[0]["NodeID"]
    kill_node(port)


@pytest.fixture
def refusing_s3():
    """A second S3 server that refuses every credential (moto with authentication enforced). It runs in its
    own process (moto reads the setting when it is imported). The port is picked free and then bound by the
    child, so another process may take it in between: the server counts as up only when moto's own API answers
    from that port while the child lives, and a child that could not bind is replaced on a new port."""
    import urllib.request

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while proc.poll() is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1) as answer:
                    if answer.status == 200 and proc.poll() is None:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            proc.kill()
            proc.wait(10)
            continue
        break
    else:
        pytest.fail("moto's S3 server did not start on any of 5 ports")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def flaky_s3(s3_server):
    proxy = FlakyS3(s3_server)
    yield proxy
    proxy.close()


# The longest tests first (each a minute or more on 2 cores, in this order), then the other slow ones, then
# the rest. With pytest-xdist's work stealing (`--dist worksteal` in pyproject.toml) a process that runs
# out takes the back half of the other's queue, so the long tests start early and both processes end
# together on short ones instead of one waiting on the other's last long test.
LONGEST = (
    "test_a_lost_node_is_survived",
    "test_a_study_through_the_cli_on_an_mlflow_server",
    "test_a_study_with_seeds_killed_midway",
    "test_transient_s3_errors_are_retried",
    "test_an_interrupted_sweep_resumes",
    "test_a_sweep_larger_than_the_head_makes_the_autoscaler",
    "test_a_baseline_trains_through_the_same_loop",
    "test_s3_storage_and_parquet_data",
    "test_ray_job_submit_runs_the_toy_sweep",
    "test_credentials_in_the_environment",
    "test_fmm_fid_equals_fid_helper_pytorchs_own_pipeline",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        for i, prefix in enumerate(LONGEST):
            if item.name.startswith(prefix):
                return i
        return len(LONGEST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)  # stable: the order within each rank is the files' order
