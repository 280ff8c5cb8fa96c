"""Sweep files: Ray Tune with Optuna over any experiment key, each trial a training run.

    name: flower-schedules
    base: ../train/flower_lmd.yaml        # the experiment every trial starts from (relative to this file)
    set: {train.steps: 300, train.eval_every: 100}     # overrides of the base, for every trial
    space:                                # dotted experiment keys; Optuna distributions
      interpolant.schedule: {categorical: [linear, trig]}
      objective.diagonal_fraction: {float: [0.0, 0.5]}
      optim.lr: {float: [1.0e-4, 1.0e-2], log: true}
      network.depth: {int: [2, 4]}
      objective.invertibility_weight: {float: [0.1, 10], log: true, when: {objective.name: two_map}}
    metric: eval/sw2_steps001             # or a list of {name, mode} for a multi-objective search
    mode: min
    search: {sampler: tpe, seed: 0, num_samples: 8, max_concurrent_trials: 2}
    scheduler: {kind: asha, grace_period: 100, reduction_factor: 2}      # or {kind: fifo}
    storage: {path: ./sweeps}             # or s3://bucket/prefix
    tracking: {experiment: fmm-sweeps}

`when` makes a key conditional on values sampled before it (or the base's). Every probe value of
the space (each choice, both ends of each range) must give a valid experiment before a trial starts.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal

from pydantic import Field, model_validator

from fmm.config import StrictModel, validate
from fmm.experiment.builders import reported_metrics
from fmm.experiment.checks import check_config
from fmm.experiment.schema import (ExperimentConfig, TrackingConfig, absolute_paths, apply_overrides, load_experiment,
                                   read_yaml, set_key)
from fmm.infra import storage


class Distribution(StrictModel):
    """One key of the search space: exactly one of categorical, float, int; `when` conditions it."""

    categorical: list[Any] | None = None
    float_: tuple[float, float] | None = Field(None, alias="float")
    int_: tuple[int, int] | None = Field(None, alias="int")
    log: bool = False
    step: float | None = Field(None, gt=0)
    when: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        kinds = [k for k, v in (("categorical", self.categorical), ("float", self.float_), ("int", self.int_))
                 if v is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of categorical: [...], float: [low, high] or int: [low, high]")
        if self.categorical is not None and not self.categorical:
            raise ValueError("categorical needs at least one choice")
        bounds = self.float_ or self.int_
        if bounds is not None:
            low, high = bounds
            if low > high:
                raise ValueError(f"low ({low}) must not exceed high ({high})")
            if self.log and low <= 0:
                raise ValueError(f"a log-scale range needs low > 0; got {low}")
        return self

    def probes(self) -> list[Any]:
        """The values that bound what a trial can be given: every choice, or both ends."""
        if self.categorical is not None:
            return list(self.categorical)
        return list(self.float_ or self.int_)

    def suggest(self, trial, name: str) -> Any:
        if self.categorical is not None:
            return trial.suggest_categorical(name, self.categorical)
        if self.float_ is not None:
            return trial.suggest_float(name, *self.float_, log=self.log, step=self.step)
        return trial.suggest_int(name, *self.int_, log=self.log, step=int(self.step or 1))


class MetricSpec(StrictModel):
    name: str
    mode: Literal["min", "max"] = "min"


class SearchSettings(StrictModel):
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    num_samples: int = Field(8, ge=1, le=100_000)
    max_concurrent_trials: int = Field(2, ge=1, le=10_000)
    # a trial lost to the infrastructure (its process or node gone) starts again from its last checkpoint
    # this many times; a trial that diverged is not trained again
    max_failures: int = Field(2, ge=0, le=100)


class SchedulerSettings(StrictModel):
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int | None = Field(None, ge=1)   # training steps; default: the evaluation interval
    reduction_factor: float = Field(2.0, gt=1.0)


class SweepStorage(StrictModel):
    path: str = "./sweeps"


class SweepConfig(StrictModel):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    base: str
    set: dict[str, Any] = {}
    space: dict[str, Distribution]
    metric: str | list[MetricSpec]
    mode: Literal["min", "max"] = "min"
    search: SearchSettings = SearchSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    storage: SweepStorage = SweepStorage()
    tracking: TrackingConfig = TrackingConfig(experiment="fmm-sweeps")
    trial_mode: Literal["auto", "in_process", "trainer"] = "auto"

    @model_validator(mode="after")
    def _checks(self) -> SweepConfig:
        storage.refuse_credentials(self.storage.path, "storage.path")
        storage.refuse_credentials(self.tracking.uri, "tracking.uri")
        if not self.space:
            raise ValueError("space is empty: name at least one experiment key to search over")
        if isinstance(self.metric, list):
            if not self.metric:
                raise ValueError("metric: give a name, or a non-empty list of {name, mode}")
            if self.scheduler.kind == "asha" and len(self.metric) > 1:
                raise ValueError("scheduler 'asha' stops trials on one metric: a multi-objective search "
                                 "needs scheduler: {kind: fifo}")
        return self

    @property
    def metrics(self) -> list[MetricSpec]:
        return [MetricSpec(name=self.metric, mode=self.mode)] if isinstance(self.metric, str) else self.metric


# -- loading and validation (all before any trial starts) ----------------------------------------

def holds(when: dict[str, Any], values: dict[str, Any], base: dict[str, Any]) -> bool:
    for key, wanted in when.items():
        value = values[key] if key in values else _lookup(base, key)
        if value != wanted:
            return False
    return True


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def load_sweep(path: str, overrides: list[str] | None = None) -> tuple[SweepConfig, dict[str, Any]]:
    """The validated sweep and the base experiment tree (with `set` applied), every trial's starting point."""
    raw = apply_overrides(read_yaml(path, "sweep"), overrides, "search.num_samples=4")
    sweep = validate(SweepConfig, raw, f"sweep {path}")
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), sweep.base)
    if not os.path.isfile(base_path):
        raise ValueError(f"sweep {path}: base experiment {sweep.base!r} not found (looked for {base_path}).")
    base = read_yaml(base_path, "base experiment")
    for key, value in sweep.set.items():
        set_key(base, key, value)
    absolute_paths(base)
    check_sweep(sweep, base)
    return sweep, base


def trial_experiment(sweep: SweepConfig, base: dict[str, Any], values: dict[str, Any], name: str,
                     tracking_uri: str | None = None) -> ExperimentConfig:
    """The experiment of one trial: the base with the sampled values, its own name, the sweep's storage
    and the sweep's (resolved, absolute) tracking URI."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        set_key(raw, key, value)
    raw["name"] = name
    raw["storage"] = {"path": storage.join(storage.absolute(sweep.storage.path), sweep.name, "runs")}
    raw["tracking"] = {**sweep.tracking.model_dump(), "uri": tracking_uri or sweep.tracking.uri}
    if raw.get("train", {}).get("eval_every"):
        raw["train"]["checkpoint_every"] = raw["train"]["eval_every"]  # every report carries the metric
    return load_experiment(raw=raw)


def check_sweep(sweep: SweepConfig, base: dict[str, Any]) -> None:
    """Every key of the space exists (each probe value gives a valid experiment, by check_config), the
    metric is one the trials report, and the evaluation interval divides the run."""
    try:
        exp = trial_experiment(sweep, base, {}, f"{sweep.name}-probe")
    except ValueError as err:
        raise ValueError(f"sweep {sweep.name}: the base experiment {sweep.base!r} is invalid: {err}") from None
    for key, dist in sweep.space.items():
        for probe in dist.probes():
            values = {k: v for k, v in dist.when.items()}
            values[key] = probe
            try:
                check_config(trial_experiment(sweep, base, values, f"{sweep.name}-probe"))
            except ValueError as err:
                raise ValueError(f"sweep {sweep.name}: space key {key!r} with value {probe!r}"
                                 f"{' (when ' + str(dist.when) + ')' if dist.when else ''} does not give a "
                                 f"valid experiment: {err}") from None
    trial_resources(exp, sweep.trial_mode)
    reported = reported_metrics(exp)
    for metric in sweep.metrics:
        if metric.name not in reported:
            hint = "" if exp.train.eval_every else " (set train.eval_every to report evaluation metrics)"
            raise ValueError(f"sweep {sweep.name}: metric {metric.name!r} is not reported by the trials; they "
                             f"report {reported}{hint}.")
    if exp.train.eval_every and exp.train.steps % exp.train.eval_every:
        raise ValueError(f"sweep {sweep.name}: train.steps ({exp.train.steps}) must be a multiple of "
                         f"train.eval_every ({exp.train.eval_every}), so every trial reports at its end.")


def trial_resources(exp: ExperimentConfig, mode: str = "auto") -> tuple[bool, dict[str, float]]:
    """(in_process, resources of the trial's own actor). One CPU worker (mode auto or in_process): the
    loop runs in the trial, which holds its CPUs. Otherwise (or mode trainer) a TorchTrainer's workers
    hold theirs and the trial a sliver."""
    scaling = exp.scaling
    single = scaling.num_workers == 1 and not scaling.use_gpu
    if mode == "in_process" and not single:
        raise ValueError(f"trial_mode 'in_process' runs one CPU worker in the trial's process; this experiment has "
                         f"{scaling.num_workers} workers{' on GPUs' if scaling.use_gpu else ''}: use auto or trainer.")
    if single and mode != "trainer":
        return True, {"CPU": scaling.cpus_per_worker}
    return False, {"CPU": 0.01}
