"""What a sweep trial costs beyond its training loop, for both kinds of trial, beside Ray's own start-up.

    python experiments/benchmarks/sweep_overhead.py [--trials 4] [--steps 40] [--toy]

Measured in one process, one after another on the same machine:
- Ray start-up: `ray.init` of a local cluster (2 CPUs);
- a plain Tune function trial that does nothing (Tune's floor);
- the training loop alone (`run_loop` in this process, MLflow logging included, no Ray);
- `fmm sweep` trials of that loop run in the trial's own process (single-worker CPU trials);
- `fmm sweep` trials as TorchTrainers (`trial_mode: trainer`, Ray 2.60's documented pattern).
Each kind runs once with one trial and once with `--trials` trials, one trial at a time: the marginal
wall-clock of a trial, (wall(N) - wall(1)) / (N - 1), minus the loop time is its overhead; the rest
of wall(1) is the sweep's fixed cost (Tuner start, parent run, summary). With --toy it also runs
experiments/sweeps/flower_toy.yaml and prints trials per hour.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = {
    "name": "bench",
    "data": {"target": "flower"},
    "network": {"name": "mlp", "dim": 2, "width": 64, "depth": 2},
    "objective": {"name": "lmd", "diagonal_fraction": 0.25},
    "teacher": {"kind": "exact", "target": "flower"},
    "train": {"steps": 40, "batch_size": 256, "log_every": 20, "eval_every": 20, "eval_samples": 500,
              "eval_steps": [1]},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1},
}


def loop_seconds(folder: str, steps: int, reps: int = 3) -> float:
    from fmm.experiment.schema import load_experiment
    from fmm.jobs.train import open_run
    from fmm.worker.loop import run_loop
    from fmm.worker.sessions import LocalSession
    from fmm.worker.trainer import loop_config

    times = []
    for r in range(reps):
        raw = dict(BASE, name=f"loop-{r}", storage={"path": f"{folder}/runs"},
                   tracking={"uri": f"sqlite:///{folder}/mlflow.db", "experiment": "bench"})
        raw["train"] = dict(raw["train"], steps=steps)
        exp = load_experiment(raw=raw)
        record = open_run(exp)
        start = time.perf_counter()
        run_loop(loop_config(exp, record), LocalSession(loop_config(exp, record)["run_dir"]))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def noop_trials(trials: int) -> float:
    import ray.tune

    def trainable(config):
        ray.tune.report({"score": 1.0})

    start = time.perf_counter()
    ray.tune.Tuner(trainable, tune_config=ray.tune.TuneConfig(num_samples=trials, max_concurrent_trials=1),
                   run_config=ray.tune.RunConfig(storage_path=tempfile.mkdtemp(), verbose=0)).fit()
    return time.perf_counter() - start


def fmm_trials(folder: str, trials: int, steps: int, mode: str, tag: str) -> float:
    from fmm.experiment.sweep_schema import load_sweep
    from fmm.jobs.sweep import run_sweep

    with open(f"{folder}/base.yaml", "w") as f:
        yaml.safe_dump(dict(BASE, train=dict(BASE["train"], steps=steps)), f)
    sweep = {"name": f"bench-{mode}-{tag}", "base": "base.yaml", "space": {"optim.lr": {"float": [1e-3, 3e-3]}},
             "metric": "eval/sw2_steps001", "search": {"num_samples": trials, "max_concurrent_trials": 1},
             "scheduler": {"kind": "fifo"}, "storage": {"path": f"{folder}/sweeps"}, "trial_mode": mode,
             "tracking": {"uri": f"sqlite:///{folder}/mlflow.db", "experiment": "bench"}}
    with open(f"{folder}/sweep-{mode}-{tag}.yaml", "w") as f:
        yaml.safe_dump(sweep, f)
    config, base = load_sweep(f"{folder}/sweep-{mode}-{tag}.yaml")
    start = time.perf_counter()
    run_sweep(config, base, log=lambda *_: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--toy", action="store_true", help="also run the toy sweep and print trials per hour")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="fmm-sweep-bench-")

    loop = loop_seconds(folder, args.steps)
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    n = args.trials
    rows = []
    for label, run in (("plain Tune trial (no work)", lambda k, tag: noop_trials(k)),
                       ("fmm trial, loop in the trial process", lambda k, tag: fmm_trials(folder, k, args.steps,
                                                                                          "in_process", tag)),
                       ("fmm trial as a TorchTrainer", lambda k, tag: fmm_trials(folder, k, args.steps, "trainer",
                                                                                 tag))):
        one, many = run(1, "a"), run(n, "b")
        marginal = (many - one) / (n - 1)
        work = 0.0 if label.startswith("plain") else loop
        rows.append((label, one - marginal, marginal, marginal - work))
    print(f"{os.cpu_count()} CPUs; trials one at a time; the training loop alone ({args.steps} steps, MLflow "
          f"logging, 2 evaluations, final map and figure): {loop:.2f} s (median of 3)")
    print(f"Ray start-up (ray.init of a local cluster): {ray_start:.2f} s")
    print(f"{'':38s} {'fixed/sweep':>11s} {'per trial':>10s} {'overhead/trial':>15s}")
    for label, fixed, marginal, overhead in rows:
        print(f"{label:38s} {fixed:11.2f} {marginal:10.2f} {overhead:15.2f}")
    in_process, trainer = rows[1][3], rows[2][3]
    if in_process > 0.1:
        print(f"TorchTrainer / in-process overhead per trial: {trainer / in_process:.1f}x")
    else:  # a reused trial process runs the loop warm: its marginal cost is within noise of the loop's
        print(f"in-process trials add nothing measurable to the loop ({in_process:+.2f} s); a TorchTrainer "
              f"trial adds {trainer:.1f} s")
    if args.toy:
        from fmm.experiment.sweep_schema import load_sweep
        from fmm.jobs.sweep import run_sweep

        sweep, base = load_sweep(os.path.join(ROOT, "experiments", "sweeps", "flower_toy.yaml"),
                                 [f"storage.path={folder}/toy", f"tracking.uri=sqlite:///{folder}/mlflow.db"])
        start = time.perf_counter()
        grid = run_sweep(sweep, base, log=lambda *_: None)
        wall = time.perf_counter() - start
        print(f"toy sweep (experiments/sweeps/flower_toy.yaml): {len(grid)} trials in {wall:.0f} s, "
              f"{3600 * len(grid) / wall:.0f} trials per hour")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
