"""Ray, as every job meets it: start an embedded local Ray or join a cluster, and what the cluster can hold.

`connect` is the one place a driver starts or joins Ray. On an autoscaling cluster the node types
(from the autoscaler's published config, or the cluster file) bound what a trial or a study member
may ask for; on a fixed cluster the resources it has now do.
"""

from __future__ import annotations

import os

import ray
import ray._private.state
import torch

from fmm.experiment.schema import ExperimentConfig, read_yaml


def connect(address: str | None = None) -> None:
    """Join the Ray at `address` (else RAY_ADDRESS), else, by Ray's rule, the one a `ray start` on this machine
    left running, else start an embedded local one (`local` always does); once per process.

    Secrets (MLflow's or AWS's credentials) are not handed to the workers through the job's runtime
    environment: Ray writes runtime environments into its logs. Workers take them from their node's
    environment: an embedded Ray inherits this process's; cluster nodes get them from the cluster files
    (cluster/mlflow.md)."""
    if ray.is_initialized():
        return
    # Workers print progress once; Ray Train's print patch would echo every line a second time.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(address=address, log_to_driver=True)


CLUSTER_CONFIG = "~/ray_bootstrap_config.yaml"  # where the Ray cluster launcher puts the head's cluster file


def node_types() -> list[tuple[str, dict[str, float], int]] | None:
    """(name, resources, max_workers) of each node type of an autoscaling cluster, or None on a fixed one.

    From the autoscaler's published config (autoscaler v2, as Ray Train itself checks), else from the
    cluster file: $FMM_CLUSTER_CONFIG (a launcher cluster file, or a KubeRay RayCluster or RayJob
    manifest), or the launcher's ~/ray_bootstrap_config.yaml on the head."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # no autoscaler state on this cluster
        config = None
    if config is not None and config.node_group_configs:
        return [(g.name, dict(g.resources), g.max_count) for g in config.node_group_configs]
    path = os.path.expanduser(os.environ.get("FMM_CLUSTER_CONFIG", CLUSTER_CONFIG))
    if not os.path.isfile(path):
        return None
    cluster = read_yaml(path, "cluster")
    if cluster.get("kind") in ("RayCluster", "RayJob"):
        return kuberay_node_types(cluster, path)
    types = cluster.get("available_node_types") or {}
    head = cluster.get("head_node_type")
    return [(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
             1 if name == head else int(spec.get("max_workers", cluster.get("max_workers", 0))))
            for name, spec in types.items()]


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (an embedded local Ray, whose resources
    are all it will ever have), rather than joining a cluster that may autoscale."""
    node = getattr(ray._private.worker.global_worker, "node", None)
    return bool(node is not None and node.head)


def kuberay_node_types(manifest: dict, path: str) -> list[tuple[str, dict[str, float], int]]:
    """(name, resources, max replicas) of a KubeRay RayCluster's (or a RayJob's cluster's) head and worker
    groups: the CPUs and GPUs each group's `rayStartParams` declare, else its container's limits."""
    spec = manifest.get("spec") or {}
    spec = spec.get("rayClusterSpec", spec) if manifest.get("kind") == "RayJob" else spec

    def resources(group: dict) -> dict[str, float]:
        params = group.get("rayStartParams") or {}
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        limits = (containers[0].get("resources") or {}).get("limits") or {}
        cpu, gpu = params.get("num-cpus", limits.get("cpu", 0)), params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
        try:
            return {"CPU": float(str(cpu).rstrip("m")) / (1000 if str(cpu).endswith("m") else 1), "GPU": float(gpu)}
        except ValueError:
            raise ValueError(f"{path}: group {group.get('groupName', 'head')!r} declares CPU {cpu!r} and GPU "
                             f"{gpu!r}; fmm reads numbers (num-cpus, num-gpus, or the container's limits).") from None

    types = [("head", resources(spec.get("headGroupSpec") or {}), 1)]
    for group in spec.get("workerGroupSpecs") or []:
        types.append((group.get("groupName", "workers"), resources(group), int(group.get("maxReplicas", 0))))
    return types


def check_resources(exp: ExperimentConfig, cluster: dict[str, float], max_concurrent: int,
                    types: list[tuple[str, dict[str, float], int]] | None = None, *, fixed: bool = True,
                    log=print) -> int:
    """The concurrency at which trials never wait on each other's workers. On an autoscaling cluster
    (`types`) a worker must fit one node type and the types' node limits bound the concurrency; on a
    fixed cluster the resources it has now do. A trial the cluster can never hold is an error; on a
    cluster that may autoscale but whose node types fmm cannot read (`fixed=False`, e.g. KubeRay without
    FMM_CLUSTER_CONFIG), a trial larger than the nodes up now is accepted with a warning, as Ray Train
    does: the autoscaler may add what it needs."""
    scaling = exp.scaling
    worker = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        worker["GPU"] = float(scaling.gpus_per_worker or 1)
    what = f"{scaling.num_workers} worker(s) of {worker}"
    if types:
        def per_node(resources: dict[str, float]) -> int:
            return int(min(resources.get(k, 0.0) // v for k, v in worker.items()))

        fitting = [(name, per_node(res), count) for name, res, count in types if per_node(res) >= 1]
        if not fitting:
            listing = "; ".join(f"{name}: {res}" for name, res, _ in types)
            raise ValueError(f"one trial needs {what} and no node type of this cluster can hold one worker "
                             f"({listing}): lower scaling.* or add a node type that fits.")
        if any(count < 0 for _, _, count in fitting):
            return max_concurrent
        workers = sum(n * count for _, n, count in fitting)
        if workers < scaling.num_workers:
            raise ValueError(f"one trial needs {what} but the cluster's node types hold at most {workers} such "
                             f"workers ({', '.join(f'{name} x{count}' for name, _, count in fitting)}).")
        return max(1, min(max_concurrent, workers // scaling.num_workers))
    need_cpu = scaling.num_workers * worker["CPU"]
    need_gpu = scaling.num_workers * worker.get("GPU", 0.0)
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if (need_cpu > have_cpu or need_gpu > have_gpu) and not fixed:
        log(f"[fmm] warning: one trial needs {need_cpu:g} CPU and {need_gpu:g} GPU ({what}) and the nodes up now "
            f"offer {have_cpu:g} CPU and {have_gpu:g} GPU; fmm cannot read this cluster's node types (set "
            f"FMM_CLUSTER_CONFIG to its cluster file or KubeRay manifest to check them), so it proceeds: the "
            f"trials wait until the autoscaler adds nodes that hold them, one at a time.")
        return 1
    if need_cpu > have_cpu or need_gpu > have_gpu:
        raise ValueError(f"one trial needs {need_cpu:g} CPU and {need_gpu:g} GPU ({what}) but the cluster offers "
                         f"{have_cpu:g} CPU and {have_gpu:g} GPU: lower scaling.* in the base or the sweep's set, "
                         f"or add nodes (on an autoscaling cluster whose node types fmm cannot read, point "
                         f"FMM_CLUSTER_CONFIG at its cluster file).")
    fits = int(have_cpu // need_cpu)
    if need_gpu:
        fits = min(fits, int(have_gpu // need_gpu))
    return max(1, min(max_concurrent, fits))


def node_shapes() -> tuple[list[dict[str, float]], str]:
    """The resources of each node type of an autoscaling cluster, else of each live node, and which."""
    types = node_types()
    if types:
        return [res for _, res, _ in types], "node type"
    return [n["Resources"] for n in ray.nodes() if n["Alive"]], "node"


def check_evaluation_fits(wanted: dict[str, float] | None, shapes: list[dict[str, float]], kind: str) -> None:
    """An evaluation task that no node (type) can hold would wait for ever: refused before it is asked for."""
    if wanted is not None and not any(all(res.get(k, 0.0) >= v for k, v in wanted.items()) for res in shapes):
        offered = "; ".join(str({k: v for k, v in res.items() if k in ("CPU", "GPU") or k in wanted})
                            for res in shapes)
        raise ValueError(f"evaluation.resources {wanted}: no {kind} of this cluster holds that much ({offered}); "
                         f"lower it or add a {kind} that does.")


def ray_options(resources: dict[str, float]) -> dict:
    """Evaluation resources as Ray task options: CPU, GPU and memory (bytes) by name, any other key a
    custom resource."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    return {"num_cpus": resources.get("CPU", 1), "num_gpus": resources.get("GPU", 0), "max_retries": 0,
            **({"memory": resources["memory"]} if "memory" in resources else {}),
            **({"resources": custom} if custom else {})}


def evaluation_device() -> str:
    """CUDA when this process has a GPU (a Ray task given one sees it), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
