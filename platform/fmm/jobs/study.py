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

Evaluation is `fmm evaluate`'s protocol, shared: `evaluation.sets` seeded evaluation sets (noise and
reference) for every member, so that all scores are paired by set; each method is sampled by its
authors' sampler at each step count and scored into its own MLflow run (metric at step = NFE: the
mean, with `<metric>/low`, `<metric>/high` its 95% interval and `<metric>/set<j>` each set's score);
the teacher's velocity is integrated by the fixed-step solvers and dopri5 on the same noise
(`teacher/<solver>/<metric>`, in the trained teacher's run, or the study's run for a given
checkpoint), and for a toy target the exact velocity too (`exact/<solver>/<metric>`, in the study's
run, with `floor/<metric>`: what exact samples score). With `evaluation.resources` every one of
these is a Ray task that loads what it scores where it runs.

MLflow: one parent run per study (tag kind=study) with each member's run nested under it (tags
study, study_member, study_role = teacher | method). With `seeds`, a method's run holds the mean and
interval over its seeds x sets, and each seed trains in its own run nested under it (study_role =
seed, study_seed). `fmm study --resume` reuses the parent run, skips runs that finished (and scores
that were logged), and continues the others from their checkpoints in their own MLflow runs; a run
killed before its record was written is ended KILLED (tag superseded_by) and its seed trained anew.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from fmm.checkpoint import load_flow_map
from fmm.evaluation import fid
from fmm.evaluation.protocol import (Protocol, Report, Row, build_protocol, check_disjoint, evaluate_map, merge_seeds,
                                     needs_subsets, run_sets)
from fmm.experiment.data import read_manifest
from fmm.experiment.builders import build_interpolant
from fmm.experiment.checks import check_environment
from fmm.experiment.schema import ExperimentConfig
from fmm.experiment.study_schema import EvaluationSpec, Member, StudyConfig, StudyPlan, member_sweep, plan_study
from fmm.experiment.teachers import fetch_checkpoint, load_trained
from fmm.flowmap import ModelVelocity
from fmm.groundtruth import ExactVelocity
from fmm.infra import models, storage, tracking
from fmm.infra.records import RUN_RECORD, STUDY_RECORD, SWEEP_RECORD, claim, open_record, read_record
from fmm.infra.tracking import RunLogger
from fmm.jobs.cluster import (check_evaluation_fits, check_resources, connect, evaluation_device, node_shapes,
                              node_types, ray_options, started_here)
from fmm.jobs.evaluate import log_floors, log_report, log_rows, where
from fmm.jobs.sweep import best_rows, results_table, run_sweep
from fmm.jobs.train import run_params, run_training


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
    spec = plan.study.evaluation
    for member in plan.methods[:1]:
        if member.exp.data.path is not None and needs_subsets(plan.shape, spec.metrics, spec.fid_reference):
            try:
                check_disjoint(int(read_manifest(member.exp.data.path)["rows"]), spec.samples, spec.sets,
                               member.exp.data.path)
            except ValueError as err:
                raise ValueError(f"study {plan.study.name}: {err}") from None
    metrics = spec.metrics
    if "fid" in (metrics or []) or (len(plan.shape) == 3 and not metrics):
        fid.resolve_weights(spec.fid_weights)


def cluster_width(plan: StudyPlan) -> int:
    """How many methods train at once so that none waits on another's workers; a member that no node can
    hold is refused. Starts or joins Ray."""
    resources, types, fixed = ray.cluster_resources(), node_types(), started_here()
    limit = plan.study.max_concurrent or sum(len(m.seeds or [None]) for m in plan.methods)
    width = min(check_resources(m.exp, resources, limit, types, fixed=fixed) for m in plan.methods)
    if plan.teacher is not None:
        check_resources(plan.teacher.exp, resources, 1, types, fixed=fixed)
    check_evaluation_fits(plan.study.evaluation.resources, *node_shapes())
    return width


def train_member(exp_dump: dict[str, Any], parent_run_id: str, tags: dict[str, str], resume: bool) -> str:
    """One member's training run, a Ray Train job nested under the study's MLflow run (run as a Ray task,
    so that members train side by side); returns its MLflow run id."""
    result = run_training(ExperimentConfig(**exp_dump), resume=resume, parent_run_id=parent_run_id,
                          extra_tags=tags)
    return result.mlflow_run_id


def member_status(exp: ExperimentConfig, uri: str) -> tuple[str, str | None]:
    """('new', None), ('finished', run id) or ('interrupted', run id): where a training run stands."""
    run_dir = storage.join(exp.storage.path, exp.name)
    if not storage.exists(storage.join(run_dir, RUN_RECORD)):
        return "new", None
    run_id = read_record(run_dir).mlflow_run_id
    status = tracking.client(uri).get_run(run_id).info.status
    return ("finished" if status == "FINISHED" else "interrupted"), run_id


def study_protocol(exp: ExperimentConfig, spec: EvaluationSpec, shape: tuple[int, ...], log=print,
                   device=None) -> Protocol:
    """The study's protocol for a member's interpolant (its noise is scaled by sigma0 and its reference
    map follows the schedule)."""
    return build_protocol(exp, build_interpolant(exp), shape, spec.samples, spec.seed, spec.metrics, log,
                          sets=spec.sets, fid_reference=spec.fid_reference, fid_samples=spec.fid_samples,
                          fid_stats=spec.fid_stats, fid_weights=spec.fid_weights, device=device)


def score_method(exp: dict[str, Any], uri: str, spec: EvaluationSpec, shape: tuple[int, ...],
                 protocol: Protocol | None = None, *, run_id: str) -> Report:
    """A method's final EMA map sampled by its authors' sampler at each step count and scored by the
    study's protocol, on this process's device, logged into its run (with where it ran)."""
    device = evaluation_device()
    model, trained, _ = load_trained(f"runs:/{run_id}/checkpoints/final.pt", uri)
    model.to(device).eval()
    interpolant = build_interpolant(trained)
    protocol = protocol or study_protocol(ExperimentConfig(**exp), spec, shape, lambda *_: None, device)
    report, sampler = evaluate_map(model, trained, interpolant, protocol, spec.steps, seed=spec.seed,
                                   log=lambda *_: None, progress=False)
    log_report(report, uri, run_id, model=model, steps=spec.steps, sampler=sampler, sigma0=interpolant.sigma0)
    return report


def score_teacher(exp: dict[str, Any], uri: str, spec: EvaluationSpec, shape: tuple[int, ...],
                  protocol: Protocol | None = None, *, run_id: str) -> Report:
    """The study's trained teacher: its ODE solvers on the study's protocol, on this process's device,
    into its own run."""
    device = evaluation_device()
    model, _, _ = load_trained(f"runs:/{run_id}/checkpoints/final.pt", uri)
    model.to(device)
    protocol = protocol or study_protocol(ExperimentConfig(**exp), spec, shape, lambda *_: None, device)
    report = run_sets(None, ModelVelocity(model), protocol, [], spec.teacher_max_nfe, log=lambda *_: None,
                      progress=False, teacher_tolerances=spec.teacher_tolerances)
    log_report(report, uri, run_id, model=model)
    return report


def score_reference(exp: dict[str, Any], uri: str, spec: EvaluationSpec, shape: tuple[int, ...],
                    protocol: Protocol | None = None, *, run_id: str, checkpoint: str | None = None) -> Report:
    """A velocity the study did not train, into the study's run `run_id`: a given teacher checkpoint's
    (path, s3:// or runs:/, loaded where this runs) as `teacher/<solver>/<metric>`, or without one the
    exact velocity of the experiment's toy target as `exact/<solver>/<metric>` with the floors; both
    tagged with where they ran (`teacher_eval_node`, ...)."""
    device = evaluation_device()
    config = ExperimentConfig(**exp)
    protocol = protocol or study_protocol(config, spec, shape, lambda *_: None, device)
    if checkpoint is not None:
        model = load_flow_map(fetch_checkpoint(checkpoint, uri)).to(device)
        velocity, prefix = ModelVelocity(model), "teacher"
    else:
        velocity, prefix = ExactVelocity(config.data.make_target(), build_interpolant(config)), "exact"
    report = run_sets(None, velocity, protocol, [], spec.teacher_max_nfe, log=lambda *_: None, progress=False,
                      teacher_tolerances=spec.teacher_tolerances)
    logger = RunLogger(uri, run_id)
    log_rows(logger, report.rows, prefix)
    if checkpoint is None:
        log_floors(logger, report)
    logger.set_tags({f"{prefix}_{key}": value for key, value in {**where(), "eval_device": device}.items()})
    logger.flush()
    return report


class Evaluation:
    """The study's one protocol applied to each member and logged into its run: in the study's driver
    (evaluation.resources unset: a laptop), or as Ray tasks that request evaluation.resources (e.g. a
    GPU), side by side as the cluster holds them, each loading its model and data where it runs."""

    def __init__(self, plan: StudyPlan, log=print):
        self.spec, self.uri, self.shape, self.log = plan.study.evaluation, plan.tracking_uri, plan.shape, log
        self.protocols: dict[str, Protocol] = {}

    def protocol(self, exp: ExperimentConfig) -> Protocol:
        """The protocol in the driver, built once per interpolant."""
        key = exp.interpolant.model_dump_json()
        if key not in self.protocols:
            self.protocols[key] = study_protocol(exp, self.spec, self.shape, self.log)
        return self.protocols[key]

    def run(self, jobs: list[tuple[Any, Any, ExperimentConfig, dict[str, Any]]]):
        """`fn(experiment, ..., **kwargs)` (score_method, score_teacher or score_reference) for each (key,
        fn, experiment, kwargs): yields (key, report) as each finishes, one after another in the driver,
        or as Ray tasks side by side."""
        if self.spec.resources is None:
            for i, (key, fn, exp, kwargs) in enumerate(jobs):
                what = {"teacher": "the teacher's ODE solvers", "exact": "the exact velocity's ODE solvers"}.get(
                    key, f"{key[0]}" + (f" seed {key[1]}" if isinstance(key, tuple) and key[1] is not None else ""))
                self.log(f"[fmm] evaluating {what} ({i + 1} of {len(jobs)}, {self.spec.sets} set(s)) ...")
                yield key, fn(exp.model_dump(), self.uri, self.spec, self.shape, self.protocol(exp), **kwargs)
            return
        tasks = {fn: ray.remote(**ray_options(self.spec.resources))(fn) for _, fn, _, _ in jobs}
        pending = {tasks[fn].remote(exp.model_dump(), self.uri, self.spec, self.shape, **kwargs): key
                   for key, fn, exp, kwargs in jobs}
        if pending:
            self.log(f"[fmm] evaluating {len(pending)} run(s) as Ray tasks with {self.spec.resources}")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])

    def logged(self, label: str, report: Report) -> None:
        scores = ", ".join(f"{r.steps}: {r.estimate(report.primary).text()}" for r in report.rows)
        self.log(f"[fmm] evaluated {label} ({report.sampler} sampler), {report.primary} by steps: {scores}")

    def seeds(self, label: str, member_run: str, seed_reports: list[dict]) -> None:
        """A method trained at several seeds: the mean and interval over its seeds x sets, into its run."""
        rows = merge_seeds([[Row(**row) for row in report["rows"]] for report in seed_reports])
        logger = RunLogger(self.uri, member_run)
        log_rows(logger, rows)
        first = seed_reports[0]
        logger.set_tags({"eval_sampler": first["sampler"], "eval_metric": first["primary"],
                         "eval_samples": first["samples"], "eval_sets": self.spec.sets,
                         "eval_seeds": len(seed_reports), **first.get("provenance", {})})
        logger.flush()
        scores = ", ".join(f"{r.steps}: {r.estimate(first['primary']).text()}" for r in rows)
        self.log(f"[fmm] {label} over {len(seed_reports)} seeds x {self.spec.sets} set(s), {first['primary']} by "
                 f"steps: {scores}")


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
                         config=study.model_dump(),
                         params=tracking.flatten({"study": study.model_dump(exclude={"published"})}),
                         tags={"kind": "study", "study": study.name, "ray_storage": study_dir, "eval_metric": "",
                               "methods": ",".join(study.methods),
                               **({"published": study.published.model_dump_json()} if study.published else {})})
    uri, parent = record.tracking_uri, record.mlflow_run_id
    members: dict[str, str] = record.state.setdefault("members", {})  # label -> MLflow run id, once trained
    member_runs: dict[str, str] = record.state.setdefault("member_runs", {})  # label -> run holding its seeds
    seed_runs: dict[str, dict[str, str]] = record.state.setdefault("seed_runs", {})  # label -> seed -> run id
    seed_scores: dict[str, dict[str, dict]] = record.state.setdefault("seed_scores", {})  # label -> seed -> rows
    evaluated: list[str] = record.state.setdefault("evaluated", [])   # scored: labels, "teacher", "exact"
    record.save()
    seeds = f", seeds {study.seeds}" if study.seeds and len(study.seeds) > 1 else ""
    log(f"[fmm] study {study.name}: teacher "
        f"{'trained first' if plan.teacher else (study.teacher.checkpoint or 'exact ' + str(study.teacher.exact))}, "
        f"{len(plan.methods)} method(s){seeds}, {study.evaluation.sets} evaluation set(s); storage {study_dir}; "
        f"MLflow parent run {parent} at {uri}")
    failures: dict[str, str] = {}

    def member_run(member: Member) -> str:
        """The run a method's seed runs nest under (created once, kept across --resume)."""
        if member.label not in member_runs:
            experiment_id = tracking.ensure_experiment(uri, study.tracking.experiment)
            member_runs[member.label] = tracking.start_run(
                uri, experiment_id, member.exp.name, run_params(member.exp),
                {"study": study.name, "study_member": member.label, "study_role": member.role, "kind": "member",
                 "study_seeds": ",".join(map(str, member.seeds))}, parent, member.exp.model_dump())
            record.save()
        return member_runs[member.label]

    def train_all(batch: list[Member], width: int) -> None:
        """Each training run (a member, or one seed of it) as a Ray task, `width` at a time; finished runs
        are skipped, interrupted ones continue."""
        queue = []
        for member in batch:
            runs = member.seed_runs() if member.seeds else [(None, member.exp)]
            container = member_run(member) if member.seeds else parent
            for seed, exp in runs:
                state, run_id = member_status(exp, uri)
                if state == "finished":
                    log(f"[fmm] {exp.name}: finished earlier (MLflow run {run_id})")
                    finished(member, seed, run_id)
                else:
                    queue.append((member, seed, exp, container, state == "interrupted"))
        running: dict[Any, tuple[Member, int | None]] = {}
        if queue:
            width = min(width, concurrency())
            log(f"[fmm] training {len(queue)} run(s), {width} at a time")
            task = ray.remote(num_cpus=0, max_retries=0)(train_member)
        while queue or running:
            while queue and len(running) < width:
                member, seed, exp, container, again = queue.pop(0)
                tags = {"study": study.name, "study_member": member.label, "study_role": member.role}
                if seed is not None:
                    tags.update(study_role="seed", study_seed=str(seed))
                log(f"[fmm] {'continuing' if again else 'training'} {exp.name} ({exp.objective['name']})")
                running[task.remote(exp.model_dump(), container, tags, again)] = (member, seed)
            done, _ = ray.wait(list(running), num_returns=1)
            member, seed = running.pop(done[0])
            try:
                finished(member, seed, ray.get(done[0]))
                log(f"[fmm] {member.label}{'' if seed is None else f' seed {seed}'}: trained")
            except Exception as err:  # the run is FAILED with its reason; the study goes on
                failures[member.label] = str(err).strip().splitlines()[-1][:500]
                log(f"[fmm] {member.label}{'' if seed is None else f' seed {seed}'}: failed: {failures[member.label]}")
                if seed is not None:
                    tracking.end_run(uri, member_run(member), "FAILED")

    def end_strays(container: str, runs: dict[str, str]) -> None:
        """A seed's start killed after its MLflow run was created but before its record was written leaves
        a RUNNING run that no resume continues: ended KILLED, tagged with the run that stands instead."""
        client = tracking.client(uri)
        experiment_id = client.get_run(container).info.experiment_id
        for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{container}'", max_results=5000):
            if run.info.run_id not in runs.values() and run.info.status == "RUNNING":
                tracking.set_tags(uri, run.info.run_id,
                                  {"superseded_by": runs.get(run.data.tags.get("study_seed", ""), "-")})
                tracking.end_run(uri, run.info.run_id, "KILLED")

    def finished(member: Member, seed: int | None, run_id: str) -> None:
        if seed is None:
            members[member.label] = run_id
        else:
            runs = seed_runs.setdefault(member.label, {})
            runs[str(seed)] = run_id
            if len(runs) == len(member.seeds):
                members[member.label] = member_run(member)
                end_strays(members[member.label], runs)
                tracking.end_run(uri, members[member.label], "FINISHED")
        record.save()

    status = "FAILED"
    try:
        if plan.teacher is not None:
            train_all([plan.teacher], 1)
            if "teacher" not in members:
                raise ValueError(f"study {study.name}: the teacher failed ({failures['teacher']}); nothing to distil.")
            if study.teacher.register_as and "teacher_model" not in record.state:
                name, _, alias = study.teacher.register_as.partition("@")
                ref = models.register(uri, members["teacher"], name, alias or None)
                record.state["teacher_model"] = ref.uri
                record.save()
                tracking.set_tags(uri, parent, {"teacher.model": f"{ref.name}/{ref.version}"})
                log(f"[fmm] study {study.name}: registered the teacher as {ref.uri}"
                    f"{f' (alias {alias!r})' if alias else ''}")
            plan.give_teacher(members["teacher"], record.state.get("teacher_model"))
        train_all([m for m in plan.methods if m.sweep is None], sum(len(m.seeds or [None]) for m in plan.methods))
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
                if member.sweep.reseed:  # the best configuration, trained again at each of the study's seeds
                    tracking.set_tags(uri, best[0]["mlflow_run_id"], {"study": study.name, "study_role": "sweep_best",
                                                                       "study_member_best": member.label})
                    member.reseed({k[len("param."):]: v for k, v in best[0].items() if k.startswith("param.")},
                                  study.seeds)
                    log(f"[fmm] {member.label}: the sweep's best trial ({best[0]['mlflow_run_id']}), trained again at "
                        f"seeds {study.seeds}")
                    train_all([member], len(member.seeds))
                    continue
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

        spec = study.evaluation
        if spec.resources is not None:
            concurrency()  # the evaluation tasks need Ray
        jobs = []  # (part, scoring function, experiment, its arguments): every score still to log
        if "teacher" not in evaluated and plan.teacher is not None:
            jobs.append(("teacher", score_teacher, plan.teacher.exp, {"run_id": members["teacher"]}))
        elif "teacher" not in evaluated and study.teacher.checkpoint is not None:
            jobs.append(("teacher", score_reference, first, {"run_id": parent, "checkpoint": study.teacher.checkpoint}))
        if "exact" not in evaluated and first.data.target is not None:
            jobs.append(("exact", score_reference, first, {"run_id": parent}))
        for member in plan.methods:
            if member.label not in members or member.label in evaluated:
                continue
            if member.label not in seed_runs:
                jobs.append(((member.label, None), score_method, member.exp, {"run_id": members[member.label]}))
                continue
            scores = seed_scores.setdefault(member.label, {})
            jobs += [((member.label, seed), score_method, member.exp, {"run_id": run_id}) for seed, run_id in sorted(
                seed_runs[member.label].items(), key=lambda kv: int(kv[0])) if seed not in scores]
        for part, report in evaluation.run(jobs):
            if part in ("teacher", "exact"):
                done(part)
                log(f"[fmm] evaluated the {'teacher' if part == 'teacher' else 'exact velocity'}'s ODE solvers "
                    f"({len(report.rows)} runs)")
                continue
            label, seed = part
            evaluation.logged(label if seed is None else f"{label} seed {seed}", report)
            if seed is None:
                done(label)
                continue
            seed_scores[label][seed] = {"primary": report.primary, "samples": report.samples,
                                        "sampler": report.sampler, "rows": [asdict(r) for r in report.rows],
                                        "provenance": report.provenance}
            record.save()
        for member in plan.methods:  # a method at several seeds: its cells over seeds x sets, once all are scored
            if member.label in seed_runs and member.label in members and member.label not in evaluated:
                scores = seed_scores[member.label]
                evaluation.seeds(member.label, members[member.label],
                                 [scores[s] for s in sorted(scores, key=int)])
                done(member.label)
        primary = (study.evaluation.metrics or ["fid" if len(plan.shape) == 3 else "sw2"])[0]
        tracking.set_tags(uri, parent, {"eval_metric": primary, "eval_samples": str(study.evaluation.samples),
                                        "eval_sets": str(study.evaluation.sets),
                                        "failed_members": ",".join(sorted(failures))})
        status = "FINISHED"
    finally:
        tracking.end_run(uri, parent, status)
    return StudyResult(study.name, uri, parent, failures)
