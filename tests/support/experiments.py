"""Builders of the small experiments, sweeps and cluster configs the tests run."""

import copy
import os

import torch
import yaml

from fmm.checkpoint import save_flow_map
from fmm.experiment.schema import load_experiment
from fmm.flowmap import FlowMap
from fmm.nets import make_network

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRAIN_BASE = {
    "name": "toy",
    "data": {"target": "flower"},
    "network": {"name": "mlp", "dim": 2, "width": 64, "depth": 2},
    "objective": {"name": "lmd", "diagonal_fraction": 0.25},
    "teacher": {"kind": "exact", "target": "flower"},
    "optim": {"lr": 3e-3, "warmup_steps": 5},
    "train": {"steps": 60, "batch_size": 256, "checkpoint_every": 20, "log_every": 10, "ema_decay": 0.9},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1},
}


def experiment(tmp_path, **changes):
    raw = copy.deepcopy(TRAIN_BASE)
    raw["storage"] = {"path": str(tmp_path / "runs")}
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tests"}
    for dotted, value in changes.items():
        node = raw
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return load_experiment(raw=raw)


NETWORK = {"name": "mlp", "dim": 2, "width": 32, "depth": 2}


def trained_looking(seed: int = 0, std: float = 0.3, **network) -> FlowMap:
    """A flow map with every weight random (the output layer too), as a trained teacher's would be."""
    torch.manual_seed(seed)
    model = FlowMap(make_network(**{**NETWORK, **network}))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model


def teacher_file(tmp_path, std: float = 0.3, **network) -> str:
    """A teacher checkpoint (trained_looking) in tmp_path."""
    path = str(tmp_path / "teacher.pt")
    save_flow_map(path, trained_looking(std=std, **network))
    return path


SWEEP_BASE = {
    "name": "toy",
    "data": {"target": "flower"},
    "network": {"name": "mlp", "dim": 2, "width": 32, "depth": 2},
    "objective": {"name": "lmd", "diagonal_fraction": 0.25},
    "teacher": {"kind": "exact", "target": "flower"},
    "optim": {"lr": 3e-3},
    "train": {"steps": 40, "batch_size": 128, "log_every": 20, "eval_every": 20, "eval_samples": 200,
              "eval_steps": [1, 2], "ema_decay": 0.9},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1},
}


def write_sweep(tmp_path, name="toy-sweep", base=None, **changes) -> str:
    base_path = tmp_path / "base.yaml"
    base_path.write_text(yaml.safe_dump(base or SWEEP_BASE))
    sweep = {
        "name": name, "base": "base.yaml",
        "space": {"interpolant.schedule": {"categorical": ["linear", "trig"]},
                  "optim.lr": {"float": [1e-3, 1e-2], "log": True}},
        "metric": "eval/sw2_steps001", "mode": "min",
        "search": {"sampler": "tpe", "seed": 0, "num_samples": 4, "max_concurrent_trials": 2},
        "scheduler": {"kind": "asha", "grace_period": 20},
        "storage": {"path": str(tmp_path / "sweeps")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "sweeps"},
    }
    for key, value in changes.items():
        sweep[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)



def cluster() -> dict:
    """ray_cluster.yaml as a mapping."""
    with open(os.path.join(ROOT, "ray_cluster.yaml")) as f:
        return yaml.safe_load(f)


def node_types(config: dict) -> list[tuple[str, dict, int]]:
    head = config["head_node_type"]
    return [(name, {k: float(v) for k, v in spec["resources"].items()}, 1 if name == head else spec["max_workers"])
            for name, spec in config["available_node_types"].items()]


