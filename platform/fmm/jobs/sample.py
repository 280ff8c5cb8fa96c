"""`fmm sample`: N-step samples of a trained flow map, written as an array another tool can score.

The noise is an input (a .npy file) or drawn from a seed, so the same noise always gives the same
samples. Checkpoints are flow-map files (final.pt / best.pt, EMA weights), given as a local path,
an s3:// URI, runs:/<mlflow run id>[/artifact path] or a registered model (models:/NAME@ALIAS).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fmm.checkpoint import load_flow_map
from fmm.experiment.builders import method_sampler
from fmm.experiment.teachers import fetch_checkpoint
from fmm.infra import storage


def sample(checkpoint: str, steps: int, *, noise_path: str | None = None, samples: int = 1000, seed: int = 0,
           tracking_uri: str | None = None, device: str = "cpu", sampler: str | None = None,
           gamma: float = 0.0) -> np.ndarray:
    """Samples of the checkpoint's map at `steps` steps, with its method's sampler (or `sampler`); the
    stochastic samplers' fresh noise is drawn from `seed` + 2, so the output is a function of the noise."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"--steps must be a positive integer; got {steps!r}.")
    local = fetch_checkpoint(checkpoint, tracking_uri)
    model = load_flow_map(local).to(device).eval()
    sigma0, run = method_sampler(local, sampler, seed + 2, gamma)
    if noise_path is not None:
        noise = torch.from_numpy(np.load(noise_path)).float()
        if tuple(noise.shape[1:]) != tuple(model.sample_shape):
            raise ValueError(f"noise in {noise_path!r} has samples of shape {list(noise.shape[1:])}, but the model "
                             f"takes {list(model.sample_shape)}.")
    else:
        g = torch.Generator().manual_seed(seed)
        noise = sigma0 * torch.randn((samples, *model.sample_shape), generator=g)
    with torch.no_grad():
        out = run(model, noise.to(device), steps).samples
    return out.cpu().numpy()


def write(array: np.ndarray, out: str) -> None:
    buffer = io.BytesIO()
    if out.endswith(".npy"):
        np.save(buffer, array)
    elif out.endswith(".parquet"):
        flat = array.reshape(len(array), -1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        table = pa.table({"x": column}).replace_schema_metadata({"fmm.shape": str(list(array.shape[1:]))})
        pq.write_table(table, buffer)
    else:
        raise ValueError(f"--out must end in .npy or .parquet; got {out!r}.")
    storage.write_bytes(out, buffer.getvalue())
