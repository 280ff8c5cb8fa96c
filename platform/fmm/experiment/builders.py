"""From a validated experiment to the objects that train: interpolant, flow map, objective, teacher,
optimiser and learning-rate schedule, and what can be said of the data and the reports up front."""

from __future__ import annotations

import math

import torch

from fmm.experiment.data import read_manifest
from fmm.experiment.schema import ExperimentConfig
from fmm.checkpoint import load_flow_map, load_payload
from fmm.experiment.teachers import fetch_checkpoint, make_teacher
from fmm.flowmap import FlowMap, ModelVelocity, VelocityField, make_flow_map
from fmm.interpolants import Interpolant, make_schedule
from fmm.nets import make_network
from fmm.objectives import OBJECTIVES, Objective, make_objective, sampler_for
from fmm.objectives.registry import objective_class
from fmm.sampling import make_sampler


def build_interpolant(exp: ExperimentConfig) -> Interpolant:
    spec = exp.interpolant
    return Interpolant(make_schedule(spec.schedule, **spec.params), spec.sigma0, spec.latent_noise)


def map_form(exp: ExperimentConfig) -> str:
    """The form of flow map the experiment's objective trains (fmm.flowmap.MAP_FORMS): linear, or trig
    for sCM's TrigFlow."""
    return objective_class(exp.objective).map_form_of(exp.objective, exp.interpolant.schedule)


def build_model(exp: ExperimentConfig) -> FlowMap:
    """The experiment's network in the flow-map form its objective trains."""
    network = dict(exp.network)
    return make_flow_map(make_network(network.pop("name"), **network), map_form(exp))


def build_objective(exp: ExperimentConfig, interpolant: Interpolant) -> Objective:
    return make_objective(dict(exp.objective), interpolant)


def build_teacher(exp: ExperimentConfig, interpolant: Interpolant) -> VelocityField | None:
    """The experiment's velocity teacher (fetched from S3 or MLflow if need be), or None."""
    if exp.teacher is None:
        return None
    spec = dict(exp.teacher)
    if spec.get("kind") == "checkpoint" and "tracking_uri" not in spec:
        spec["tracking_uri"] = exp.tracking.uri
    return make_teacher(spec, interpolant)


def resolve_init(exp: ExperimentConfig) -> str:
    """What the student starts from: `init` as given, else its paper's choice (the objective's
    init_from_teacher) when the teacher is a trained network, else "none" (the identity map)."""
    if exp.init is not None:
        return exp.init
    cls = OBJECTIVES.get(exp.objective.get("name"))
    checkpoint_teacher = (exp.teacher or {}).get("kind") == "checkpoint"
    return "teacher" if cls is not None and cls.init_from_teacher and checkpoint_teacher else "none"


def check_init(exp: ExperimentConfig) -> str:
    """`init` against the teacher, statically: init: teacher needs a trained (checkpoint) teacher."""
    init = resolve_init(exp)
    kind = (exp.teacher or {}).get("kind")
    if init == "teacher" and kind != "checkpoint":
        have = "no teacher" if exp.teacher is None else "the exact velocity of a toy target, which has no network"
        raise ValueError(f"init: teacher starts the student from its teacher's weights, but this experiment has "
                         f"{have}: give teacher: {{kind: checkpoint, path: ...}}, init: a flow-map file, or "
                         f"init: none.")
    return init


def initial_map(exp: ExperimentConfig, teacher: VelocityField | None) -> FlowMap | None:
    """The trained flow map the student starts from (FlowMap.start_from), or None for the identity map."""
    init = check_init(exp)
    if init == "none":
        return None
    if init == "teacher":
        teacher = getattr(teacher, "velocity", teacher)  # a teacher moved to the student's path: its network
        assert isinstance(teacher, ModelVelocity)
        return teacher.model
    try:
        return load_flow_map(fetch_checkpoint(init, exp.tracking.uri))
    except ValueError as err:
        raise ValueError(f"init: {err}") from None


def lr_factor(optim, step: int) -> float:
    """Linear warm-up, then constant, or 1/sqrt(step / decay_start) (LSD's schedule)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "sqrt" and optim.decay_start and step > optim.decay_start:
        return 1 / math.sqrt(step / optim.decay_start)
    return 1.0


def build_optimiser(exp: ExperimentConfig, params, total_steps: int):
    """(optimiser, LambdaLR): warm-up, then constant, cosine to zero over `total_steps`, or sqrt decay."""
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


def target_shape(exp: ExperimentConfig) -> tuple[int, ...] | None:
    """The sample shape of a toy target (known without any I/O), None for Parquet data."""
    return (exp.data.make_target().dim,) if exp.data.target is not None else None


def data_shape(exp: ExperimentConfig) -> tuple[int, ...]:
    """The sample shape of the experiment's data (reads a Parquet dataset's manifest)."""
    return target_shape(exp) or tuple(read_manifest(exp.data.path)["shape"])


def shape_model(exp: ExperimentConfig) -> FlowMap:
    """The experiment's flow map on the meta device: its structure and shapes, without weights (a 58M
    U-Net builds in milliseconds), for checks that need no computation."""
    with torch.device("meta"):
        return build_model(exp)


def sample_shape(exp: ExperimentConfig) -> tuple[int, ...]:
    """The shape of one sample as the config says it (the target's, else the network's), without I/O."""
    return target_shape(exp) or tuple(shape_model(exp).sample_shape)


def eval_metric(exp: ExperimentConfig) -> str:
    """train.eval_metric, or by default sliced W2 for vectors and the classifier-feature distance for images."""
    if exp.train.eval_metric != "auto":
        return exp.train.eval_metric
    return "fd_classifier" if len(sample_shape(exp)) == 3 else "sw2"


def reported_metrics(exp: ExperimentConfig) -> list[str]:
    """The metric names every report of the loop carries (what a sweep may optimise): the loss, and with
    train.eval_every the periodic evaluation's primary metric at each of train.eval_steps."""
    if not exp.train.eval_every:
        return ["loss"]
    return ["loss"] + [f"eval/{eval_metric(exp)}_steps{k:03d}" for k in exp.train.eval_steps]


def method_sampler(path: str, kind: str | None, seed: int, gamma: float = 0.0):
    """(sigma0, sampler) for the run that wrote the checkpoint: its method's own sampler unless `kind`
    names one (flow_map, consistency, gamma); sigma0 = 1 and the flow-map chain when it records no
    experiment."""
    payload = load_payload(path)
    config = payload.get("config")
    if not config:
        if kind not in (None, "flow_map"):
            raise ValueError(f"--sampler {kind!r} re-noises along the run's interpolant, but this checkpoint records "
                             f"no experiment: use --sampler flow_map.")
        return 1.0, make_sampler("flow_map")
    exp = ExperimentConfig(**config)
    interpolant = build_interpolant(exp)
    if kind is None:
        return interpolant.sigma0, sampler_for(exp.objective, interpolant, seed)[0]
    return interpolant.sigma0, make_sampler(kind, interpolant, gamma=gamma, seed=seed)
