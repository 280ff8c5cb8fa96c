"""A trained flow map as an MLflow pyfunc model: noise and a step count in, samples out.

MLflow runs this file to load a model that fmm logged (models from code: the model directory holds
this file, the flow-map checkpoint and an MLmodel with the signature, but no pickled Python object):

    model = mlflow.pyfunc.load_model("models:/flow-teacher@champion")
    x = model.predict(noise, params={"steps": 4})   # noise: float32 (n, *sample_shape), drawn from N(0, sigma0^2 I)

`predict` runs the method's own sampler (fmm.objectives.sampler_for: the N-step flow-map chain, or
the consistency and gamma samplers of consistency models and CTM) from the given noise, so the same
noise gives the same samples; sigma0 is in the model's metadata (`fmm.sigma0`). fmm itself never
runs this to read a registered model: it reads the checkpoint (fmm.infra.models).
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from fmm.checkpoint import load_flow_map
from fmm.experiment.builders import method_sampler


class FlowMapModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        path = context.artifacts["flow_map"]
        self.model = load_flow_map(path).eval()
        # the method's own sampler, seeded as `fmm sample` seeds it by default (seed 0): the same samples
        self.sampler = method_sampler(path, None, seed=2)[1]

    # np.ndarray is a hint MLflow infers no schema from: the logged signature validates the input (any other
    # hint, or none, makes MLflow warn at every class definition, past any filter: it resets them)
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        steps = int((params or {}).get("steps", 1))
        if steps < 1:
            raise ValueError(f"params.steps must be a positive integer; got {steps}.")
        noise = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if tuple(noise.shape[1:]) != tuple(self.model.sample_shape):
            raise ValueError(f"the noise has samples of shape {list(noise.shape[1:])}, but this flow map takes "
                             f"{list(self.model.sample_shape)}.")
        with torch.no_grad():
            return self.sampler(self.model, noise, steps).samples.numpy()


mlflow.models.set_model(FlowMapModel())
