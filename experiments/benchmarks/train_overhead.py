"""What Ray Train and MLflow add to a training step: `fmm train` against a bare PyTorch loop.

    python experiments/benchmarks/train_overhead.py [--steps 400] [--objective lmd] [--repeat 1]

Both run the same objective, model, global batch and worker count:
- 1 worker: a bare in-process loop with 2 torch threads, against `fmm train` with one worker
  holding 2 CPUs;
- 2 workers: two bare processes (torch.multiprocessing, gloo, 1 thread each, gradients averaged
  by the same all-reduce), against `fmm train` with two workers of 1 CPU.
A third row runs `fmm train` not live (metrics written at checkpoints only, no system metrics), so
the cost of live logging is read against the same platform in the same run. Steady-state step time
is the median over logging windows after the first (fmm train's from its MLflow
`train/samples_per_s` history); start-up is the wall time not spent in steps. Peak memory
is the largest resident set of the training process (rank 0). With --repeat N the pairs run N times,
interleaved, and the summary gives the median overhead: on a shared 2-core machine one pair varies
by several percent either way.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BASE = {
    "data": {"target": "flower"},
    "network": {"name": "mlp", "dim": 2, "width": 256, "depth": 3},
    "teacher": {"kind": "exact", "target": "flower"},
    "optim": {"lr": 1e-3},
    "train": {"batch_size": 1024, "checkpoint_every": 200, "log_every": 50},
}


def experiment(name: str, objective: str, steps: int, workers: int, cpus: int, root: str, live: bool = True):
    """`live`: metrics flushed every 5 s and system metrics every 10 s (the defaults); off: metrics written
    at checkpoints only and no system metrics, as before live logging."""
    from fmm.experiment.schema import load_experiment

    raw = copy.deepcopy(BASE)
    tracking = {} if live else {"flush_seconds": 3600, "system_metrics_seconds": 0}
    raw.update(name=name, objective={"name": objective}, storage={"path": f"{root}/runs"},
               tracking={"uri": f"sqlite:///{root}/mlflow.db", "experiment": "bench", **tracking},
               scaling={"num_workers": workers, "cpus_per_worker": cpus})
    raw["train"]["steps"] = steps
    return load_experiment(raw=raw)


def bare_loop(rank: int, world: int, port: int, exp, out: str) -> None:
    """The same step as fmm train's workers, without Ray, MLflow or checkpoints."""
    from fmm.distributed import broadcast_parameters
    from fmm.objectives import make_objective
    from fmm.experiment.builders import build_interpolant, build_model, build_optimiser, build_teacher
    from fmm.experiment.data import DataSource
    from fmm.training import train_step, trainable_parameters

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(exp.scaling.cpus_per_worker)
    torch.manual_seed(0)
    interp = build_interpolant(exp)
    model = build_model(exp)
    objective = make_objective(dict(exp.objective), interp)
    teacher = build_teacher(exp, interp)
    objective.prepare(model, teacher)
    broadcast_parameters(model)
    optimiser, scheduler = build_optimiser(exp, trainable_parameters(model, objective), exp.train.steps)
    data = DataSource(exp.data.target, exp.data.path, rank, world, seed=rank, target_options=exp.data.target_options)
    per_worker = exp.train.batch_size // world
    windows, start = [], time.perf_counter()
    for step in range(exp.train.steps):
        train_step(model, objective, optimiser, data.batch(per_worker), teacher=teacher, step=step,
                   grad_clip=exp.optim.grad_clip)
        scheduler.step()
        if (step + 1) % exp.train.log_every == 0:
            now = time.perf_counter()
            windows.append((now - start) / exp.train.log_every)
            start = now
    if rank == 0:
        torch.save({"windows": windows, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)  # gloo can abort in a C++ destructor at interpreter exit (torch 2.13)


def run_bare(exp) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bare.pt")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        start = time.perf_counter()
        world = exp.scaling.num_workers
        if world == 1:
            bare_loop(0, 1, port, exp, out)
        else:
            mp.spawn(bare_loop, args=(world, port, exp, out), nprocs=world, join=True)
        wall = time.perf_counter() - start
        result = torch.load(out)
    step = statistics.median(result["windows"][1:])
    return step, wall - step * exp.train.steps, result["peak_mb"]


def run_fmm(exp) -> tuple[float, float, float]:
    from mlflow.tracking import MlflowClient

    from fmm.jobs.train import run_training

    start = time.perf_counter()
    result = run_training(exp, log=lambda *_: None)
    wall = time.perf_counter() - start
    rates = [m.value for m in MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id,
                                                                                  "train/samples_per_s")]
    step = statistics.median(exp.train.batch_size / r for r in rates[1:])
    peak = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.metrics.get("train/peak_rss_mb")
    return step, wall - step * exp.train.steps, peak if peak is not None else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--objective", default="lmd")
    parser.add_argument("--repeat", type=int, default=1, help="run each pair this many times (default: 1)")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"objective {args.objective}, MLP 2->256x3, global batch {BASE['train']['batch_size']}, {args.steps} steps")
    print(f"{'workers':8s} {'loop':9s} {'step ms':>8s} {'overhead':>9s} {'start-up s':>11s} {'peak MB':>8s}")
    overheads: dict[int, list[float]] = {1: [], 2: []}
    live_cost: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeat):
            for workers, cpus in ((1, 2), (2, 1)):
                exp = experiment(f"bench-{workers}-{repeat}", args.objective, args.steps, workers, cpus, root)
                bare = run_bare(exp)
                ours = run_fmm(exp)
                quiet = run_fmm(experiment(f"quiet-{workers}-{repeat}", args.objective, args.steps, workers, cpus,
                                           root, live=False))
                overheads[workers].append(ours[0] / bare[0] - 1)
                live_cost[workers].append(ours[0] / quiet[0] - 1)
                print(f"{workers:<8d} {'bare':9s} {1000 * bare[0]:8.2f} {'':>9s} {bare[1]:11.1f} {bare[2]:8.0f}")
                print(f"{workers:<8d} {'fmm train':9s} {1000 * ours[0]:8.2f} {100 * overheads[workers][-1]:8.1f}% "
                      f"{ours[1]:11.1f} {ours[2]:8.0f}")
                print(f"{workers:<8d} {'not live':9s} {1000 * quiet[0]:8.2f} {100 * (quiet[0] / bare[0] - 1):8.1f}% "
                      f"{quiet[1]:11.1f} {quiet[2]:8.0f}")
    if args.repeat > 1:
        for workers, values in overheads.items():
            print(f"{workers} worker(s): median overhead {100 * statistics.median(values):+.1f}% over {len(values)} "
                  f"pairs ({', '.join(f'{100 * v:+.1f}%' for v in values)}); live logging against not live "
                  f"{100 * statistics.median(live_cost[workers]):+.1f}% "
                  f"({', '.join(f'{100 * v:+.1f}%' for v in live_cost[workers])})")
    ray.shutdown()


if __name__ == "__main__":
    main()
