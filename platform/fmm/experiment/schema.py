"""Experiment files: the YAML a user writes, validated by pydantic before any work starts.

    name: flower-lmd
    data: {target: flower}                      # or {path: ./data/flower} / s3://... Parquet shards
                                                # a target's options: {target: checkerboard, target_options: {extent: 1.0}}
    interpolant: {schedule: linear, sigma0: 1.0}   # sigma0: data -> the data's standard deviation
    network: {name: mlp, dim: 2, width: 256, depth: 3}
    objective: {name: lmd, diagonal_fraction: 0.25}
    teacher: {kind: exact, target: flower}      # distillation only
    init: teacher                               # none | teacher | a flow-map file; default: the method's paper
    optim: {name: adamw, lr: 2e-3, warmup_steps: 100, decay: cosine, grad_clip: 1.0}
    train: {steps: 2000, batch_size: 1024, ema_decay: 0.999, checkpoint_every: 500, log_every: 50}
    scaling: {num_workers: 1, cpus_per_worker: 2, use_gpu: false}
    storage: {path: ./runs}                     # or s3://bucket/prefix
    tracking: {experiment: fmm}                 # uri: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db

`--set key.sub=value` overrides any key (the value is read as YAML). Unknown keys and bad values
are one error naming the key.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from fmm.config import StrictModel, validate
from fmm.groundtruth import make_target
from fmm.infra import storage
from fmm.infra.storage import refuse_credentials


class DataConfig(StrictModel):
    target: str | None = None
    # The target's options, by name (`fmm.groundtruth.target_options`): checkerboard {squares: 4, extent: 2.0}
    # (the board on [-extent, extent]^2), flower {modes: 8, radius: 5.0, variance: 0.5}.
    target_options: dict[str, Any] = {}
    path: str | None = None
    # A worker holds its part of the shards in memory up to this many rows (uint8 for images); a larger
    # part is streamed through a shuffle buffer of this many rows (fmm.experiment.data.RowStream).
    buffer_rows: int = Field(65536, ge=256, le=10**8)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.target is None) == (self.path is None):
            raise ValueError("give exactly one of target (a toy target sampled exactly) or path (Parquet shards)")
        if self.target_options and self.target is None:
            raise ValueError("target_options configure a toy target (data.target); Parquet data takes none")
        if self.target is not None:
            self.make_target()
        return self

    def make_target(self):
        """The toy target with its options (a ValueError naming data.target_options if they are wrong)."""
        try:
            return make_target(self.target, self.target_options)
        except ValueError as err:
            raise ValueError(f"data.target / data.target_options: {err}") from None


class InterpolantConfig(StrictModel):
    schedule: str = "linear"
    params: dict[str, float] = {}
    # The base's standard deviation; `data`: a toy target's, in closed form, as the self-distillation paper
    # scales its Gaussian base (2505.18825 App. G). Resolved to the number when the experiment is read, so a
    # run's config records the value it trained with.
    sigma0: Annotated[float, Field(gt=0)] | Literal["data"] = 1.0
    latent_noise: float = Field(0.0, ge=0)


class OptimConfig(StrictModel):
    name: Literal["adam", "adamw", "radam"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["none", "cosine", "sqrt"] = "none"
    decay_start: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)


class DebugConfig(StrictModel):
    """Fault injection, to exercise recovery: logged as params only when set."""

    fail_at_step: int | None = Field(None, ge=1)  # the last worker raises once at this step (never after a restart)
    nan_at_step: int | None = Field(None, ge=1)   # the last worker's batch is NaN once at this step (divergence)
    kill_at_step: int | None = Field(None, ge=1)  # the last worker SIGKILLs its own process at this step (never
                                                  # after a restart): a lost process, as the OOM killer leaves it


class TrainConfig(StrictModel):
    steps: int = Field(1000, ge=1, le=10**10)
    batch_size: int = Field(256, ge=1, le=2**24)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    log_every: int = Field(50, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    sample_steps: list[int] = [1, 2, 4]
    eval_every: int | None = Field(None, ge=1)      # periodic evaluation of the EMA map (rank 0)
    eval_steps: list[int] = [1, 2, 4]
    eval_samples: int = Field(2000, ge=10, le=10**7)
    eval_sets: int = Field(1, ge=1, le=100)       # periodic evaluation: the mean over this many evaluation sets
    eval_metric: Literal["auto", "sw2", "energy", "mmd", "fd_classifier", "fid"] = "auto"

    @field_validator("sample_steps", "eval_steps")
    @classmethod
    def _step_counts(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 1 <= k <= 4096 for k in steps):
            raise ValueError(f"sampling step counts are integers from 1 to 4096, e.g. [1, 2, 4]; got {steps}")
        return steps
    max_rollbacks: int = Field(3, ge=0)            # non-finite loss or gradient: back to the last checkpoint
    rollback_lr_factor: float = Field(0.5, gt=0, le=1)  # ... with the learning rate times this, each time
    debug: DebugConfig | None = None


class ScalingConfig(StrictModel):
    num_workers: int = Field(1, ge=1, le=10**5)
    min_workers: int | None = Field(None, ge=1)   # elastic: after a lost node, go on with as few as this
    cpus_per_worker: int = Field(1, ge=1, le=4096)
    gpus_per_worker: float = Field(0, ge=0, le=64)
    use_gpu: bool = False
    max_failures: int = Field(0, ge=-1)


class StorageConfig(StrictModel):
    path: str = "./runs"


class TrackingConfig(StrictModel):
    uri: str | None = None
    experiment: str = "fmm"
    flush_seconds: float = Field(5, ge=0, le=3600)          # training metrics reach MLflow within this delay
    system_metrics_seconds: float = Field(10, ge=0, le=3600)  # CPU, memory, GPU sampled this often; 0: off


class ExperimentConfig(StrictModel):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    data: DataConfig
    interpolant: InterpolantConfig = InterpolantConfig()
    network: dict[str, Any]
    objective: dict[str, Any]
    teacher: dict[str, Any] | None = None
    init: str | None = Field(None, min_length=1)   # none | teacher | checkpoint path or URI; None: the paper's
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _parts(self) -> ExperimentConfig:
        for key, uri in (("data.path", self.data.path), ("storage.path", self.storage.path),
                         ("tracking.uri", self.tracking.uri), ("teacher.path", (self.teacher or {}).get("path")), ("init", self.init)):
            refuse_credentials(uri, key)
        if "name" not in self.network:
            raise ValueError("network needs a 'name' (mlp or unet) and its keyword arguments")
        if self.interpolant.sigma0 == "data" or self.network.get("input_scale") == "data":
            std = data_std(self.data)
            if self.interpolant.sigma0 == "data":
                self.interpolant.sigma0 = std
            if self.network.get("input_scale") == "data":
                self.network = {**self.network, "input_scale": std}
        teacher = self.teacher or {}
        if (teacher.get("kind") == "exact" and teacher.get("target") == self.data.target
                and "target_options" not in teacher and self.data.target_options):
            self.teacher = {**teacher, "target_options": dict(self.data.target_options)}  # the data's own board
        if "name" not in self.objective:
            raise ValueError("objective needs a 'name' (see `fmm objectives`)")
        if self.scaling.min_workers is not None and self.scaling.min_workers > self.scaling.num_workers:
            raise ValueError(f"scaling.min_workers ({self.scaling.min_workers}) must not exceed scaling.num_workers "
                             f"({self.scaling.num_workers})")
        if self.train.batch_size % self.scaling.num_workers:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must divide evenly over "
                             f"scaling.num_workers ({self.scaling.num_workers})")
        return self


def data_std(data: DataConfig) -> float:
    """A toy target's standard deviation sqrt(tr Cov / d), in closed form."""
    if data.target is None:
        raise ValueError("sigma0: data and network.input_scale: data take the standard deviation of a toy target "
                         "(data.target); for Parquet data give the number.")
    return data.make_target().std()


def set_key(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


MAX_YAML_BYTES = 1 << 20      # a config file, not a data set
MAX_YAML_VALUES = 100_000     # after anchors and aliases are expanded


def read_yaml(path: str | None, what: str) -> dict[str, Any]:
    """A YAML mapping from a file; a missing, oversized, binary or non-mapping file, bad YAML, or aliases
    that expand beyond reason are each a ValueError naming the file."""
    if path is None or not os.path.isfile(path):
        raise ValueError(f"{what} file {path!r} not found.")
    if os.path.getsize(path) > MAX_YAML_BYTES:
        raise ValueError(f"{what} file {path!r} is {os.path.getsize(path):,} bytes; a config file is at most "
                         f"{MAX_YAML_BYTES:,}.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} file {path!r} is not UTF-8 text (byte {err.start}): give a YAML file.") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{what} file {path!r} is not valid YAML: {' '.join(str(err).split())}") from None
    if tree is None:
        raise ValueError(f"{what} file {path!r} is empty: it needs a mapping of sections (see experiments/).")
    if not isinstance(tree, dict):
        raise ValueError(f"{what} file {path!r} holds a {type(tree).__name__}, not a mapping of sections "
                         f"(see experiments/).")
    _check_size(tree, f"{what} file {path!r}")
    return interpolate(tree, f"{what} file {path!r}")


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def interpolate(tree: Any, where: str, key: str = "") -> Any:
    """`${NAME}` in any string value replaced by the environment variable NAME (e.g. `${FMM_BUCKET}`,
    which a cluster's runtime env sets once for every file). An unset or empty variable, or one whose
    value carries credentials, is a ValueError naming it and the key."""
    if isinstance(tree, dict):
        return {k: interpolate(v, where, f"{key}.{k}" if key else str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [interpolate(v, where, f"{key}[{i}]") for i, v in enumerate(tree)]
    if not isinstance(tree, str) or "${" not in tree:
        return tree

    def value(match: re.Match) -> str:
        name = match.group(1)
        found = os.environ.get(name)
        if not found:
            example = " (e.g. FMM_BUCKET=s3://my-bucket/fmm)" if name == "FMM_BUCKET" else ""
            raise ValueError(f"{where}: {key} uses ${{{name}}}, which is not set in this environment: export it"
                             f"{example}, or set it in the cluster's runtime env (cluster/runtime_env.yaml).")
        refuse_credentials(found, f"${{{name}}} (used by {key})")
        return found

    return ENV_REFERENCE.sub(value, tree)


def _check_size(tree: Any, where: str) -> None:
    """Refuse a tree whose anchors and aliases expand to more than MAX_YAML_VALUES values."""
    count, stack = 0, [tree]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise ValueError(f"{where} expands to more than {MAX_YAML_VALUES:,} values (anchors and aliases "
                             f"included); a config is far smaller.")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None, example: str) -> dict[str, Any]:
    """A copy of `tree` with each `key=value` (dotted key, value read as YAML) applied."""
    tree = copy.deepcopy(tree)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set takes key=value (a dotted key such as {example}); got {item!r}.")
        key, text = item.split("=", 1)
        set_key(tree, key.strip(), yaml.safe_load(text))
    return tree


def absolute_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Ray workers and Tune trials run in other folders: an experiment's local data and teacher paths are
    made absolute, relative to the current folder (as its storage path is); URIs, runs:/ and models:/ unchanged."""
    data = raw.get("data") or {}
    if isinstance(data.get("path"), str):
        data["path"] = storage.absolute(data["path"])
    teacher = raw.get("teacher") or {}
    if isinstance(teacher.get("path"), str):
        teacher["path"] = storage.absolute(teacher["path"])
    return raw


def load_experiment(path: str | None = None, overrides: list[str] | None = None,
                    raw: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment file (or mapping), applying `key=value` overrides."""
    if raw is None:
        raw = read_yaml(path, "experiment")
    tree = absolute_paths(apply_overrides(raw, overrides, "train.steps=500"))
    return validate(ExperimentConfig, tree, f"experiment {path or ''}".strip())
