"""Flow maps as MLflow models and in MLflow's model registry.

Each training run logs its final and best EMA flow maps as pyfunc models (`model`, `best_model`):
the flow-map checkpoint, the code that samples from it (fmm/evaluation/pyfunc.py, MLflow's models
from code: no pickled object), a signature (noise of the map's sample shape in, samples out, a
`steps` parameter) and fmm's metadata (`fmm.format`, `fmm.sigma0`, `fmm.step`). Any of them can be
registered, and `models:/NAME@ALIAS` or `models:/NAME/VERSION` then names it wherever fmm takes a
checkpoint (a teacher's path, `init`, `fmm sample`, `fmm evaluate`). fmm reads a registered model's
checkpoint with `weights_only=True`; it never runs the model's code to load it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import mlflow
import numpy as np
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from fmm.checkpoint import FORMAT, load_payload, read_flow_map
from fmm.infra import tracking

PYFUNC_CODE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "evaluation", "pyfunc.py")


def _requirement(package: str) -> str | None:
    try:
        return f"{package}=={version(package).split('+')[0]}"
    except PackageNotFoundError:
        return None


def log_flow_map_model(uri: str, run_id: str, checkpoint: str, artifact_path: str = "model") -> None:
    """Log the flow-map file `checkpoint` into run `run_id` as a pyfunc model under `artifact_path`."""
    payload = load_payload(checkpoint)
    model, config = read_flow_map(checkpoint)
    shape = tuple(model.sample_shape)
    sigma0 = float(((config or {}).get("interpolant") or {}).get("sigma0", 1.0))
    samples = TensorSpec(np.dtype(np.float32), (-1, *shape))
    signature = ModelSignature(inputs=Schema([samples]), outputs=Schema([samples]),
                               params=ParamSchema([ParamSpec("steps", "long", 1)]))
    metadata = {"fmm.format": FORMAT, "fmm.sigma0": sigma0, "fmm.step": int(payload.get("step") or 0),
                "fmm.sample_shape": list(shape),
                "fmm.objective": ((config or {}).get("objective") or {}).get("name", "")}
    requirements = [r for r in map(_requirement, ("fmm", "torch", "mlflow", "numpy")) if r]
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # MLflow suggests type hints and an input example; the signature above says what predict takes
        warnings.filterwarnings("ignore", message=".*(type hints|input example).*", category=UserWarning)
        local, named = os.path.join(folder, "model"), os.path.join(folder, "flow_map.pt")
        shutil.copyfile(checkpoint, named)
        mlflow.pyfunc.save_model(local, python_model=PYFUNC_CODE, artifacts={"flow_map": named},
                                 signature=signature, metadata=metadata, pip_requirements=requirements)
        tracking.client(uri).log_artifacts(run_id, local, artifact_path)


@dataclass
class ModelRef:
    """A registered model version: what `models:/NAME@ALIAS` or `models:/NAME/VERSION` resolved to."""
    name: str
    version: str
    alias: str | None
    run_id: str
    source: str               # runs:/<run id>/<artifact path>
    checkpoint: str = ""      # the flow-map file's path inside the model's folder (from its MLmodel)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse(model_uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of models:/NAME@ALIAS or models:/NAME/VERSION; a ValueError otherwise."""
    body = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    name, at, alias = body.partition("@")
    if at and name and alias and "/" not in body:
        return name, alias, None
    name, slash, number = body.partition("/")
    if slash and name and number.isdigit():
        return name, None, number
    raise ValueError(f"{model_uri!r} is not a registered model's URI: give models:/NAME@ALIAS or "
                     f"models:/NAME/VERSION (e.g. models:/flow-teacher@champion).")


def resolve(model_uri: str, tracking_uri: str) -> ModelRef:
    """The model version `model_uri` names in the registry at `tracking_uri`, checked to be an fmm flow
    map; a ValueError naming what does not exist (the model, the alias, the version) otherwise."""
    name, alias, number = parse(model_uri)
    c = tracking.client(tracking_uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"{model_uri!r}: no registered model named {name!r} in the MLflow registry at "
                         f"{tracking_uri}.") from None
    try:
        found = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, number)
    except MlflowException:
        what = f"alias {alias!r} is not set" if alias else f"version {number} does not exist"
        raise ValueError(f"{model_uri!r}: registered model {name!r} exists but its {what} (at "
                         f"{tracking_uri}).") from None
    ref = ModelRef(name, str(found.version), alias, found.run_id or "", found.source)
    mlmodel = _mlmodel(ref, tracking_uri)
    artifacts = (mlmodel.get("flavors", {}).get("python_function") or {}).get("artifacts") or {}
    if mlmodel.get("metadata", {}).get("fmm.format") != FORMAT or "flow_map" not in artifacts:
        kinds = ", ".join(sorted(mlmodel.get("flavors", {}))) or "unknown"
        raise ValueError(f"{model_uri!r} (version {ref.version}) is a model of flavour(s) {kinds}, not an fmm flow "
                         f"map: register a model that fmm logged (a run's `model` or `best_model`).")
    ref.checkpoint = artifacts["flow_map"]["path"]
    return ref


def _mlmodel(ref: ModelRef, tracking_uri: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(f"{ref.source.rstrip('/')}/MLmodel", dst_path=folder,
                                                       tracking_uri=tracking_uri)
        except Exception:
            return {}
        with open(path) as f:
            return yaml.safe_load(f) or {}


def download_checkpoint(ref: ModelRef, tracking_uri: str, folder: str) -> str:
    """The flow-map file of a registered fmm model, downloaded into `folder`."""
    return mlflow.artifacts.download_artifacts(f"{ref.source.rstrip('/')}/{ref.checkpoint}", dst_path=folder,
                                               tracking_uri=tracking_uri)


def register(tracking_uri: str, run_id: str, name: str, alias: str | None = None,
             artifact_path: str = "model") -> ModelRef:
    """Register run `run_id`'s logged flow map as a new version of model `name` (created if needed),
    and point `alias` at it."""
    c = tracking.client(tracking_uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, tags={"fmm.format": FORMAT})
        except MlflowException:  # created meanwhile by another process
            pass
    found = c.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id)
    if alias:
        c.set_registered_model_alias(name, alias, found.version)
    return ModelRef(name, str(found.version), alias, run_id, found.source)
