"""JVP objectives under data parallelism: two gloo processes, different data, gradients averaged by
fmm.distributed; the replicas must stay identical, and without the averaging they must not."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fmm.distributed import broadcast_parameters
from fmm.flowmap import FlowMap
from fmm.groundtruth import ExactVelocity, GaussianMixture
from fmm.interpolants import Interpolant
from fmm.nets import TwoTimeMLP
from fmm.objectives import make_objective
from fmm.training import train_step, trainable_parameters

JVP_OBJECTIVES = ["lmd", "emd", "two_map", "eulerian_direct", "lsd", "esd"]


# Every case runs in one pair of processes (each start imports torch and fmm: seconds of CPU apiece).
CASES = [(name, True) for name in JVP_OBJECTIVES] + [("lsd", False)]


def _replicas(rank: int, world: int, name: str, sync: bool) -> torch.Tensor:
    torch.manual_seed(100 + rank)  # deliberately different initial weights: the broadcast must fix them
    interp = Interpolant("linear")
    target = GaussianMixture.flower(modes=4, radius=2.0)
    teacher = ExactVelocity(target, interp)
    model = FlowMap(TwoTimeMLP(dim=2, width=32, depth=2, emb_dim=16))
    torch.nn.init.normal_(model.net.out.weight, std=0.1)
    objective = make_objective({"name": name, "weighting": "learned"}, interp)
    objective.prepare(model, teacher)
    broadcast_parameters(model)
    broadcast_parameters(objective)
    optimiser = torch.optim.Adam(trainable_parameters(model, objective), lr=1e-2)
    gen = torch.Generator().manual_seed(rank)  # each worker sees its own data and noise
    for step in range(3):
        batch = target.sample(64, gen).float()
        if sync:
            train_step(model, objective, optimiser, batch, teacher=teacher, step=step, grad_clip=1.0)
        else:  # the control: what a JVP through ddp.module amounts to, a step on local gradients only
            loss, _ = objective(model, batch, teacher=teacher, step=step)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    flat = torch.cat([p.detach().reshape(-1) for p in trainable_parameters(model, objective)])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return gathered


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {case: _replicas(rank, world, *case) for case in CASES}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13's gloo sometimes aborts in a C++ thread destructor at interpreter exit ("terminate
    # called without an active exception"), after all work is done: leave without running them.
    os._exit(0)


@pytest.fixture(scope="module")
def replicas() -> dict[tuple[str, bool], list[torch.Tensor]]:
    """The two replicas' final parameters for each case, from one pair of gloo processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "params.pt")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
        return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", JVP_OBJECTIVES)
def test_replicas_stay_identical_when_gradients_are_averaged(replicas, name):
    a, b = replicas[(name, True)]
    assert torch.equal(a, b), f"{name}: replicas differ by {(a - b).abs().max().item():.3g}"


@pytest.mark.slow
def test_replicas_drift_without_gradient_averaging(replicas):
    a, b = replicas[("lsd", False)]
    assert (a - b).abs().max().item() > 1e-4
