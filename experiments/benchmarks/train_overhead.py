"""What Ray Train and MLflow add to a training step: `fmm train` against a bare PyTorch loop.

    python experiments/benchmarks/train_overhead.py [--steps 400] [--objective lmd] [--repeat 1] [--workers 1 2]

Both run the same objective, model, global batch and worker count:
- 1 worker: a bare in-process loop with 2 torch threads, against `fmm train` with one worker
  holding 2 CPUs;
- 2 workers: two bare processes (torch.multiprocessing, gloo, 1 thread each, gradients averaged
  by the same all-reduce), against `fmm train` with two workers of 1 CPU.
A third row runs `fmm train` not live (metrics written at checkpoints only, no system metrics), so
the cost of live logging is read against the same platform in the same run; with 1 worker a fourth
runs fmm's training loop in this process without Ray (the loop, its EMA, live MLflow logging and
checkpoints, as `fmm train`'s worker runs them), which splits the overhead into the loop's and Ray's
(its controller and agents share the cores with the worker). Steady-state step time
is the median over logging windows after the first (fmm train's from its MLflow
`train/samples_per_s` history); start-up is the wall time not spent in steps. Peak memory
is the largest resident set of the training process (rank 0). With --repeat N the rows run N times,
interleaved, and the summary gives each row's overhead over the bare loop of its own round: the
median and the mean with its 95% t interval over rounds. On a shared 2-core machine one round varies
by several percent either way, so a budget of a few percent needs several rounds to be resolved.
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


def from_mlflow(exp, uri: str, run_id: str, wall: float) -> tuple[float, float, float]:
    """(steady step, start-up, peak MB) of a finished run, from its MLflow `train/samples_per_s` history."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    rates = [m.value for m in client.get_metric_history(run_id, "train/samples_per_s")]
    step = statistics.median(exp.train.batch_size / r for r in rates[1:])
    peak = client.get_run(run_id).data.metrics.get("train/peak_rss_mb")
    return step, wall - step * exp.train.steps, peak if peak is not None else float("nan")


def run_fmm(exp) -> tuple[float, float, float]:
    from fmm.jobs.train import run_training

    start = time.perf_counter()
    result = run_training(exp, log=lambda *_: None)
    return from_mlflow(exp, result.tracking_uri, result.mlflow_run_id, time.perf_counter() - start)


def run_in_process(exp) -> tuple[float, float, float]:
    """fmm's training loop in this process, without Ray: what `fmm train`'s one worker runs."""
    from fmm.jobs.train import open_run
    from fmm.worker.loop import run_loop
    from fmm.worker.sessions import LocalSession
    from fmm.worker.trainer import loop_config

    start = time.perf_counter()
    record = open_run(exp)
    config = loop_config(exp, record)
    run_loop(config, LocalSession(config["run_dir"]))
    return from_mlflow(exp, record.tracking_uri, record.mlflow_run_id, time.perf_counter() - start)


def summary(name: str, values: list[float]) -> str:
    from fmm.evaluation.intervals import estimate

    e = estimate(values)
    interval = f" [{100 * e.low:+.1f}, {100 * e.high:+.1f}]" if e.has_interval else ""
    return (f"{name}: median {100 * statistics.median(values):+.1f}%, mean {100 * e.mean:+.1f}%{interval} over "
            f"{len(values)} rounds ({', '.join(f'{100 * v:+.1f}%' for v in values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--objective", default="lmd")
    parser.add_argument("--repeat", type=int, default=1, help="run each row this many times (default: 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                        help="worker counts to measure (default: 1 2)")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"objective {args.objective}, MLP 2->256x3, global batch {BASE['train']['batch_size']}, {args.steps} steps")
    print(f"{'workers':8s} {'loop':9s} {'step ms':>8s} {'overhead':>9s} {'start-up s':>11s} {'peak MB':>8s}")
    rows: dict[tuple[int, str], list[float]] = {}  # (workers, row) -> step time over the bare loop's, - 1
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeat):
            for workers in args.workers:
                cpus = 2 // workers
                exp = experiment(f"bench-{workers}-{repeat}", args.objective, args.steps, workers, cpus, root)
                bare = run_bare(exp)
                print(f"{workers:<8d} {'bare':9s} {1000 * bare[0]:8.2f} {'':>9s} {bare[1]:11.1f} {bare[2]:8.0f}", flush=True)
                runs = {"fmm train": lambda: run_fmm(exp),
                        "not live": lambda: run_fmm(experiment(f"quiet-{workers}-{repeat}", args.objective, args.steps,
                                                               workers, cpus, root, live=False))}
                if workers == 1:
                    runs["no Ray"] = lambda: run_in_process(experiment(f"inproc-{repeat}", args.objective, args.steps,
                                                                       workers, cpus, root))
                for row, run in runs.items():
                    ours = run()
                    rows.setdefault((workers, row), []).append(ours[0] / bare[0] - 1)
                    print(f"{workers:<8d} {row:9s} {1000 * ours[0]:8.2f} {100 * rows[workers, row][-1]:8.1f}% "
                          f"{ours[1]:11.1f} {ours[2]:8.0f}", flush=True)
    print("step time over the same round's bare loop:")
    for (workers, row), values in rows.items():
        print("  " + summary(f"{workers} worker(s), {row}", values))
    ray.shutdown()


if __name__ == "__main__":
    main()
