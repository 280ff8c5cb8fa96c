"""Training steps per second of a study's members on one device: the library's step alone (no Ray, no
MLflow), built from the study file exactly as `fmm study` builds each member (network, objective,
optimiser, batch), so a paper's configuration is measured as shipped.

    python experiments/benchmarks/step_throughput.py [--study experiments/papers/lsd_checkerboard.yaml]
        [--methods lsd esd] [--batch 4096 ...] [--steps 20] [--device cpu|cuda] [--bf16] [--set key=value ...]

For each member and batch size (default: the study's own): the median step time over `--steps` timed
steps after 5 warm-up steps (CUDA: synchronised), samples per second, and the time the study's own
budget (base.train.steps at that batch, or `--budget` steps) would take at that rate. It projects a
paper's budget onto a machine before the run is started there. Imports only the library.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fmm.experiment.builders import build_interpolant, build_model, build_objective, build_optimiser
from fmm.experiment.schema import load_experiment
from fmm.experiment.study_schema import load_study, merged
from fmm.training import train_step, trainable_parameters


def member(study, label: str, batch: int):
    raw = merged(study.base, study.methods[label])
    raw["name"] = f"{study.name}-{label}"
    raw.setdefault("train", {})["batch_size"] = batch
    return load_experiment(raw=raw)


def measure(exp, steps: int, device: str, bf16: bool) -> float:
    torch.manual_seed(0)
    interpolant = build_interpolant(exp)
    model = build_model(exp).to(device)
    objective = build_objective(exp, interpolant).to(device)
    objective.prepare(model, None)
    optimiser, _ = build_optimiser(exp, trainable_parameters(model, objective), exp.train.steps)
    batch = exp.train.batch_size
    data = exp.data.make_target().sample(batch * 4, generator=torch.Generator().manual_seed(0)).float().to(device)
    times = []
    for step in range(steps + 5):
        x = data[torch.randint(len(data), (batch,), device=device)]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, objective, optimiser, x, teacher=None, step=step, grad_clip=exp.optim.grad_clip, bf16=bf16)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="experiments/papers/lsd_checkerboard.yaml")
    parser.add_argument("--methods", nargs="+", help="member labels (default: every method of the study)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: the study's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget", type=int, help="steps to project (default: the study's base.train.steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="study overrides")
    args = parser.parse_args()
    study = load_study(args.study, args.set)
    labels = args.methods or list(study.methods)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    first = load_experiment(raw={**merged(study.base, study.methods[labels[0]]), "name": "probe"})
    batches = args.batch or [first.train.batch_size]
    budget = args.budget or first.train.steps
    print(f"{args.study}: network {first.network}, {name}, {'bf16' if args.bf16 else 'fp32'}, torch {torch.__version__}")
    print(f"{'member':>10s} {'batch':>8s} {'step ms':>9s} {'samples/s':>11s} {f'{budget} steps':>16s}")
    total = 0.0
    for label in labels:
        for batch in batches:
            seconds = measure(member(study, label, batch), args.steps, args.device, args.bf16)
            hours = seconds * budget / 3600
            total += hours if batch == batches[-1] else 0.0
            print(f"{label:>10s} {batch:8d} {1000 * seconds:9.2f} {batch / seconds:11.0f} {hours:14.2f} h")
    print(f"every member one after another, at batch {batches[-1]}: {total:.2f} h")


if __name__ == "__main__":
    main()
