"""Training steps per second of one objective on one device: the library's step alone (no Ray, no MLflow).

    python experiments/benchmarks/step_throughput.py [--objective lsd] [--target checkerboard]
        [--width 512] [--depth 5] [--batch 1024 ...] [--steps 30] [--device cpu|cuda] [--bf16]

For each batch size: the median step time over `--steps` timed steps after 5 warm-up steps (CUDA:
synchronised), samples per second, and the time the given `--budget` of steps would take at that
rate. It projects a paper's budget onto a machine before the run is started there (the LSD paper's
checkerboard: 250,000 steps at batch 100,000). Imports only the library (torch, pydantic, scipy).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fmm.flowmap import FlowMap
from fmm.groundtruth import make_target
from fmm.interpolants import Interpolant, make_schedule
from fmm.nets import make_network
from fmm.objectives import make_objective
from fmm.training import train_step, trainable_parameters


def measure(objective_name: str, target: str, width: int, depth: int, batch: int, steps: int, device: str,
            bf16: bool) -> float:
    torch.manual_seed(0)
    interpolant = Interpolant(make_schedule("linear"), 1.0)
    model = FlowMap(make_network("mlp", dim=2, width=width, depth=depth)).to(device)
    objective = make_objective({"name": objective_name}, interpolant).to(device)
    objective.prepare(model, None)
    optimiser = torch.optim.Adam(trainable_parameters(model, objective), lr=1e-4)
    draw = make_target(target)
    data = torch.as_tensor(draw.sample(batch * 4, generator=torch.Generator().manual_seed(0)), dtype=torch.float32)
    data = data.to(device)
    times = []
    for step in range(steps + 5):
        x = data[torch.randint(len(data), (batch,), device=device)]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, objective, optimiser, x, teacher=None, step=step, grad_clip=10.0, bf16=bf16)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="lsd")
    parser.add_argument("--target", default="checkerboard")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1024])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--budget", type=int, default=250_000, help="steps to project (default: 250000)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.objective} on {args.target}, MLP {args.width}x{args.depth}, {name}, "
          f"{'bf16' if args.bf16 else 'fp32'}, torch {torch.__version__}")
    print(f"{'batch':>8s} {'step ms':>9s} {'samples/s':>11s} {f'{args.budget} steps':>16s}")
    for batch in args.batch:
        seconds = measure(args.objective, args.target, args.width, args.depth, batch, args.steps, args.device,
                          args.bf16)
        hours = seconds * args.budget / 3600
        print(f"{batch:8d} {1000 * seconds:9.2f} {batch / seconds:11.0f} {hours:14.2f} h")


if __name__ == "__main__":
    main()
