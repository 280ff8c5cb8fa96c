"""Data-parallel gradient averaging that stays correct with torch.func JVPs.

torch.func transforms do not accept a DistributedDataParallel wrapper, and calling them on
`ddp.module` silently skips DDP's gradient all-reduce (docs/science.md §9.3): each worker would then
step on its own gradients and the replicas drift apart. The objectives therefore run on the plain
module and the training step averages the gradients itself, in one flattened all-reduce.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average .grad over all workers; a parameter without a gradient counts as zero on that worker."""
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Make every worker start from rank `src`'s parameters and buffers."""
    if not is_distributed():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src)


def check_replicas_agree(parameters: Iterable[nn.Parameter]) -> None:
    """Raise if the workers' parameters differ: a float64 sum of each worker's parameters, gathered and
    compared exactly (replicas that average their gradients and start equal stay bit-identical)."""
    if not is_distributed():
        return
    total = float(sum(p.detach().double().sum().cpu() for p in parameters))
    gathered: list[float | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, total)
    if len(set(gathered)) > 1:
        raise RuntimeError(f"the workers' parameters differ (sums {gathered}): gradients were not averaged "
                           f"the same way on every worker")
