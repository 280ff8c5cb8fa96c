"""A small real run: distil the exact velocity of a toy target into a flow map and score it per step count.

The student is a two-time MLP flow map X_{s,t}(x) = x + (t - s) v(s, t, x). Its loss has two parts:
- on the diagonal (a fraction `diagonal_fraction` of the batch), v(t, t, I_t) regresses onto the
  exact velocity b_t(I_t) (the tangent condition v_{t,t} = b_t);
- off the diagonal (s < t), Lagrangian map distillation with the teacher under a stop-gradient,
  |d/dt X_{s,t}(I_s) - sg(b_t(X_{s,t}(I_s)))|^2 (FMM 2406.07507 LMD, as restated in LSD
  2505.18825 App. B.1, eq. (27)).
The teacher is the exact velocity of the target (docs/science.md §8), so the learned map can be judged
against the float64 reference flow map of the same noise, sample by sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fmm.flowmap import FlowMap
from fmm.groundtruth import ExactVelocity, make_target, reference_flow_map
from fmm.interpolants import Interpolant
from fmm.metrics import energy_distance, map_rmse, sliced_wasserstein
from fmm.nets import TwoTimeMLP
from fmm.objectives import make_objective
from fmm.sampling import flow_map_sample, solve_ode
from fmm.training import fit


@dataclass(frozen=True)
class DemoConfig:
    target: str = "flower"
    steps: int = 600
    batch: int = 1024
    lr: float = 2e-3
    width: int = 256
    depth: int = 3
    diagonal_fraction: float = 0.25
    samples: int = 4000
    step_counts: tuple[int, ...] = (1, 2, 4, 8, 16)
    seed: int = 0


@dataclass(frozen=True)
class DemoRow:
    steps: int
    sw2_map: float
    sw2_euler: float
    energy_map: float
    rmse_map: float
    rmse_euler: float


def run_demo(cfg: DemoConfig, log=print) -> list[DemoRow]:
    """Train for cfg.steps steps, then score the map and the teacher's Euler solver at each step count."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    target = make_target(cfg.target)
    interpolant = Interpolant("linear", sigma0=1.0)
    teacher = ExactVelocity(target, interpolant)
    t_max = teacher.t_max if teacher.t_max is not None else 1.0
    objective = make_objective({"name": "lmd", "diagonal_fraction": cfg.diagonal_fraction,
                                "time_sampling": {"t_max": t_max}}, interpolant)
    model = FlowMap(TwoTimeMLP(dim=target.dim, width=cfg.width, depth=cfg.depth))

    log(f"fitting a flow map to the exact {cfg.target} velocity (LMD): {cfg.steps} steps, batch {cfg.batch}, "
        f"{model.net.num_parameters():,} parameters")
    start = time.perf_counter()

    def progress(step: int, logs: dict) -> None:
        log(f"  step {step:5d}  loss {logs['loss'].item():.4f}  {step / (time.perf_counter() - start):.0f} steps/s")

    fit(model, objective, lambda n: target.sample(n, generator).float(), steps=cfg.steps, batch=cfg.batch,
        lr=cfg.lr, teacher=teacher, log=progress, log_every=max(1, cfg.steps // 10))

    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise = interpolant.base_sample((cfg.samples, target.dim), generator=eval_gen, dtype=torch.float64)
    exact = target.sample(cfg.samples, eval_gen)
    log(f"reference flow map X_(0,1) of {cfg.samples} noise points (float64 dopri5, rtol 1e-11) ...")
    reference = reference_flow_map(teacher, 0.0, 1.0, noise)
    rows = []
    with torch.no_grad():
        for n in cfg.step_counts:
            mapped = flow_map_sample(model, noise.float(), steps=n).samples
            euler = solve_ode(teacher, noise, "euler", steps=n).samples
            rows.append(DemoRow(n, sliced_wasserstein(mapped, exact), sliced_wasserstein(euler, exact),
                                energy_distance(mapped, exact), map_rmse(mapped, reference), map_rmse(euler, reference)))
    rows.append(DemoRow(0, sliced_wasserstein(reference, exact), float("nan"), energy_distance(reference, exact),
                        0.0, float("nan")))
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    lines = ["NFE | SW2 flow map | SW2 exact-teacher Euler | energy flow map | RMSE flow map vs ODE | RMSE Euler vs ODE",
             "----|--------------|------------------------|-----------------|----------------------|------------------"]
    for r in rows:
        if r.steps == 0:
            lines.append(f"ODE | {r.sw2_map:12.4f} | (float64 reference map; the sampling floor at this sample size)")
            continue
        lines.append(f"{r.steps:3d} | {r.sw2_map:12.4f} | {r.sw2_euler:22.4f} | {r.energy_map:15.5f} | "
                     f"{r.rmse_map:20.4f} | {r.rmse_euler:16.4f}")
    return "\n".join(lines)
