"""Training-step time of every objective as a ratio to the flow-matching step, same model and batch.

    python experiments/benchmarks/objective_step_time.py [--rounds 7] [--steps 5] [--threads 2]

A step is forward, backward and an Adam update. Distillation objectives use a frozen copy of the
network as their velocity teacher (as when distilling a trained flow-matching model), so the
teacher's forward passes are part of their cost. `name[slope]` is the objective with
gradient = "slope" (the JVP without a graph, the gradient through v). Objectives are timed round-robin, `steps` steps
per objective per round, so slow drift of a shared machine hits all of them alike; the table
gives the median step time over rounds and its ratio to flow matching's median.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from fmm.flowmap import FlowMap, ModelVelocity
from fmm.interpolants import Interpolant
from fmm.nets import make_network
from fmm.objectives import OBJECTIVES, make_objective
from fmm.training import train_step, trainable_parameters

CASES = {
    "mlp": ({"name": "mlp", "dim": 2, "width": 512, "depth": 4}, (1024, 2)),
    "unet": ({"name": "unet", "in_channels": 1, "image_size": 16, "channels": 32, "channel_mult": (1, 2),
              "num_blocks": 1, "attn_resolutions": (8,)}, (32, 1, 16, 16)),
}


def time_case(network: dict, shape: tuple[int, ...], rounds: int, steps: int) -> dict[str, list[float]]:
    interp = Interpolant("linear")
    config = dict(network)
    torch.manual_seed(0)
    base = FlowMap(make_network(config.pop("name"), **config))
    teacher = ModelVelocity(copy.deepcopy(base))
    specs = {}
    for name, cls in OBJECTIVES.items():
        specs[name] = {"name": name}
        if "gradient" in cls.Options.model_fields:
            specs[f"{name}[slope]"] = {"name": name, "gradient": "slope"}
    runs = {}
    for name, spec in specs.items():
        model = copy.deepcopy(base)
        objective = make_objective(spec, interp)
        objective.prepare(model, teacher)
        optimiser = torch.optim.Adam(trainable_parameters(model, objective), lr=1e-4)
        runs[name] = (model, objective, optimiser)
    batch = torch.randn(shape)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, (model, objective, optimiser) in runs.items():
            start = time.perf_counter()
            for k in range(steps):
                train_step(model, objective, optimiser, batch, teacher=teacher, step=k)
            if r > 0:  # round 0 warms up allocators and caches
                times[name].append((time.perf_counter() - start) / steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps, medians")
    for case, (network, shape) in CASES.items():
        times = time_case(network, shape, args.rounds, args.steps)
        base = statistics.median(times["flow_matching"])
        print(f"\n{case} {network}, batch {list(shape)}")
        print(f"{'objective':24s} {'step ms':>9s} {'ratio to FM':>12s}")
        for name, values in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
            median = statistics.median(values)
            print(f"{name:24s} {1000 * median:9.2f} {median / base:12.2f}")


if __name__ == "__main__":
    main()
