"""The training loop of one worker, as a straight line: build, restore, then step, roll back, log,
evaluate and checkpoint until the budget is spent; finish with the flow maps in MLflow.

Data parallel over torch.distributed (gloo on CPU, NCCL on GPU, set up by Ray). Gradients are
averaged by fmm.training.train_step rather than by a DistributedDataParallel wrapper, because
torch.func JVPs cannot run through one. Each worker has its own seed and its own part of the data;
the model starts identical everywhere (rank 0's weights are broadcast), and the replicas are
checked to agree at the end. Every `checkpoint_every` steps rank 0 writes the training state and
every worker reports to its session (fmm.worker.sessions), which keeps the checkpoint on the run's
storage. Rank 0 logs to the run's MLflow run; the other ranks log nothing.
"""

from __future__ import annotations

import copy
import math
import os
import resource
import shutil
import signal
import tempfile
import time
from typing import Any

import torch

from fmm import __version__
from fmm.distributed import broadcast_parameters, check_replicas_agree
from fmm.evaluation.figures import close, sample_figure
from fmm.evaluation.protocol import Scorer, reference_sets
from fmm.experiment.builders import (build_interpolant, build_model, build_objective, build_optimiser, build_teacher,
                                     eval_metric, initial_map)
from fmm.experiment.data import DataSource
from fmm.experiment.schema import ExperimentConfig
from fmm.infra import models, storage
from fmm.infra.tracking import LiveLogger, system_metrics
from fmm.objectives import sampler_for
from fmm.training import train_step, trainable_parameters
from fmm.worker.sessions import Session
from fmm.worker.state import (State, export_flow_map, restore_checkpoint, rollback, save_state, snapshot,
                              update_ema, ema_decay_at)


def run_loop(config: dict[str, Any], session: Session) -> dict[str, Any]:
    """Train one worker of the run described by `config` (the experiment, its MLflow run and its storage
    folder; see fmm.worker.trainer.loop_config). Returns the last step and the best checkpoint's loss."""
    exp = ExperimentConfig(**config["experiment"])
    rank, world, device = session.rank, session.world, session.device
    torch.set_num_threads(exp.scaling.cpus_per_worker)

    # Build: the same initial weights everywhere (rank 0's are broadcast after the restore).
    torch.manual_seed(exp.train.seed)
    interpolant = build_interpolant(exp)
    model = build_model(exp).to(device)
    objective = build_objective(exp, interpolant).to(device)
    teacher = build_teacher(exp, interpolant)
    if hasattr(teacher, "to"):
        teacher = teacher.to(device)
    source = initial_map(exp, teacher)  # the student starts from its teacher (init), before any copy of it
    if source is not None:
        model.start_from(source)
    objective.prepare(model, teacher)
    optimiser, scheduler = build_optimiser(exp, trainable_parameters(model, objective), exp.train.steps)
    state = State(model, copy.deepcopy(model).requires_grad_(False), objective, optimiser, scheduler)

    # Restore: the newest intact checkpoint, if the run has one.
    restored_from = restore_checkpoint(state, session.latest_checkpoint(), config["run_dir"],
                                       log=print if rank == 0 else lambda *_: None)
    for module in (model, objective, state.ema):
        broadcast_parameters(module)
    uri, run_id = config["tracking_uri"], config["mlflow_run_id"]
    logger = LiveLogger(uri, run_id, exp.tracking.flush_seconds) if rank == 0 else NullLogger()
    monitor = system_metrics(uri, run_id, exp.tracking.system_metrics_seconds, session.node,
                             resume=restored_from is not None) if session.local_rank == 0 else None
    if restored_from is not None:
        where, warning = restored_from
        logger.set_tags({"restored_from": where, **({"corrupt_checkpoint": warning} if warning else {})})

    data = reseed(exp, state, rank, world)
    per_worker = exp.train.batch_size // world
    last_good = snapshot(state, exp)  # what a non-finite step rolls back to: the last checkpoint
    faults = FaultInjection(exp, rank, world, restored=restored_from is not None)
    autocast = exp.train.precision == "bf16" and device.type == "cuda"
    periodic = PeriodicEvaluation(exp, interpolant, tuple(model.sample_shape), device) \
        if rank == 0 and exp.train.eval_every else None
    progress = Progress(exp, state.step)
    best: dict[str, Any] = {"loss": math.inf}
    latest_eval: dict[str, float] = {}
    local_dir = tempfile.mkdtemp(prefix="fmm-") if rank == 0 else None  # the best EMA map until the end
    if rank == 0:
        print(f"[fmm] {exp.name}: steps {state.step} -> {exp.train.steps}, {world} worker(s) on {device}, "
              f"global batch {per_worker * world}, fmm {__version__}", flush=True)

    try:
        while state.step < exp.train.steps:
            # Step.
            faults.before_step(state.step + 1)
            batch = faults.batch(data.batch(per_worker).to(device), state.step + 1)
            logs = train_step(model, objective, optimiser, batch, teacher=teacher, step=state.step,
                              grad_clip=exp.optim.grad_clip, bf16=autocast)

            # Roll back: the same decision on every worker (train_step averages a NaN norm).
            if logs["skipped"]:
                roll_back(state, last_good, exp, logs, logger)
                data = reseed(exp, state, rank, world)
                progress.restart(state.step)
                continue
            scheduler.step()
            update_ema(state.ema, model, ema_decay_at(exp.train.ema_decay, state.step))
            state.step += 1
            loss = float(logs["loss"])
            progress.add(loss)

            # Log.
            if state.step % exp.train.log_every == 0 or state.step == exp.train.steps:
                logger.log_metrics(progress.metrics(state.step, logs, scheduler.get_last_lr()[0]), state.step)
                if rank == 0:
                    progress.print(state.step)

            # Evaluate (rank 0; the others wait at the report).
            evaluating = bool(exp.train.eval_every) and state.step % exp.train.eval_every == 0
            if periodic is not None and evaluating:
                latest_eval = periodic(state.ema)
                logger.log_metrics(latest_eval, state.step)
                periodic.log_samples(state.ema, logger, state.step)

            # Checkpoint and report.
            checkpointing = state.step % exp.train.checkpoint_every == 0 or state.step == exp.train.steps
            if checkpointing or evaluating:
                report = {"step": state.step, "loss": loss, **latest_eval, "mlflow_run_id": config["mlflow_run_id"]}
                if checkpointing:
                    last_good = snapshot(state, exp)
                with tempfile.TemporaryDirectory() as folder:
                    name = f"step_{state.step:08d}"
                    if rank == 0 and checkpointing:
                        save_state(state, exp, folder, {"step": state.step, "loss": loss})
                        logger.flush()
                    session.report(report, folder if rank == 0 and checkpointing else None, name)
                    if rank == 0 and checkpointing:
                        logger.set_tags({"checkpoint_latest": storage.join(config["run_dir"], name)})
                        if loss < best["loss"]:
                            best = {"loss": loss, "step": state.step}
                            export_flow_map(os.path.join(folder, "state.pt"), os.path.join(local_dir, "best.pt"))

        # Finish: the replicas must agree; rank 0 logs the flow maps, the curve and a figure.
        check_replicas_agree(trainable_parameters(model, objective))
        if rank == 0:
            if periodic is not None:
                periodic.log_curve(logger)
            finish_run(state, exp, logger, best, device, local_dir)
    finally:
        logger.flush()  # what was logged before a failure reaches MLflow; a restart does not log those steps again
        if monitor is not None:
            monitor.finish()
        if local_dir is not None:
            shutil.rmtree(local_dir, ignore_errors=True)
    return {"step": state.step, "best": best}


def reseed(exp: ExperimentConfig, state: State, rank: int, world: int) -> DataSource:
    """Each worker draws its own noise and batches; after a restart or a rollback the streams move on."""
    offset = exp.train.seed + 1000 * rank + state.step + 7919 * state.rollbacks
    torch.manual_seed(offset)
    return DataSource(exp.data.target, exp.data.path, rank, world, seed=offset + 1, buffer_rows=exp.data.buffer_rows,
                      target_options=exp.data.target_options)


def roll_back(state: State, last_good: bytes, exp: ExperimentConfig, logs: dict[str, Any], logger) -> None:
    """A non-finite loss or gradient: back to the last checkpoint with the learning rate lowered, or, after
    train.max_rollbacks of those, a FloatingPointError that ends the run with its reason."""
    bad_step = state.step + 1
    if state.rollbacks >= exp.train.max_rollbacks:
        raise FloatingPointError(
            f"loss is {float(logs['loss'])} with gradient norm {float(logs['grad_norm'])} at step {bad_step}, "
            f"after {state.rollbacks} rollback(s) to the last checkpoint with the learning rate lowered "
            f"each time (train.max_rollbacks = {exp.train.max_rollbacks})")
    rollback(state, last_good, exp.train.rollback_lr_factor)
    logger.discard_after(state.step)
    logger.log_event({"train/rollbacks": state.rollbacks, "train/lr": state.scheduler.get_last_lr()[0]}, state.step)
    if isinstance(logger, LiveLogger):
        print(f"[fmm] step {bad_step}: loss or gradient not finite; back to step {state.step} with the learning "
              f"rate x{exp.train.rollback_lr_factor} (rollback {state.rollbacks} of at most "
              f"{exp.train.max_rollbacks})", flush=True)


def finish_run(state: State, exp: ExperimentConfig, logger: LiveLogger, best: dict, device, local_dir: str) -> None:
    """Rank 0 at the end: final and best EMA flow maps as MLflow artifacts and as MLflow models (`model`,
    `best_model`: registrable, fmm.infra.models), and a sample figure (also as the `samples` image at the
    last step, beside those of the periodic evaluations)."""
    with tempfile.TemporaryDirectory() as folder:
        save_state(state, exp, folder, {"step": state.step})
        final = os.path.join(folder, "final.pt")
        export_flow_map(os.path.join(folder, "state.pt"), final)
        logger.log_artifact(final, "checkpoints")
        models.log_flow_map_model(logger.uri, logger.run_id, final, "model")
    best_path = os.path.join(local_dir, "best.pt")
    if os.path.isfile(best_path):
        logger.log_artifact(best_path, "checkpoints")
        models.log_flow_map_model(logger.uri, logger.run_id, best_path, "best_model")
        logger.set_tags({"best_step": best.get("step", ""), "best_loss": best.get("loss", "")})
    logger.log_event({"train/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, state.step)
    shape = tuple(state.model.sample_shape)
    if len(shape) == 1 and shape[0] != 2:
        logger.flush()
        return
    interpolant = build_interpolant(exp)
    sampler, _ = sampler_for(exp.objective, interpolant, seed=exp.train.seed + 8)
    fig = sample_figure(state.ema, shape, exp.train.sample_steps, device, exp.train.seed, sampler, interpolant.sigma0)
    logger.log_figure(fig, f"samples/step_{state.step:08d}.png")
    logger.log_image(fig, "samples", state.step)
    close(fig)
    logger.flush()


class NullLogger:
    """What the ranks other than 0 log: nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_event(self, metrics: dict[str, float], step: int) -> None: ...

    def discard_after(self, step: int) -> None: ...

    def flush(self) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


class Progress:
    """The mean loss since the last log line and the throughput, for the log line and MLflow."""

    def __init__(self, exp: ExperimentConfig, step: int):
        self.exp = exp
        self.restart(step)

    def restart(self, step: int) -> None:
        self.window: list[float] = []
        self.last_time, self.last_step = time.perf_counter(), step

    def add(self, loss: float) -> None:
        self.window.append(loss)

    def metrics(self, step: int, logs: dict[str, Any], lr: float) -> dict[str, float]:
        now = time.perf_counter()
        steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
        rate = steps_per_s * self.exp.train.batch_size
        self.eta = (self.exp.train.steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
        self.last_time, self.last_step = now, step
        self.latest = {"train/loss": sum(self.window) / len(self.window), "train/lr": lr, "train/samples_per_s": rate}
        if "grad_norm" in logs:
            self.latest["train/grad_norm"] = float(logs["grad_norm"])
        self.latest.update({f"train/{k}": float(v) for k, v in logs.items() if k.startswith("mse_")})
        self.window = []
        return self.latest

    def print(self, step: int) -> None:
        """`[fmm] step    100/3000 (  3%)  loss 0.4578  lr 1.00e-03  11,529 samples/s  ETA 00:04:13`: the ETA
        at the rate since the last line."""
        m, total = self.latest, self.exp.train.steps
        eta = time.strftime("%H:%M:%S", time.gmtime(self.eta)) if self.eta < 86400 else (
            f"{self.eta / 86400:.1f} days" if math.isfinite(self.eta) else "-")
        print(f"[fmm] step {step:6d}/{total} ({100 * step // total:3d}%)  loss {m['train/loss']:.4f}  "
              f"lr {m['train/lr']:.2e}  {m['train/samples_per_s']:,.0f} samples/s  ETA {eta}", flush=True)


class FaultInjection:
    """train.debug: the last worker raises once at `fail_at_step`, or kills its own process with SIGKILL at
    `kill_at_step` (no exception, no clean-up: what a worker the OOM killer took leaves behind), both never
    after a restart, or sees a NaN batch once at `nan_at_step`, to exercise recovery end to end."""

    def __init__(self, exp: ExperimentConfig, rank: int, world: int, restored: bool):
        debug = exp.train.debug
        last = rank == world - 1
        self.fail_at = debug.fail_at_step if debug is not None and last and not restored else None
        self.kill_at = debug.kill_at_step if debug is not None and last and not restored else None
        self.nan_at = debug.nan_at_step if debug is not None and last else None

    def before_step(self, step: int) -> None:
        if step == self.fail_at:
            raise RuntimeError(f"injected failure at step {step} (train.debug.fail_at_step)")
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def batch(self, batch: torch.Tensor, step: int) -> torch.Tensor:
        if step == self.nan_at:
            self.nan_at = None
            return batch * float("nan")
        return batch


class PeriodicEvaluation:
    """One quality metric of the EMA map at a few step counts, every `eval_every` training steps (rank 0
    only), sampled with the method's own sampler: `eval_metric` (sliced W2 for vectors and the
    classifier-feature distance for images by default; FID where the Inception weights are at hand)."""

    def __init__(self, exp: ExperimentConfig, interpolant, shape: tuple[int, ...], device):
        self.sampler, _ = sampler_for(exp.objective, interpolant, seed=exp.train.seed + 8)
        self.shape, self.seed, self.sigma0 = shape, exp.train.seed, interpolant.sigma0
        n, sets = exp.train.eval_samples, exp.train.eval_sets
        g = torch.Generator().manual_seed(exp.train.seed + 7)
        self.noise = [(interpolant.sigma0 * torch.randn((n, *shape), generator=g)).to(device)]
        self.steps = exp.train.eval_steps
        metric = eval_metric(exp)
        references, labelled = reference_sets(exp, shape, n, sets, lambda j: g, labelled=metric == "fd_classifier")
        self.noise += [(interpolant.sigma0 * torch.randn((n, *shape), generator=g)).to(device) for _ in range(sets - 1)]
        self.scorers = [Scorer(shape, reference, wanted=[metric], labelled=labelled) for reference in references]
        self.curve: dict[int, dict[str, float]] = {}

    def __call__(self, ema) -> dict[str, float]:
        """`eval/<metric>_stepsNNN`: the mean over `train.eval_sets` evaluation sets (what a sweep optimises)."""
        out = {}
        self.curve = {}
        with torch.no_grad():
            for k in self.steps:
                per_set = [scorer(self.sampler(ema, noise, k).samples) for noise, scorer in zip(self.noise, self.scorers)]
                scores = {name: sum(s[name] for s in per_set) / len(per_set) for name in per_set[0]}
                self.curve[k] = scores
                out.update({f"eval/{name}_steps{k:03d}": value for name, value in scores.items()})
        return out

    def log_curve(self, logger: LiveLogger) -> None:
        """The last evaluation as quality against sampling steps: `<metric>_vs_steps` with step = steps,
        so MLflow charts it as the run's quality-versus-steps curve."""
        for k, scores in self.curve.items():
            logger.log_event({f"{name}_vs_steps": value for name, value in scores.items()}, k)

    def log_samples(self, ema, logger: LiveLogger, step: int) -> None:
        """Samples of the EMA map at this training step as the run's `samples` image (the UI's step slider
        walks through training); for 2-D points and images only."""
        if len(self.shape) == 1 and self.shape[0] != 2:
            return
        fig = sample_figure(ema, self.shape, self.steps, self.noise[0].device, self.seed, self.sampler, self.sigma0)
        logger.log_image(fig, "samples", step)
        close(fig)
