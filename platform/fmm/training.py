"""One optimisation step of any objective, and a plain in-process loop around it.

The step is all the distributed training loop needs from the math core: it knows nothing about
which objective it runs, averages gradients across workers itself (see fmm.distributed), and
clips them. Teacher-free and distillation objectives go through the same call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fmm.distributed import all_reduce_gradients
from fmm.flowmap import TwoTimeMap, VelocityField
from fmm.objectives import Objective


def trainable_parameters(model: TwoTimeMap, objective: Objective) -> list[torch.nn.Parameter]:
    """The model's parameters plus the objective's own (a learned weight), never a frozen teacher's."""
    return [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]


def train_step(model: TwoTimeMap, objective: Objective, optimiser: torch.optim.Optimizer, batch: Tensor, *,
               teacher: VelocityField | None, step: int, grad_clip: float | None = None,
               bf16: bool = False) -> dict[str, Any]:
    """One step; with `bf16` the loss's forward passes run under bf16 autocast (JVPs stay fp32, see
    TwoTimeMap.jvp) and the backward pass outside it, as PyTorch recommends.

    A non-finite loss or gradient is caught before the optimiser moves: the step is skipped and
    `logs["skipped"]` is True. A worker whose own loss is not finite poisons its gradients with NaN
    before they are averaged, so that every worker sees the same non-finite norm and skips together."""
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, logs = objective(model, batch, teacher=teacher, step=step)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimiser.param_groups for p in group["params"]]
    if not torch.isfinite(loss.detach()):
        for p in params:
            if p.grad is not None:
                p.grad.fill_(float("nan"))
    all_reduce_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf")).detach()
    logs["grad_norm"] = norm
    logs["skipped"] = not bool(torch.isfinite(norm))
    if logs["skipped"]:
        optimiser.zero_grad(set_to_none=True)
    else:
        optimiser.step()
    return logs


def fit(model: TwoTimeMap, objective: Objective, data: Callable[[int], Tensor], *, steps: int, batch: int,
        lr: float = 1e-3, teacher: VelocityField | None = None, grad_clip: float | None = 1.0,
        log: Callable[[int, dict[str, Any]], None] | None = None, log_every: int = 100) -> dict[str, Any]:
    """Adam with cosine decay for `steps` steps on batches `data(batch)`; returns the last logs."""
    objective.prepare(model, teacher)
    optimiser = torch.optim.Adam(trainable_parameters(model, objective), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    logs: dict[str, Any] = {}
    for step in range(steps):
        logs = train_step(model, objective, optimiser, data(batch), teacher=teacher, step=step, grad_clip=grad_clip)
        schedule.step()
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(step + 1, logs)
    return logs
