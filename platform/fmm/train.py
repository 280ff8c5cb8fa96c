"""`fmm train`: one experiment as a Ray Train TorchTrainer job, tracked in MLflow.

Driver (`run_training`): validates everything that can fail before workers start (config,
storage writable, data present and shaped like the network, teacher present), creates or reuses
the MLflow run, records the run in `<storage>/<name>/fmm_run.json`, starts or joins Ray and fits a
TorchTrainer. The Ray run name and the MLflow run id point at each other (the run's tag
`ray_run` and the record's `mlflow_run_id`), so a restarted or resumed run logs into the same
MLflow run.

Workers (`train_loop_per_worker`): data parallel over torch.distributed (gloo on CPU, NCCL on
GPU, set up by Ray). Gradients are averaged by fmm.training.train_step rather than by a
DistributedDataParallel wrapper, because torch.func JVPs cannot run through one. Each worker has
its own seed and its own part of the data; the model starts identical everywhere (rank 0's
weights are broadcast). Every `checkpoint_every` steps rank 0 writes model, EMA, optimiser,
schedule, objective state, step and the resolved config, and every worker calls
ray.train.report; Ray uploads the checkpoint to the run's storage (a folder or s3://).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from fmm import storage
from fmm.experiment import ExperimentConfig

RUN_RECORD = "fmm_run.json"


# -- building the pieces -------------------------------------------------------------------------

def build_interpolant(exp: ExperimentConfig):
    from fmm.interpolants import Interpolant, make_schedule

    spec = exp.interpolant
    return Interpolant(make_schedule(spec.schedule, **spec.params), spec.sigma0, spec.latent_noise)


def build_model(exp: ExperimentConfig):
    from fmm.flowmap import FlowMap
    from fmm.nets import make_network

    network = dict(exp.network)
    return FlowMap(make_network(network.pop("name"), **network))


def build_teacher(exp: ExperimentConfig, interpolant):
    from fmm.teachers import make_teacher

    if exp.teacher is None:
        return None
    spec = dict(exp.teacher)
    if spec.get("kind") == "checkpoint" and "tracking_uri" not in spec:
        spec["tracking_uri"] = exp.tracking.uri
    return make_teacher(spec, interpolant)


def lr_factor(optim, step: int) -> float:
    """Linear warm-up, then constant, cosine to zero, or 1/sqrt(step / decay_start) (LSD's schedule)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "sqrt" and optim.decay_start and step > optim.decay_start:
        return 1 / math.sqrt(step / optim.decay_start)
    return 1.0


def build_optimiser(exp: ExperimentConfig, params, total_steps: int):
    optim = exp.optim
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[optim.name]
    optimiser = cls(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    if optim.decay == "cosine":
        def factor(step: int) -> float:
            warm = lr_factor(optim, step)
            if step < optim.warmup_steps:
                return warm
            progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    else:
        def factor(step: int) -> float:
            return lr_factor(optim, step)
    return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


class DataSource:
    """Random batches from this worker's part of the Parquet shards, or exact draws of a toy target."""

    def __init__(self, exp: ExperimentConfig, rank: int, world: int, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        if exp.data.target is not None:
            from fmm.groundtruth import make_target

            self.target, self.x = make_target(exp.data.target), None
            self.shape = (self.target.dim,)
        else:
            from fmm.data import read_part

            self.target = None
            self.x, manifest = read_part(exp.data.path, rank, world)
            self.shape = tuple(manifest["shape"])

    def batch(self, n: int) -> torch.Tensor:
        if self.target is not None:
            return self.target.sample(n, self.generator).float()
        return self.x[torch.randint(len(self.x), (n,), generator=self.generator)]


def data_shape(exp: ExperimentConfig) -> tuple[int, ...]:
    if exp.data.target is not None:
        from fmm.groundtruth import make_target

        return (make_target(exp.data.target).dim,)
    from fmm.data import read_manifest

    return tuple(read_manifest(exp.data.path)["shape"])


def validate_before_start(exp: ExperimentConfig) -> None:
    """Everything that can be checked without workers, each failure one clear ValueError."""
    from fmm.objectives import make_objective

    if exp.train.precision == "bf16" and not exp.scaling.use_gpu:
        raise ValueError("train.precision 'bf16' is autocast on GPU: set scaling.use_gpu true or use 'fp32'.")
    interpolant = build_interpolant(exp)
    model = build_model(exp)
    shape = data_shape(exp)
    if tuple(model.sample_shape) != shape:
        raise ValueError(f"the data's samples have shape {list(shape)} but network {exp.network['name']!r} "
                         f"takes {list(model.sample_shape)}: fix the network keys or data.")
    objective = make_objective(dict(exp.objective), interpolant)
    objective.prepare(model, build_teacher(exp, interpolant))
    image_metric = exp.train.eval_metric in ("fid", "fd_classifier")
    if exp.train.eval_metric != "auto" and image_metric != (len(shape) == 3):
        raise ValueError(f"train.eval_metric {exp.train.eval_metric!r} does not apply to samples of shape "
                         f"{list(shape)}: use fid or fd_classifier for images, sw2, energy or mmd for vectors.")
    storage.check_writable(exp.storage.path, "storage.path")


# -- checkpoints ---------------------------------------------------------------------------------

@dataclass
class State:
    model: Any
    ema: Any
    objective: Any
    optimiser: Any
    scheduler: Any
    step: int = 0
    rollbacks: int = 0   # how often a non-finite step sent the run back to its last checkpoint


CHECKSUM = "state.sha256"


def state_payload(state: State, exp: ExperimentConfig, metrics: dict[str, float]) -> dict[str, Any]:
    return {"format": "fmm-train/1", "model": state.model.state_dict(), "ema": state.ema.state_dict(),
            "objective": state.objective.state_dict(), "optimiser": state.optimiser.state_dict(),
            "scheduler": state.scheduler.state_dict(), "step": state.step, "rollbacks": state.rollbacks,
            "config": exp.model_dump(), "network": state.model.net.config, "metrics": metrics}


def save_state(state: State, exp: ExperimentConfig, folder: str, metrics: dict[str, float]) -> None:
    """state.pt, then its SHA-256 in state.sha256: a checkpoint counts only once both are there and agree."""
    import hashlib

    path = os.path.join(folder, "state.pt")
    torch.save(state_payload(state, exp, metrics), path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(folder, CHECKSUM), "w") as f:
        f.write(digest + "\n")


class CorruptCheckpoint(ValueError):
    pass


def verify_state(folder: str) -> str:
    """The path of the folder's state.pt if its checksum holds; else CorruptCheckpoint naming the file."""
    import hashlib

    path = os.path.join(folder, "state.pt")
    if not os.path.isfile(path):
        raise CorruptCheckpoint(f"{path} is missing")
    try:
        with open(os.path.join(folder, CHECKSUM)) as f:
            expected = f.read().strip()
    except OSError:
        raise CorruptCheckpoint(f"{path} has no {CHECKSUM} (written partly, or not by fmm)") from None
    with open(path, "rb") as f:
        actual = hashlib.sha256(f.read()).hexdigest()
    if actual != expected:
        raise CorruptCheckpoint(f"{path} does not match its checksum (truncated or corrupt)")
    return path


def load_state(state: State, folder: str) -> None:
    payload = torch.load(verify_state(folder), map_location="cpu", weights_only=False)
    apply_payload(state, payload)


def apply_payload(state: State, payload: dict[str, Any]) -> None:
    state.model.load_state_dict(payload["model"])
    state.ema.load_state_dict(payload["ema"])
    state.objective.load_state_dict(payload["objective"])
    state.optimiser.load_state_dict(payload["optimiser"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.step = payload["step"]
    state.rollbacks = payload.get("rollbacks", 0)


def restore_checkpoint(state: State, checkpoint, run_dir: str, log=print) -> tuple[str, str | None] | None:
    """Load the newest intact checkpoint of the run: among Ray's latest (`checkpoint`, may be None) and
    the run's step_* folders, the newest whose checksum holds. A worker can die after its checkpoint is
    on storage but before Ray's controller has registered it; that checkpoint is complete, and the
    metrics up to it are in MLflow, so it is the one to continue from. A corrupt one is passed over
    with a warning naming the file. Returns where the state came from and the warning, if any; None
    when the run has no checkpoint yet."""
    import pyarrow.fs as pafs
    import ray.train

    fs, root = storage.filesystem(run_dir)
    latest = os.path.basename(checkpoint.path.rstrip("/")) if checkpoint is not None else None
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if info.type == pafs.FileType.Directory and info.base_name.startswith("step_")}
    if latest is not None:
        names.add(latest)
    if not names:
        return None
    bad: list[str] = []
    for name in sorted(names, reverse=True):
        candidate = checkpoint if name == latest else ray.train.Checkpoint(path=f"{root}/{name}", filesystem=fs)
        with candidate.as_directory() as folder:
            try:
                load_state(state, folder)
            except CorruptCheckpoint as err:
                bad.append(str(err))
                continue
        warning = None
        if bad:
            warning = f"checkpoint {'; '.join(bad)}; resuming from the previous one, {run_dir}/{name}"
            log(f"[fmm] warning: {warning}")
        return f"{run_dir}/{name}", warning
    raise CorruptCheckpoint(f"no intact checkpoint under {run_dir} ({'; '.join(bad)})")


def export_flow_map(state_path: str, out_path: str) -> None:
    """A training checkpoint's EMA weights as a flow-map file (what teachers and samplers load)."""
    payload = torch.load(state_path, map_location="cpu", weights_only=False)
    torch.save({"format": "fmm-flowmap/1", "network": payload["network"], "model": payload["ema"], "ema": None,
                "config": payload["config"], "step": payload["step"]}, out_path)


# -- the per-worker loop -------------------------------------------------------------------------

def ema_decay_at(decay: float, step: int) -> float:
    """The configured decay, warmed up as (1 + step) / (10 + step) so that the average forgets the
    untrained initial weights early (with a fixed 0.995, 22% of them would remain after 300 steps)."""
    return min(decay, (1 + step) / (10 + step))


def _update_ema(ema, model, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)
        for be, b in zip(ema.buffers(), model.buffers()):
            be.copy_(b)


def sample_figure(ema, shape, steps: list[int], device, seed: int, sampler=None, sigma0: float = 1.0):
    """Samples at each step count (a scatter for 2-D points, a 4x4 grid for images), drawn with
    `sampler(model, noise, steps)` (the flow-map chain by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmm.sampling import make_sampler

    sampler = sampler or make_sampler("flow_map")
    g = torch.Generator().manual_seed(seed)
    n = 2000 if len(shape) == 1 else 16
    noise = (sigma0 * torch.randn((n, *shape), generator=g)).to(device)
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3.2), squeeze=False)
    with torch.no_grad():
        for ax, k in zip(axes[0], steps):
            x = sampler(ema, noise, k).samples.float().cpu()
            if len(shape) == 1:
                ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
                ax.set_aspect("equal")
            else:
                c, h, w = shape
                grid = x.clamp(-1, 1).add(1).div(2).reshape(4, 4, c, h, w).permute(0, 3, 1, 4, 2).reshape(4 * h, 4 * w, c)
                ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if c == 1 else None)
                ax.axis("off")
            ax.set_title(f"{k} step{'s' if k > 1 else ''}")
    fig.tight_layout()
    return fig


def reported_metrics(exp: ExperimentConfig) -> list[str]:
    """The metric names every report of the loop carries (what a sweep may optimise): the loss, and with
    train.eval_every the periodic evaluation's primary metric at each of train.eval_steps."""
    if not exp.train.eval_every:
        return ["loss"]
    return ["loss"] + [f"eval/{eval_metric(exp)}_steps{k:03d}" for k in exp.train.eval_steps]


def eval_metric(exp: ExperimentConfig) -> str:
    """train.eval_metric, or by default sliced W2 for vectors and the classifier-feature distance for images."""
    if exp.train.eval_metric != "auto":
        return exp.train.eval_metric
    return "fd_classifier" if len(data_shape(exp)) == 3 else "sw2"


class PeriodicEvaluation:
    """One quality metric of the EMA map at a few step counts, every `eval_every` training steps (rank 0
    only), sampled with the method's own sampler: `eval_metric` (sliced W2 for vectors and the
    classifier-feature distance for images by default; FID where the Inception weights are at hand)."""

    def __init__(self, exp: ExperimentConfig, interpolant, shape: tuple[int, ...], device):
        from fmm.evaluate import Scorer
        from fmm.objectives import sampler_for

        self.sampler, _ = sampler_for(exp.objective, interpolant, seed=exp.train.seed + 8)
        n = exp.train.eval_samples
        g = torch.Generator().manual_seed(exp.train.seed + 7)
        self.noise = (interpolant.sigma0 * torch.randn((n, *shape), generator=g)).to(device)
        self.steps = exp.train.eval_steps
        metric = eval_metric(exp)
        if exp.data.target is not None:
            from fmm.groundtruth import make_target

            self.scorer = Scorer(shape, make_target(exp.data.target).sample(n, g), wanted=[metric])
        else:
            from fmm.data import read_labels, read_part

            data, manifest = read_part(exp.data.path)
            reference = data[torch.randperm(len(data), generator=g)[:n]]
            labelled = None
            if metric == "fd_classifier":
                labelled = (data, read_labels(exp.data.path), manifest.get("dataset", "images"))
            self.scorer = Scorer(shape, reference, wanted=[metric], labelled=labelled)

    def __call__(self, ema) -> dict[str, float]:
        out = {}
        self.curve: dict[int, dict[str, float]] = {}
        with torch.no_grad():
            for k in self.steps:
                scores = self.scorer(self.sampler(ema, self.noise, k).samples)
                self.curve[k] = scores
                out.update({f"eval/{name}_steps{k:03d}": value for name, value in scores.items()})
        return out

    def log_curve(self, logger) -> None:
        """The last evaluation as quality against sampling steps: `<metric>_vs_steps` with step = steps,
        so MLflow charts it as the run's quality-versus-steps curve."""
        for k, scores in getattr(self, "curve", {}).items():
            logger.log_metrics({f"{name}_vs_steps": value for name, value in scores.items()}, k)


class TrainSession:
    """What the loop needs from the process running it: a Ray Train worker (`fmm train`, distributed
    sweep trials) or a Ray Tune trial running the loop in its own process (single-worker CPU trials)."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        # Ray Train logs two INFO lines per checkpoint (one under its module's file name); the loop prints
        # its own progress, and warnings stay.
        from ray.train.v2._internal.execution import context as train_context

        for name in ("ray.train", train_context.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None, name: str) -> None:
        """A barrier on every worker; only rank 0's metrics and checkpoint count."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


class TuneTrialSession:
    """One process, one worker: the loop runs inside a Tune trial and reports to Tune directly."""

    rank, world = 0, 1

    def __init__(self):
        self.device = torch.device("cpu")

    def get_checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_folder: str | None, name: str) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None
        ray.tune.report(metrics, checkpoint=checkpoint)


def _snapshot(state: State, exp: ExperimentConfig) -> bytes:
    """The training state, serialised in memory (on the CPU, whatever the device)."""
    import io

    buffer = io.BytesIO()
    torch.save(state_payload(state, exp, {}), buffer)
    return buffer.getvalue()


def _rollback(state: State, snapshot: bytes, lr_factor: float) -> None:
    """Back to `snapshot`, one rollback more, every learning rate (the schedule's base) times `lr_factor`."""
    import io

    rollbacks = state.rollbacks + 1
    device = next(state.model.parameters()).device
    apply_payload(state, torch.load(io.BytesIO(snapshot), map_location=device, weights_only=False))
    scheduler = state.scheduler  # a LambdaLR: lr = base * lambda(step); the snapshot's base has its own rollbacks
    scheduler.base_lrs = [lr * lr_factor ** (rollbacks - state.rollbacks) for lr in scheduler.base_lrs]
    state.rollbacks = rollbacks
    for group, base, factor in zip(state.optimiser.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in state.optimiser.param_groups]


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    return run_loop(config, TrainSession())


def run_loop(config: dict[str, Any], session) -> dict[str, Any]:
    """The training loop of one worker. It reports to `session` at every checkpoint and every
    periodic evaluation, with the step, the loss, the latest evaluation metrics and the MLflow run."""
    import torch.distributed as dist

    from fmm.distributed import broadcast_parameters, is_distributed
    from fmm.objectives import make_objective
    from fmm.training import train_step, trainable_parameters

    exp = ExperimentConfig(**config["experiment"])
    rank, world = session.rank, session.world
    torch.set_num_threads(exp.scaling.cpus_per_worker)
    device = session.device

    torch.manual_seed(exp.train.seed)  # the same initial weights everywhere (and rank 0's are broadcast)
    interpolant = build_interpolant(exp)
    model = build_model(exp).to(device)
    objective = make_objective(dict(exp.objective), interpolant).to(device)
    teacher = build_teacher(exp, interpolant)
    if hasattr(teacher, "to"):
        teacher = teacher.to(device)
    objective.prepare(model, teacher)
    optimiser, scheduler = build_optimiser(exp, trainable_parameters(model, objective), exp.train.steps)
    state = State(model, copy.deepcopy(model).requires_grad_(False), objective, optimiser, scheduler)

    restored_from = restore_checkpoint(state, session.get_checkpoint(), config["run_dir"],
                                       log=print if rank == 0 else lambda *_: None)
    restored = restored_from is not None
    broadcast_parameters(model)
    broadcast_parameters(objective)
    broadcast_parameters(state.ema)

    def reseed() -> DataSource:
        # Each worker draws its own noise and batches; after a restart or a rollback the streams move on.
        offset = exp.train.seed + 1000 * rank + state.step + 7919 * state.rollbacks
        torch.manual_seed(offset)
        return DataSource(exp, rank, world, seed=offset + 1)

    data = reseed()
    per_worker = exp.train.batch_size // world
    last_good = _snapshot(state, exp)  # what a non-finite step rolls back to: the last checkpoint
    nan_pending = exp.train.nan_at_step is not None

    logger, local_dir = None, None
    if rank == 0:
        from fmm.tracking import RunLogger

        logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"])
        local_dir = tempfile.mkdtemp(prefix="fmm-")  # on this worker's node: the best EMA map until the end
        if restored_from is not None:
            where, warning = restored_from
            logger.set_tags({"restored_from": where, **({"corrupt_checkpoint": warning} if warning else {})})
    autocast = exp.train.precision == "bf16" and device.type == "cuda"
    periodic = None
    if rank == 0 and exp.train.eval_every:
        periodic = PeriodicEvaluation(exp, interpolant, tuple(model.sample_shape), device)
    best = {"loss": math.inf}
    latest_eval: dict[str, float] = {}
    window: list[float] = []
    last_time, last_step = time.perf_counter(), state.step
    if rank == 0:
        print(f"[fmm] {exp.name}: steps {state.step} -> {exp.train.steps}, {world} worker(s) on {device}, "
              f"global batch {per_worker * world}", flush=True)

    try:
        while state.step < exp.train.steps:
            if exp.train.fail_at_step == state.step + 1 and not restored and rank == world - 1:
                raise RuntimeError(f"injected failure at step {state.step + 1} (train.fail_at_step)")
            batch = data.batch(per_worker).to(device)
            if nan_pending and state.step + 1 == exp.train.nan_at_step and rank == world - 1:
                batch, nan_pending = batch * float("nan"), False
            logs = train_step(model, objective, optimiser, batch, teacher=teacher, step=state.step,
                              grad_clip=exp.optim.grad_clip, bf16=autocast)
            if logs["skipped"]:  # the same decision on every worker (train_step averages a NaN norm)
                bad_step = state.step + 1
                if state.rollbacks >= exp.train.max_rollbacks:
                    raise FloatingPointError(
                        f"loss is {float(logs['loss'])} with gradient norm {float(logs['grad_norm'])} at step {bad_step}, "
                        f"after {state.rollbacks} rollback(s) to the last checkpoint with the learning rate lowered "
                        f"each time (train.max_rollbacks = {exp.train.max_rollbacks})")
                _rollback(state, last_good, exp.train.rollback_lr_factor)
                data = reseed()
                window = []
                if logger is not None:
                    logger.discard_after(state.step)
                    logger.log_metrics({"train/rollbacks": state.rollbacks, "train/lr": scheduler.get_last_lr()[0]},
                                       state.step)
                    print(f"[fmm] step {bad_step}: loss or gradient not finite; back to step {state.step} with the "
                          f"learning rate x{exp.train.rollback_lr_factor} (rollback {state.rollbacks} of at most "
                          f"{exp.train.max_rollbacks})", flush=True)
                continue
            scheduler.step()
            _update_ema(state.ema, model, ema_decay_at(exp.train.ema_decay, state.step))
            state.step += 1
            loss = float(logs["loss"])
            window.append(loss)

            if state.step % exp.train.log_every == 0 or state.step == exp.train.steps:
                now = time.perf_counter()
                rate = (state.step - last_step) * exp.train.batch_size / max(now - last_time, 1e-9)
                last_time, last_step = now, state.step
                metrics = {"train/loss": sum(window) / len(window), "train/lr": scheduler.get_last_lr()[0],
                           "train/samples_per_s": rate}
                if "grad_norm" in logs:
                    metrics["train/grad_norm"] = float(logs["grad_norm"])
                metrics.update({f"train/{k}": float(v) for k, v in logs.items() if k.startswith("mse_")})
                window = []
                if logger is not None:
                    logger.log_metrics(metrics, state.step)
                    print(f"[fmm] step {state.step:6d}  loss {metrics['train/loss']:.4f}  "
                          f"lr {metrics['train/lr']:.2e}  {rate:,.0f} samples/s", flush=True)

            evaluating = bool(exp.train.eval_every) and state.step % exp.train.eval_every == 0
            if periodic is not None and evaluating:
                latest_eval = periodic(state.ema)
                logger.log_metrics(latest_eval, state.step)

            checkpointing = state.step % exp.train.checkpoint_every == 0 or state.step == exp.train.steps
            if checkpointing or evaluating:
                report = {"step": state.step, "loss": loss, **latest_eval, "mlflow_run_id": config["mlflow_run_id"]}
                if checkpointing:
                    last_good = _snapshot(state, exp)
                with tempfile.TemporaryDirectory() as folder:
                    if rank == 0 and checkpointing:
                        save_state(state, exp, folder, {"step": state.step, "loss": loss})
                        logger.flush()
                    session.report(report, folder if rank == 0 and checkpointing else None, f"step_{state.step:08d}")
                    if not checkpointing:
                        continue
                    if rank == 0:
                        logger.set_tags({"checkpoint_latest": storage.join(config["run_dir"], f"step_{state.step:08d}")})
                    if rank == 0 and loss < best["loss"]:
                        best = {"loss": loss, "step": state.step}
                        export_flow_map(os.path.join(folder, "state.pt"), os.path.join(local_dir, "best.pt"))

        checksum = torch.cat([p.detach().reshape(-1).double().cpu() for p in trainable_parameters(model, objective)])
        gathered = [float(checksum.sum())]
        if is_distributed():
            gathered = [None] * world
            dist.all_gather_object(gathered, float(checksum.sum()))
        if rank == 0:
            if periodic is not None:
                periodic.log_curve(logger)
            finish_run(state, exp, logger, best, device, local_dir)
    finally:  # the best EMA map, kept on this worker's disk until it went to MLflow
        if local_dir is not None:
            shutil.rmtree(local_dir, ignore_errors=True)
    import resource

    return {"step": state.step, "param_checksums": gathered, "best": best,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def finish_run(state: State, exp: ExperimentConfig, logger, best: dict, device, local_dir: str) -> None:
    """Rank 0 at the end: final and best EMA flow maps and a sample figure as MLflow artifacts."""
    with tempfile.TemporaryDirectory() as folder:
        save_state(state, exp, folder, {"step": state.step})
        final = os.path.join(folder, "final.pt")
        export_flow_map(os.path.join(folder, "state.pt"), final)
        logger.log_artifact(final, "checkpoints")
    best_path = os.path.join(local_dir, "best.pt")
    if os.path.isfile(best_path):
        logger.log_artifact(best_path, "checkpoints")
        logger.set_tags({"best_step": best.get("step", ""), "best_loss": best.get("loss", "")})
    shape = tuple(state.model.sample_shape)
    if len(shape) == 1 and shape[0] != 2:
        return
    import matplotlib.pyplot as plt

    from fmm.objectives import sampler_for

    interpolant = build_interpolant(exp)
    sampler, _ = sampler_for(exp.objective, interpolant, seed=exp.train.seed + 8)
    fig = sample_figure(state.ema, shape, exp.train.sample_steps, device, exp.train.seed, sampler, interpolant.sigma0)
    logger.log_figure(fig, f"samples/step_{state.step:08d}.png")
    plt.close(fig)
    logger.flush()


# -- the driver ----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    name: str
    run_dir: str
    mlflow_run_id: str
    tracking_uri: str
    return_value: dict[str, Any] | None
    checkpoint_path: str | None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def read_record(run_dir: str) -> dict[str, Any]:
    return storage.read_json(storage.join(run_dir, RUN_RECORD),
                             f"no fmm run at {run_dir!r} (missing {RUN_RECORD}): give the run's folder or URI, "
                             f"<storage.path>/<name>.")


def open_run(exp: ExperimentConfig, *, resume: bool = False, parent_run_id: str | None = None,
             extra_tags: dict[str, str] | None = None, extra_params: dict[str, str] | None = None,
             run_id: str | None = None) -> dict[str, Any]:
    """The run record (name, MLflow run, tracking URI, experiment), written to <storage>/<name>/fmm_run.json:
    a new MLflow run (nested under `parent_run_id` for a sweep trial), or the recorded one on `resume`,
    or `run_id` when the caller already has one (a restarted sweep trial)."""
    from fmm import tracking

    run_dir = storage.join(exp.storage.path, exp.name)
    uri = tracking.resolve_uri(exp.tracking.uri)
    record_exists = storage.exists(storage.join(run_dir, RUN_RECORD))
    if record_exists and not resume and run_id is None:
        raise ValueError(f"a run named {exp.name!r} already exists at {run_dir}: continue it with "
                         f"'fmm train --resume {run_dir}' or choose another name.")
    if resume:
        record = read_record(run_dir)
        run_id, uri = record["mlflow_run_id"], record["tracking_uri"]
        tracking.set_tags(uri, run_id, {"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    elif run_id is None:
        experiment_id = tracking.ensure_experiment(uri, exp.tracking.experiment)
        tags = {"objective": exp.objective["name"], "schedule": exp.interpolant.schedule,
                "dataset": exp.data.target or exp.data.path, "network": exp.network["name"],
                "git_commit": git_commit(), "ray_run": exp.name, "ray_storage": run_dir, **(extra_tags or {})}
        params = {**tracking.flatten(exp.model_dump()), **(extra_params or {})}
        run_id = tracking.start_run(uri, experiment_id, exp.name, params, tags, parent_run_id)
    record = {"name": exp.name, "mlflow_run_id": run_id, "tracking_uri": uri, "experiment": exp.model_dump()}
    storage.write_bytes(storage.join(run_dir, RUN_RECORD), json.dumps(record, indent=1).encode())
    return record


def loop_config(exp: ExperimentConfig, record: dict[str, Any]) -> dict[str, Any]:
    return {"experiment": exp.model_dump(), "mlflow_run_id": record["mlflow_run_id"],
            "tracking_uri": record["tracking_uri"], "run_dir": storage.join(exp.storage.path, exp.name)}


def run_training(exp: ExperimentConfig, *, address: str | None = None, resume: bool = False,
                 log=print, parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> TrainResult:
    """Validate, record, track and fit. `resume` continues the run of the same name and storage; a new
    run is nested under `parent_run_id` (a study's run) when given."""
    from fmm import tracking

    validate_before_start(exp)
    record = open_run(exp, resume=resume, parent_run_id=parent_run_id, extra_tags=extra_tags)
    uri, run_id, run_dir = record["tracking_uri"], record["mlflow_run_id"], storage.join(exp.storage.path, exp.name)
    log(f"[fmm] run {exp.name}: storage {run_dir}, MLflow run {run_id} at {uri}")

    status = "FAILED"
    try:
        result = _fit(exp, record, address)
        status = "FINISHED"
    except BaseException as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        tracking.set_tags(uri, run_id, {"failure_reason": reason[:5000]})
        raise
    finally:
        tracking.end_run(uri, run_id, status)
    checkpoint = storage.uri_of(exp.storage.path, result.checkpoint.path) if result.checkpoint is not None else None
    if checkpoint:
        tracking.set_tags(uri, run_id, {"ray_checkpoint": checkpoint})
    return TrainResult(exp.name, run_dir, run_id, uri, result.return_value, checkpoint)


def make_trainer(exp: ExperimentConfig, record: dict[str, Any], callbacks=None):
    """The TorchTrainer of one run: its workers, storage at <storage>/<name> (a stable name, so a restart
    resumes), worker-level retries and the number of checkpoints kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchTrainer

    scaling = exp.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(exp, record),
        # A fixed group waits for lost resources to come back; an elastic one (min_workers) goes on with
        # the workers that fit, from the last checkpoint, and grows again when nodes return.
        scaling_config=RayScaling(num_workers=(scaling.min_workers, scaling.num_workers)
                                  if scaling.min_workers and scaling.min_workers < scaling.num_workers
                                  else scaling.num_workers,
                                  use_gpu=scaling.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=exp.name, **storage.ray_storage(exp.storage.path),
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=exp.train.keep_checkpoints),
                             callbacks=callbacks),
    )


def _fit(exp: ExperimentConfig, record: dict[str, Any], address: str | None):
    import ray

    if not ray.is_initialized():
        # Workers print progress once; Ray Train's print patch would echo every line a second time.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        ray.init(address=address, log_to_driver=True)
    return make_trainer(exp, record).fit()
