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
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from fmm.checkpoint import FORMAT, load_payload, read_flow_map
from fmm.infra import tracking

PYFUNC_CODE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "evaluation", "pyfunc.py")


def _requirement(package: str) -> str | None:
    try:
        return f"{package}=={version(package).split('+')[0]}"
    except PackageNotFoundError:
        return None


def log_flow_map_model(uri: str, run_id: str, checkpoint: str, name: str = "model") -> str:
    """Log the flow-map file `checkpoint` as a pyfunc model `name` of run `run_id` (an MLflow logged
    model: the run's page and its experiment's Models tab list it; `runs:/<run id>/<name>` loads it);
    its model id."""
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
        # MLflow suggests an input example; the signature above says what predict takes
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        local, named = os.path.join(folder, "model"), os.path.join(folder, "flow_map.pt")
        shutil.copyfile(checkpoint, named)
        mlflow.pyfunc.save_model(local, python_model=PYFUNC_CODE, artifacts={"flow_map": named},
                                 signature=signature, metadata=metadata, pip_requirements=requirements)
        c = tracking.client(uri)
        logged = c.create_logged_model(c.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id,
                                       model_type="fmm-flow-map",
                                       params={"objective": metadata["fmm.objective"], "step": str(metadata["fmm.step"])})
        c.log_model_artifacts(logged.model_id, local)
        c.finalize_logged_model(logged.model_id, "READY")
        c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, metadata["fmm.step"])])
    return logged.model_id


@dataclass
class ModelRef:
    """A registered model version: what `models:/NAME@ALIAS` or `models:/NAME/VERSION` resolved to."""
    name: str
    version: str
    alias: str | None
    run_id: str
    source: str               # models:/<logged model id>, or runs:/<run id>/<artifact path>
    location: str = ""        # where the model's files are (the artifact store's URI)
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
    ref = ModelRef(name, str(found.version), alias, found.run_id or "", found.source,
                   location=c.get_model_version_download_uri(name, str(found.version)))
    mlmodel = _mlmodel(ref, tracking_uri)
    artifacts = (mlmodel.get("flavors", {}).get("python_function") or {}).get("artifacts") or {}
    if mlmodel.get("metadata", {}).get("fmm.format") != FORMAT or "flow_map" not in artifacts:
        kinds = ", ".join(sorted(mlmodel.get("flavors", {}))) or "unknown"
        raise ValueError(f"{model_uri!r} (version {ref.version}) is a model of flavour(s) {kinds}, not an fmm flow "
                         f"map: register a model that fmm logged (a run's `model` or `best_model`).")
    ref.checkpoint = artifacts["flow_map"]["path"]
    return ref


def _mlmodel(ref: ModelRef, tracking_uri: str) -> dict:
    """The model's MLmodel file, parsed; {} when it has none (not an MLflow model)."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = _download(ref, "MLmodel", tracking_uri, folder)
        except MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower():
                return {}
            raise ValueError(f"{ref.uri}: cannot read its MLmodel at {ref.location}: {str(err).splitlines()[0]}") from None
        with open(path) as f:
            return yaml.safe_load(f) or {}


def _download(ref: ModelRef, path: str, tracking_uri: str, folder: str) -> str:
    return mlflow.artifacts.download_artifacts(artifact_uri=f"{ref.location.rstrip('/')}/{path}", dst_path=folder,
                                               tracking_uri=tracking_uri)


def download_checkpoint(ref: ModelRef, tracking_uri: str, folder: str) -> str:
    """The flow-map file of a registered fmm model, downloaded into `folder`."""
    return _download(ref, ref.checkpoint, tracking_uri, folder)


def register(tracking_uri: str, run_id: str, name: str, alias: str | None = None, model: str = "model") -> ModelRef:
    """Register run `run_id`'s logged model `model` (a logged model of that name, else the run's artifact
    folder of that name) as a new version of registered model `name` (created if needed), and point
    `alias` at it."""
    c = tracking.client(tracking_uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, tags={"fmm.format": FORMAT})
        except MlflowException:  # created meanwhile by another process
            pass
    run = c.get_run(run_id)
    logged = [m for m in c.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                filter_string=f"source_run_id = '{run_id}'") if m.name == model]
    if logged:
        # MLflow's SQL registry looks the logged model up through the process's global tracking URI (a
        # TODO in its create_model_version), not this client's: point it at the store for this call.
        with _use_tracking_uri(tracking_uri):
            found = c.create_model_version(name, f"models:/{logged[0].model_id}", run_id=run_id,
                                           model_id=logged[0].model_id)
    else:
        found = c.create_model_version(name, f"runs:/{run_id}/{model}", run_id=run_id)
    if alias:
        c.set_registered_model_alias(name, alias, found.version)
    return ModelRef(name, str(found.version), alias, run_id, found.source)
