"""`fmm study STUDY.yaml`: every few-step method trained against one teacher on the same data, network
and budget, evaluated on one protocol and laid out side by side in MLflow (read back by `fmm compare`).

    name: toy-flower
    base:                                  # experiment sections every member shares: the budget
      data: {target: flower}
      interpolant: {schedule: linear}
      network: {name: mlp, dim: 2, width: 256, depth: 3}
      train: {steps: 1000, batch_size: 512}
      scaling: {num_workers: 1, cpus_per_worker: 1}
    teacher: {train: {objective: {name: flow_matching}, train: {steps: 2000}}}
    #        or {checkpoint: teacher.pt | s3://... | runs:/<mlflow run id>}, or {exact: flower}
    methods:                               # label: experiment sections over the base
      lmd: {objective: {name: lmd, diagonal_fraction: 0.25}}
      cd: {objective: {name: cd}}
      lsd: {objective: {name: lsd}, train: {eval_every: 250},
            sweep: {space: {optim.lr: {float: [3.0e-4, 3.0e-3], log: true}}, metric: eval/sw2_steps001}}
    evaluation: {steps: [1, 2, 4, 8], samples: 10000, metrics: [sw2, energy], teacher_max_nfe: 64}
    storage: {path: ./studies}
    tracking: {experiment: fmm-studies}

Everything is checked before anything trains: each member's experiment (against a stand-in teacher
of the teacher's network), that all members see data of one shape, that the metrics apply, that
the storage is writable. Then the teacher is trained (or loaded), the methods run as Ray Train
jobs, as many at once as the cluster holds, and methods with a `sweep` run as sweeps (Ray Tune +
Optuna) one after another, their best trial standing for the method. Distillation methods get the
study's teacher unless they name their own. Evaluation comes last, when nothing trains, so that
the wall-clock per sample of every member is measured on a quiet machine.

Evaluation is `fmm evaluate`'s protocol, shared: one seeded noise set and one reference set for
every member; each method is sampled by its authors' sampler at each step count and scored into
its own MLflow run (metric at step = NFE); the teacher's velocity is integrated by the fixed-step
solvers and dopri5 on the same noise (`teacher/<solver>/<metric>`, in the teacher's run), and for a
toy target the exact velocity too (`exact/<solver>/<metric>`, in the study's run).

MLflow: one parent run per study (tag kind=study) with each member's run nested under it (tags
study, study_member, study_role = teacher | method). `fmm study --resume` reuses the parent run,
skips members that finished (and scores that were logged), and continues the others from their
checkpoints in their own MLflow runs.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fmm import storage
from fmm.config import StrictModel, validate
from fmm.experiment import ExperimentConfig, StorageConfig, TrackingConfig, apply_overrides, load_experiment, read_yaml
from fmm.sweep import Distribution, MetricSpec, SchedulerSettings, SearchSettings

STUDY_RECORD = "fmm_study.json"
NAME = r"^[A-Za-z0-9_.\-]+$"


class TeacherSpec(StrictModel):
    """Exactly one: `train` (experiment sections over the base, trained first), `checkpoint` (a flow-map
    file, s3:// URI or runs:/<id>) or `exact` (a toy target's exact velocity)."""

    train: dict[str, Any] | None = None
    checkpoint: str | None = None
    exact: str | None = None

    @model_validator(mode="after")
    def _one(self) -> TeacherSpec:
        given = [k for k in ("train", "checkpoint", "exact") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of train: {experiment sections}, checkpoint: PATH or exact: TARGET"
                             f" (got {given or 'none'})")
        return self


class MethodSweep(StrictModel):
    """A sweep over one method's keys; its best trial stands for the method."""

    space: dict[str, Distribution]
    metric: str | list[MetricSpec]
    mode: Literal["min", "max"] = "min"
    search: SearchSettings = SearchSettings(num_samples=4, max_concurrent_trials=2)
    scheduler: SchedulerSettings = SchedulerSettings()


class EvaluationSpec(StrictModel):
    steps: list[int] = [1, 2, 4, 8, 16]
    samples: int = Field(4000, ge=10, le=10**7)
    metrics: list[str] | None = None        # the first is the quality metric of the comparison
    teacher_max_nfe: int = Field(64, ge=1, le=4096)
    seed: int = 0

    @field_validator("steps")
    @classmethod
    def _positive(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 1 <= k <= 4096 for k in steps):
            raise ValueError(f"steps are positive sampling step counts, e.g. [1, 2, 4, 8]; got {steps}")
        return sorted(set(steps))


class StudyConfig(StrictModel):
    name: str = Field(..., min_length=1, pattern=NAME)
    base: dict[str, Any]
    teacher: TeacherSpec
    methods: dict[str, dict[str, Any]]
    evaluation: EvaluationSpec = EvaluationSpec()
    storage: StorageConfig = StorageConfig(path="./studies")
    tracking: TrackingConfig = TrackingConfig(experiment="fmm-studies")
    max_concurrent: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _checks(self) -> StudyConfig:
        for key, uri in (("storage.path", self.storage.path), ("tracking.uri", self.tracking.uri),
                         ("teacher.checkpoint", self.teacher.checkpoint)):
            storage.refuse_credentials(uri, key)
        if not self.methods:
            raise ValueError("methods is empty: name at least one method (label: {objective: {name: ...}})")
        for label, sections in self.methods.items():
            import re

            if not re.match(NAME, label) or label == "teacher":
                raise ValueError(f"method label {label!r}: use letters, digits, '_', '.', '-' (and not 'teacher')")
            if not isinstance(sections, dict) or not isinstance(sections.get("objective"), dict):
                raise ValueError(f"method {label!r} needs objective: {{name: ...}} (see `fmm objectives`)")
        for key in ("name", "objective", "storage", "tracking"):
            if key in self.base:
                raise ValueError(f"base.{key}: the study sets each member's {key} itself; remove it from base")
        return self


# -- loading and planning (all before anything trains) -------------------------------------------

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
    data = study.base.get("data") or {}
    if isinstance(data.get("path"), str):
        data["path"] = storage.absolute(data["path"])
    for sections in study.methods.values():
        if isinstance((sections.get("data") or {}).get("path"), str):
            sections["data"]["path"] = storage.absolute(sections["data"]["path"])
    checkpoint = study.teacher.checkpoint
    if checkpoint and not checkpoint.startswith("runs:/"):
        study.teacher.checkpoint = storage.absolute(checkpoint)
    return study


class Member:
    """One training run of a study: the teacher or a method, its experiment and its optional sweep."""

    def __init__(self, label: str, role: str, exp: ExperimentConfig, sweep: MethodSweep | None = None):
        self.label, self.role, self.exp, self.sweep = label, role, exp, sweep


def needs_teacher(objective: dict[str, Any]) -> bool:
    from fmm.objectives import OBJECTIVES

    name = objective.get("name")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)} (`fmm objectives`).")
    return OBJECTIVES[name].needs_teacher


class Plan:
    """The study's members, built and checked: `teacher` (None for a checkpoint or exact teacher) and
    `methods` in file order. Distillation members point at `teacher_spec` (see `point_at_teacher`)."""

    def __init__(self, study: StudyConfig, tracking_uri: str):
        self.study, self.uri = study, tracking_uri
        self.runs_dir = storage.join(storage.absolute(study.storage.path), study.name, "runs")
        self.teacher: Member | None = None
        self.methods: list[Member] = []

    def experiment(self, label: str, sections: dict[str, Any], teacher: dict[str, Any] | None) -> ExperimentConfig:
        raw = merged(self.study.base, {k: v for k, v in sections.items() if k != "sweep"})
        raw["name"] = f"{self.study.name}-{label}"
        raw["storage"] = {"path": self.runs_dir}
        raw["tracking"] = {"uri": self.uri, "experiment": self.study.tracking.experiment}
        if needs_teacher(raw["objective"]):
            if "teacher" not in sections:
                if teacher is None:
                    raise ValueError(f"objective {raw['objective']['name']!r} distils a velocity teacher")
                raw["teacher"] = teacher
        elif "teacher" not in sections:
            raw.pop("teacher", None)
        return load_experiment(raw=raw)


def teacher_reference(study: StudyConfig, uri: str, teacher_run_id: str | None) -> dict[str, Any]:
    """The `teacher:` entry of a distillation member's experiment."""
    spec = study.teacher
    if spec.exact is not None:
        return {"kind": "exact", "target": spec.exact}
    if spec.checkpoint is not None:
        return {"kind": "checkpoint", "path": spec.checkpoint, "tracking_uri": uri}
    return {"kind": "checkpoint", "path": f"runs:/{teacher_run_id}/checkpoints/final.pt", "tracking_uri": uri}


def plan_study(study: StudyConfig, uri: str, scratch: str) -> Plan:
    """Every member's experiment, validated as `fmm train` would before starting, with a stand-in for a
    teacher still to be trained (an untrained network of the teacher's shape, written under `scratch`)."""
    from fmm.checkpoint import save_flow_map
    from fmm.evaluate import IMAGE_METRICS, VECTOR_METRICS
    from fmm.sweep import check_sweep
    from fmm.train import build_model, data_shape, validate_before_start

    plan = Plan(study, uri)
    where = f"study {study.name}"
    stand_in = teacher_reference(study, uri, None)
    if study.teacher.train is not None:
        try:
            objective = study.teacher.train.get("objective") or {}
            if not isinstance(objective, dict) or needs_teacher(objective):
                raise ValueError(f"objective {objective.get('name') if isinstance(objective, dict) else objective!r}"
                                 f" needs a teacher itself; train the teacher with one that does not "
                                 f"(flow_matching, or a direct or self-distillation objective)")
            teacher_exp = plan.experiment("teacher", study.teacher.train, None)
            validate_before_start(teacher_exp)
        except ValueError as err:
            raise ValueError(f"{where}: teacher: {err}") from None
        plan.teacher = Member("teacher", "teacher", teacher_exp)
        path = os.path.join(scratch, "stand-in-teacher.pt")
        save_flow_map(path, build_model(teacher_exp))
        stand_in = {"kind": "checkpoint", "path": path}
    shapes: dict[str, tuple[int, ...]] = {}
    if plan.teacher is not None:
        shapes["teacher"] = data_shape(plan.teacher.exp)
    for label, sections in study.methods.items():
        try:
            sweep = validate(MethodSweep, sections["sweep"], "sweep") if "sweep" in sections else None
            exp = plan.experiment(label, sections, stand_in)
            if study.teacher.exact is not None and study.teacher.exact != exp.data.target:
                raise ValueError(f"teacher.exact {study.teacher.exact!r} is that toy target's velocity but the data "
                                 f"is {exp.data.target or exp.data.path!r}: name the same target, train a teacher or "
                                 f"give a checkpoint.")
            validate_before_start(exp)
            if sweep is not None:
                check_sweep(member_sweep(study, label, sweep, uri), exp.model_dump())
        except ValueError as err:
            raise ValueError(f"{where}: method {label!r}: {err}") from None
        shapes[label] = data_shape(exp)
        plan.methods.append(Member(label, "method", exp, sweep))
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
    if "fid" in (study.evaluation.metrics or []) or (len(shape) == 3 and not study.evaluation.metrics):
        from fmm import fid

        fid.resolve_weights()  # missing weights: the error names where to put them, before any training
    return plan


def member_sweep(study: StudyConfig, label: str, spec: MethodSweep, uri: str | None = None):
    """The sweep of one method: its trials nest under the sweep's run, which nests under the study's."""
    from fmm.sweep import SweepConfig

    return SweepConfig(name=f"{study.name}-{label}", base="(study)", space=spec.space, metric=spec.metric,
                       mode=spec.mode, search=spec.search, scheduler=spec.scheduler,
                       storage={"path": storage.join(storage.absolute(study.storage.path), study.name, "sweeps")},
                       tracking={"uri": uri or study.tracking.uri, "experiment": study.tracking.experiment})


# -- running -------------------------------------------------------------------------------------

def train_member(exp_dump: dict[str, Any], parent_run_id: str, tags: dict[str, str], resume: bool) -> str:
    """One member's training run, a Ray Train job nested under the study's MLflow run (run as a Ray task,
    so that members train side by side); returns its MLflow run id."""
    from fmm.train import run_training

    result = run_training(ExperimentConfig(**exp_dump), resume=resume, parent_run_id=parent_run_id,
                          extra_tags=tags)
    return result.mlflow_run_id


def member_status(member: Member, uri: str) -> tuple[str, str | None]:
    """('new', None), ('finished', run id) or ('interrupted', run id): where a member's run stands."""
    from fmm import tracking
    from fmm.train import RUN_RECORD, read_record

    run_dir = storage.join(member.exp.storage.path, member.exp.name)
    if not storage.exists(storage.join(run_dir, RUN_RECORD)):
        return "new", None
    run_id = read_record(run_dir)["mlflow_run_id"]
    status = tracking.client(uri).get_run(run_id).info.status
    return ("finished" if status == "FINISHED" else "interrupted"), run_id


class Evaluation:
    """The study's one protocol (per interpolant: the noise is scaled by sigma0 and the reference map
    follows the schedule), applied to each member and logged into its run."""

    def __init__(self, study: StudyConfig, uri: str, log=print):
        self.spec, self.uri, self.log = study.evaluation, uri, log
        self.protocols: dict[str, Any] = {}

    def protocol(self, exp: ExperimentConfig):
        from fmm.evaluate import build_protocol
        from fmm.train import build_interpolant, data_shape

        key = json.dumps(exp.interpolant.model_dump(), sort_keys=True)
        if key not in self.protocols:
            spec = self.spec
            self.protocols[key] = build_protocol(exp, build_interpolant(exp), data_shape(exp), spec.samples, spec.seed,
                                                 spec.metrics, self.log)
        return self.protocols[key]

    def solvers(self, velocity, exp: ExperimentConfig):
        """The ODE solvers of `fmm evaluate` on `velocity`, from the protocol's noise."""
        from fmm.evaluate import run_protocol

        protocol = self.protocol(exp)
        return run_protocol(None, velocity, protocol.noise, [], protocol.scorer, self.spec.teacher_max_nfe,
                            log=lambda *_: None, progress=False)

    def method(self, label: str, run_id: str):
        """The method's final EMA map, sampled by its authors' sampler at each step count."""
        from fmm.evaluate import load_run, log_report, run_protocol
        from fmm.objectives import sampler_for
        from fmm.train import build_interpolant

        model, exp, _ = load_run(f"runs:/{run_id}/checkpoints/final.pt", self.uri)
        model.eval()
        interpolant = build_interpolant(exp)
        sampler, kind = sampler_for(exp.objective, interpolant, seed=self.spec.seed + 2)
        protocol = self.protocol(exp)
        report = run_protocol(model, None, protocol.noise, self.spec.steps, protocol.scorer, log=lambda *_: None,
                              progress=False, sampler=sampler, sampler_kind=kind)
        log_report(report, self.uri, run_id, model=model, steps=self.spec.steps, sampler=sampler,
                   sigma0=interpolant.sigma0)
        scores = ", ".join(f"{r.steps}: {r.scores[report.primary]:.4g}" for r in report.rows)
        self.log(f"[fmm] evaluated {label} ({kind} sampler), {report.primary} by steps: {scores}")
        return report


def run_study(study: StudyConfig, *, resume: bool = False, address: str | None = None, log=print):
    """Train and evaluate every member, then compare them; returns the Comparison (fmm.compare)."""
    import ray

    from fmm import tracking
    from fmm.compare import compare_study
    from fmm.evaluate import log_report, log_rows
    from fmm.sweep import best_rows, check_resources, node_types, results_table, run_sweep
    from fmm.teachers import ModelVelocity, fetch_checkpoint
    from fmm.tracking import RunLogger

    uri = tracking.resolve_uri(study.tracking.uri)
    study_dir = storage.join(storage.absolute(study.storage.path), study.name)
    record_path = storage.join(study_dir, STUDY_RECORD)
    exists = storage.claim(study_dir, STUDY_RECORD, "study", study.name, resume)
    with tempfile.TemporaryDirectory() as scratch:
        plan = plan_study(study, uri, scratch)

    cluster: dict[str, Any] = {}

    def concurrency() -> int:
        """Ray, started (or joined) when something is left to train, and how many methods fit at once."""
        if not cluster:
            if not ray.is_initialized():
                os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
                ray.init(address=address, log_to_driver=True)
            resources, types = ray.cluster_resources(), node_types()
            limit = study.max_concurrent or len(plan.methods)
            cluster["width"] = min(check_resources(m.exp, resources, limit, types) for m in plan.methods)
            if plan.teacher is not None:
                check_resources(plan.teacher.exp, resources, 1, types)
        return cluster["width"]

    if not exists:
        concurrency()  # a member no node can hold is refused before anything is recorded

    if exists:
        record = storage.read_json(record_path, f"unreadable {record_path}")
        uri, parent = record["tracking_uri"], record["parent_run_id"]
        tracking.client(uri).update_run(parent, status="RUNNING")
        tracking.set_tags(uri, parent, {"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    else:
        experiment_id = tracking.ensure_experiment(uri, study.tracking.experiment)
        parent = tracking.start_run(uri, experiment_id, study.name, tracking.flatten({"study": study.model_dump()}),
                                    {"kind": "study", "study": study.name, "ray_storage": study_dir,
                                     "eval_metric": "", "methods": ",".join(study.methods)})
        record = {"name": study.name, "tracking_uri": uri, "parent_run_id": parent, "experiment_id": experiment_id,
                  "study": study.model_dump(), "members": {}, "evaluated": []}
    members: dict[str, str] = record["members"]  # label -> MLflow run id, once trained
    evaluated: list[str] = record["evaluated"]   # what has been scored: labels, and "teacher" / "exact" solvers

    def save_record() -> None:
        storage.write_bytes(record_path, json.dumps(record, indent=1).encode())

    save_record()
    log(f"[fmm] study {study.name}: teacher "
        f"{'trained first' if plan.teacher else (study.teacher.checkpoint or 'exact ' + str(study.teacher.exact))}, "
        f"{len(plan.methods)} methods; storage {study_dir}; MLflow parent run {parent} at {uri}")
    failures: dict[str, str] = {}

    def train_all(batch: list[Member], width: int) -> None:
        """Each member as a Ray task, `width` at a time; finished members are skipped, interrupted ones continue."""
        queue = []
        for member in batch:
            state, run_id = member_status(member, uri)
            if state == "finished":
                members[member.label] = run_id
                log(f"[fmm] {member.label}: finished earlier (MLflow run {run_id})")
            else:
                queue.append((member, state == "interrupted"))
        running: dict[Any, Member] = {}
        if queue:
            width = min(width, concurrency())
            log(f"[fmm] training {len(queue)} member(s), {width} at a time")
            task = ray.remote(num_cpus=0, max_retries=0)(train_member)
        while queue or running:
            while queue and len(running) < width:
                member, again = queue.pop(0)
                tags = {"study": study.name, "study_member": member.label, "study_role": member.role}
                log(f"[fmm] {'continuing' if again else 'training'} {member.label} ({member.exp.objective['name']})")
                running[task.remote(member.exp.model_dump(), parent, tags, again)] = member
            done, _ = ray.wait(list(running), num_returns=1)
            member = running.pop(done[0])
            try:
                members[member.label] = ray.get(done[0])
                save_record()
                log(f"[fmm] {member.label}: trained (MLflow run {members[member.label]})")
            except Exception as err:  # the member's run is FAILED with its reason; the study goes on
                failures[member.label] = str(err).strip().splitlines()[-1][:500]
                log(f"[fmm] {member.label}: failed: {failures[member.label]}")

    status = "FAILED"
    try:
        if plan.teacher is not None:
            train_all([plan.teacher], 1)
            if "teacher" not in members:
                raise ValueError(f"study {study.name}: the teacher failed ({failures['teacher']}); nothing to distil.")
        reference = teacher_reference(study, uri, members.get("teacher"))
        methods = []
        for member in plan.methods:
            exp = plan.experiment(member.label, study.methods[member.label], reference)
            methods.append(Member(member.label, member.role, exp, member.sweep))
        train_all([m for m in methods if m.sweep is None], len(methods))
        for member in (m for m in methods if m.sweep is not None and m.label not in members):
            concurrency()
            sweep = member_sweep(study, member.label, member.sweep, uri)
            sweep_record = storage.join(storage.absolute(sweep.storage.path), sweep.name, "fmm_sweep.json")
            try:
                grid = run_sweep(sweep, member.exp.model_dump(), resume=storage.exists(sweep_record),
                                 address=address, log=log, parent_run_id=parent)
                best = best_rows(results_table(grid, sweep), sweep)
                if not best:
                    raise RuntimeError("no trial of the sweep finished")
                members[member.label] = best[0]["mlflow_run_id"]
                tracking.set_tags(uri, members[member.label], {"study": study.name, "study_member": member.label,
                                                               "study_role": "method"})
                save_record()
            except Exception as err:
                failures[member.label] = str(err).strip().splitlines()[-1][:500]
                log(f"[fmm] {member.label}: sweep failed: {failures[member.label]}")

        # Evaluation last, on a quiet cluster: wall-clock per sample is compared across members. Each
        # part is scored once (a resumed study does not log a second history).
        evaluation = Evaluation(study, uri, log)
        first = methods[0].exp

        def done(part: str) -> None:
            evaluated.append(part)
            save_record()

        if "teacher" not in evaluated and plan.teacher is not None:
            model, _, _ = load_run_model(members["teacher"], uri)
            report = evaluation.solvers(ModelVelocity(model), plan.teacher.exp)
            log_report(report, uri, members["teacher"])
            done("teacher")
            log(f"[fmm] evaluated the teacher's ODE solvers ({len(report.rows)} runs)")
        elif "teacher" not in evaluated and study.teacher.checkpoint is not None:
            from fmm.checkpoint import load_flow_map

            model = load_flow_map(fetch_checkpoint(study.teacher.checkpoint, uri))
            logger = RunLogger(uri, parent)
            log_rows(logger, evaluation.solvers(ModelVelocity(model), first).rows, "teacher")
            logger.flush()
            done("teacher")
        exact = evaluation.protocol(first).exact
        if "exact" not in evaluated and exact is not None:
            report = evaluation.solvers(exact, first)
            logger = RunLogger(uri, parent)
            log_rows(logger, report.rows, "exact")
            logger.flush()
            done("exact")
            log(f"[fmm] evaluated the exact velocity's ODE solvers ({len(report.rows)} runs)")
        for member in methods:
            if member.label in members and member.label not in evaluated:
                evaluation.method(member.label, members[member.label])
                done(member.label)
        primary = evaluation.protocol(first).scorer.primary
        tracking.set_tags(uri, parent, {"eval_metric": primary, "eval_samples": str(study.evaluation.samples),
                                        "failed_members": ",".join(sorted(failures))})
        status = "FINISHED"
    finally:
        tracking.end_run(uri, parent, status)
    comparison = compare_study(uri, parent)
    comparison.log_to_parent()
    comparison.failures = failures
    return comparison


def load_run_model(run_id: str, uri: str):
    from fmm.evaluate import load_run

    return load_run(f"runs:/{run_id}/checkpoints/final.pt", uri)


__all__ = ["StudyConfig", "load_study", "plan_study", "run_study"]
