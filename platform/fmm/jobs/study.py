"""`fmm study STUDY.yaml`: every few-step method trained against one teacher on the same data, network
and budget, evaluated on one protocol and laid out side by side in MLflow (read back by `fmm compare`).
The file is described in fmm.experiment.study_schema.

Everything is checked before anything trains: each member's experiment (check_config, and then its
data, teacher checkpoint and storage), that all members see data of one shape, that the metrics
apply, that the cluster can hold every member. Then the teacher is trained (or loaded), the methods run as Ray Train
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

from dataclasses import dataclass, field
from typing import Any

import ray

from fmm.checkpoint import load_flow_map
from fmm.evaluation import fid
from fmm.evaluation.protocol import Protocol, Report, build_protocol, evaluate_map, run_protocol
from fmm.experiment.builders import build_interpolant
from fmm.experiment.checks import check_environment
from fmm.experiment.schema import ExperimentConfig
from fmm.experiment.study_schema import Member, StudyConfig, StudyPlan, member_sweep, plan_study
from fmm.experiment.teachers import fetch_checkpoint, load_trained
from fmm.flowmap import ModelVelocity, VelocityField
from fmm.infra import storage, tracking
from fmm.infra.records import RUN_RECORD, STUDY_RECORD, SWEEP_RECORD, claim, open_record, read_record
from fmm.infra.tracking import RunLogger
from fmm.jobs.cluster import check_resources, connect, node_types
from fmm.jobs.evaluate import log_report, log_rows
from fmm.jobs.sweep import best_rows, results_table, run_sweep
from fmm.jobs.train import run_training


@dataclass
class StudyResult:
    """Where the study's runs are (its MLflow parent run) and which members failed, with their reasons."""

    name: str
    tracking_uri: str
    parent_run_id: str
    failures: dict[str, str] = field(default_factory=dict)


def check_study_environment(plan: StudyPlan) -> None:
    """What the static plan cannot see: every member's data, teacher checkpoint and storage, and the FID
    weights when the evaluation needs them (the error names where to put them, before any training)."""
    for member in ([plan.teacher] if plan.teacher else []) + plan.methods:
        try:
            check_environment(member.exp, teacher_given_later=member.awaits_teacher)
        except ValueError as err:
            raise ValueError(f"study {plan.study.name}: {member.role if member.role == 'teacher' else 'method'}"
                             f"{'' if member.role == 'teacher' else ' ' + repr(member.label)}: {err}") from None
    metrics = plan.study.evaluation.metrics
    if "fid" in (metrics or []) or (len(plan.shape) == 3 and not metrics):
        fid.resolve_weights()


def cluster_width(plan: StudyPlan) -> int:
    """How many methods train at once so that none waits on another's workers; a member that no node can
    hold is refused. Starts or joins Ray."""
    resources, types = ray.cluster_resources(), node_types()
    limit = plan.study.max_concurrent or len(plan.methods)
    width = min(check_resources(m.exp, resources, limit, types) for m in plan.methods)
    if plan.teacher is not None:
        check_resources(plan.teacher.exp, resources, 1, types)
    return width


def train_member(exp_dump: dict[str, Any], parent_run_id: str, tags: dict[str, str], resume: bool) -> str:
    """One member's training run, a Ray Train job nested under the study's MLflow run (run as a Ray task,
    so that members train side by side); returns its MLflow run id."""
    result = run_training(ExperimentConfig(**exp_dump), resume=resume, parent_run_id=parent_run_id,
                          extra_tags=tags)
    return result.mlflow_run_id


def member_status(member: Member, uri: str) -> tuple[str, str | None]:
    """('new', None), ('finished', run id) or ('interrupted', run id): where a member's run stands."""
    run_dir = storage.join(member.exp.storage.path, member.exp.name)
    if not storage.exists(storage.join(run_dir, RUN_RECORD)):
        return "new", None
    run_id = read_record(run_dir).mlflow_run_id
    status = tracking.client(uri).get_run(run_id).info.status
    return ("finished" if status == "FINISHED" else "interrupted"), run_id


class Evaluation:
    """The study's one protocol (per interpolant: the noise is scaled by sigma0 and the reference map
    follows the schedule), applied to each member and logged into its run."""

    def __init__(self, plan: StudyPlan, log=print):
        self.spec, self.uri, self.shape, self.log = plan.study.evaluation, plan.tracking_uri, plan.shape, log
        self.protocols: dict[str, Protocol] = {}

    def protocol(self, exp: ExperimentConfig) -> Protocol:
        key = exp.interpolant.model_dump_json()
        if key not in self.protocols:
            spec = self.spec
            self.protocols[key] = build_protocol(exp, build_interpolant(exp), self.shape, spec.samples, spec.seed,
                                                 spec.metrics, self.log)
        return self.protocols[key]

    def solvers(self, velocity: VelocityField, exp: ExperimentConfig) -> Report:
        """The ODE solvers of `fmm evaluate` on `velocity`, from the protocol's noise."""
        protocol = self.protocol(exp)
        return run_protocol(None, velocity, protocol.noise, [], protocol.scorer, self.spec.teacher_max_nfe,
                            log=lambda *_: None, progress=False, kl_noise=protocol.kl_noise, floors=protocol.floors)

    def method(self, label: str, run_id: str) -> Report:
        """The method's final EMA map, sampled by its authors' sampler at each step count."""
        model, exp, _ = load_trained(f"runs:/{run_id}/checkpoints/final.pt", self.uri)
        model.eval()
        interpolant = build_interpolant(exp)
        report, sampler = evaluate_map(model, exp, interpolant, self.protocol(exp), self.spec.steps,
                                       seed=self.spec.seed, log=lambda *_: None, progress=False)
        log_report(report, self.uri, run_id, model=model, steps=self.spec.steps, sampler=sampler,
                   sigma0=interpolant.sigma0)
        scores = ", ".join(f"{r.steps}: {r.scores[report.primary]:.4g}" for r in report.rows)
        self.log(f"[fmm] evaluated {label} ({report.sampler} sampler), {report.primary} by steps: {scores}")
        return report


def run_study(study: StudyConfig, *, resume: bool = False, address: str | None = None, log=print) -> StudyResult:
    """Train and evaluate every member; `fmm compare` (fmm.jobs.compare) lays out what it logged."""
    uri = tracking.resolve_uri(study.tracking.uri)
    study_dir = storage.join(storage.absolute(study.storage.path), study.name)
    where = dict(kind="study", name=study.name, resume=resume, resume_hint="'fmm study --resume'")
    exists = claim(study_dir, STUDY_RECORD, **where)
    plan = plan_study(study, uri)
    check_study_environment(plan)
    width: list[int] = []

    def concurrency() -> int:
        """Ray, started (or joined) when something is left to train, and how many methods fit at once."""
        if not width:
            connect(address)
            width.append(cluster_width(plan))
        return width[0]

    if not exists:
        concurrency()  # a member no node can hold is refused before anything is recorded
    record = open_record(study_dir, STUDY_RECORD, **where, tracking_uri=uri, experiment=study.tracking.experiment,
                         config=study.model_dump(), params=tracking.flatten({"study": study.model_dump()}),
                         tags={"kind": "study", "study": study.name, "ray_storage": study_dir, "eval_metric": "",
                               "methods": ",".join(study.methods)})
    uri, parent = record.tracking_uri, record.mlflow_run_id
    members: dict[str, str] = record.state.setdefault("members", {})  # label -> MLflow run id, once trained
    evaluated: list[str] = record.state.setdefault("evaluated", [])   # scored: labels, "teacher", "exact"
    record.save()
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
                record.save()
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
            plan.give_teacher(members["teacher"])
        train_all([m for m in plan.methods if m.sweep is None], len(plan.methods))
        for member in (m for m in plan.methods if m.sweep is not None and m.label not in members):
            concurrency()
            sweep = member_sweep(study, member.label, member.sweep, uri)
            sweep_record = storage.join(storage.absolute(sweep.storage.path), sweep.name, SWEEP_RECORD)
            try:
                grid = run_sweep(sweep, member.exp.model_dump(), resume=storage.exists(sweep_record),
                                 address=address, log=log, parent_run_id=parent)
                best = best_rows(results_table(grid, sweep), sweep)
                if not best:
                    raise RuntimeError("no trial of the sweep finished")
                members[member.label] = best[0]["mlflow_run_id"]
                tracking.set_tags(uri, members[member.label], {"study": study.name, "study_member": member.label,
                                                               "study_role": "method"})
                record.save()
            except Exception as err:
                failures[member.label] = str(err).strip().splitlines()[-1][:500]
                log(f"[fmm] {member.label}: sweep failed: {failures[member.label]}")

        # Evaluation last, on a quiet cluster: wall-clock per sample is compared across members. Each
        # part is scored once (a resumed study does not log a second history).
        evaluation = Evaluation(plan, log)
        first = plan.methods[0].exp

        def done(part: str) -> None:
            evaluated.append(part)
            record.save()

        if "teacher" not in evaluated and plan.teacher is not None:
            model, _, _ = load_trained(f"runs:/{members['teacher']}/checkpoints/final.pt", uri)
            report = evaluation.solvers(ModelVelocity(model), plan.teacher.exp)
            log_report(report, uri, members["teacher"])
            done("teacher")
            log(f"[fmm] evaluated the teacher's ODE solvers ({len(report.rows)} runs)")
        elif "teacher" not in evaluated and study.teacher.checkpoint is not None:
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
        for member in plan.methods:
            if member.label in members and member.label not in evaluated:
                evaluation.method(member.label, members[member.label])
                done(member.label)
        primary = evaluation.protocol(first).scorer.primary
        tracking.set_tags(uri, parent, {"eval_metric": primary, "eval_samples": str(study.evaluation.samples),
                                        "failed_members": ",".join(sorted(failures))})
        status = "FINISHED"
    finally:
        tracking.end_run(uri, parent, status)
    return StudyResult(study.name, uri, parent, failures)
