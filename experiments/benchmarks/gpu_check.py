"""GPU checks of the math core: JVPs of the two-time networks on CUDA, bf16 autocast, and the
training-step time of each objective on the CIFAR-10 U-Net, as ratios to flow matching.

    python experiments/benchmarks/gpu_check.py            # on a CUDA machine
    python experiments/benchmarks/gpu_check.py --smoke    # tiny sizes, any device, to test the script

1. JVP correctness on the device: time and Eulerian JVPs of a small U-Net (with attention) in
   float64 against central differences, and the CIFAR-size U-Net's fp32 JVP against its float64 JVP.
2. bf16: the CIFAR U-Net forward under bf16 autocast against fp32, and whether forward-mode AD
   runs under autocast (the objectives keep JVPs in fp32).
3. Throughput: median training-step time over `--reps` steps (after warm-up) per objective on one
   batch, the ratio to flow matching, the peak memory and images per second.
4. The same under bf16 autocast for a few objectives (fmm train's precision: bf16).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from fmm.flowmap import FlowMap, ModelVelocity
from fmm.interpolants import Interpolant
from fmm.nets import make_network
from fmm.objectives import make_objective
from fmm.training import train_step, trainable_parameters

CIFAR = {"in_channels": 3, "image_size": 32, "channels": 128, "channel_mult": (2, 2, 2), "num_blocks": 4,
         "attn_resolutions": (16,), "dropout": 0.13}
SMALL = {"in_channels": 3, "image_size": 16, "channels": 16, "channel_mult": (1, 2), "num_blocks": 1,
         "attn_resolutions": (8,)}
OBJECTIVES = [{"name": "flow_matching"}, {"name": "psd"}, {"name": "lsd"}, {"name": "lsd", "gradient": "slope"},
              {"name": "lmd"}, {"name": "lmd", "gradient": "slope"}, {"name": "emd"},
              {"name": "emd", "gradient": "slope"}, {"name": "two_map"}, {"name": "eulerian_direct"}]

BF16_OBJECTIVES = [{"name": "flow_matching"}, {"name": "lsd"}, {"name": "lsd", "gradient": "slope"},
                   {"name": "lmd", "gradient": "slope"}]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def jvp_checks(device: torch.device, big: dict) -> None:
    torch.manual_seed(0)
    net = make_network("unet", **SMALL, time_scale=10.0).double().to(device)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    flow = FlowMap(net)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, device=device)
    s = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64, device=device)
    t = s + 0.35
    b = torch.randn_like(x)
    h = 1e-6
    _, dt = flow.time_jvp(s, t, x)
    fd = (flow(s, t + h, x) - flow(s, t - h, x)) / (2 * h)
    print(f"  float64 small U-Net, time JVP vs central differences:     rel. error {rel(dt, fd):.2e}")
    _, de = flow.eulerian_jvp(s, t, x, b)
    fd = (flow(s + h, t, x + h * b) - flow(s - h, t, x - h * b)) / (2 * h)
    print(f"  float64 small U-Net, Eulerian JVP vs central differences: rel. error {rel(de, fd):.2e}")

    torch.manual_seed(0)
    big_net = make_network("unet", **big).to(device).eval()
    with torch.no_grad():
        for p in big_net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # wake the zero-initialised output layers
    flow32 = FlowMap(big_net)
    flow64 = copy.deepcopy(flow32).double()
    size = big["image_size"]
    x = torch.randn(8, 3, size, size, device=device)
    s, t = torch.full((8,), 0.2, device=device), torch.full((8,), 0.7, device=device)
    _, dt32 = flow32.time_jvp(s, t, x)
    _, dt64 = flow64.time_jvp(s.double(), t.double(), x.double())
    print(f"  {big_net.num_parameters() / 1e6:.1f}M U-Net, fp32 time JVP vs float64 JVP (TF32 "
          f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}): rel. error {rel(dt32.double(), dt64):.2e}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def bf16_checks(device: torch.device, big: dict) -> None:
    torch.manual_seed(0)
    flow = FlowMap(make_network("unet", **big).to(device)).eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.02 * torch.randn_like(p))
    size = big["image_size"]
    x = torch.randn(16, 3, size, size, device=device)
    s, t = torch.full((16,), 0.2, device=device), torch.full((16,), 0.7, device=device)
    with torch.no_grad():
        ref = flow(s, t, x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = flow(s, t, x)
    print(f"  bf16 autocast forward vs fp32: dtype {low.dtype}, rel. error {rel(low.float(), ref):.2e}")
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, dt = flow.time_jvp(s, t, x)
        print(f"  forward-mode AD under bf16 autocast: runs, output {dt.dtype}, finite {bool(torch.isfinite(dt).all())}")
    except Exception as err:  # reported, not raised: this is what the check is for
        print(f"  forward-mode AD under bf16 autocast: fails ({type(err).__name__}: {str(err)[:120]})")


def throughput(device: torch.device, big: dict, batch: int, reps: int, objectives: list[dict],
               bf16: bool = False) -> None:
    interp = Interpolant("linear")
    torch.manual_seed(0)
    base = FlowMap(make_network("unet", **big)).to(device)
    teacher = ModelVelocity(copy.deepcopy(base))
    size = big["image_size"]
    data = torch.randn(batch, 3, size, size, device=device)
    rows = []
    for spec in objectives:
        model = copy.deepcopy(base)
        objective = make_objective(spec, interp).to(device)
        objective.prepare(model, teacher)
        optimiser = torch.optim.Adam(trainable_parameters(model, objective), lr=1e-4)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for k in range(reps + 2):
            sync(device)
            start = time.perf_counter()
            train_step(model, objective, optimiser, data, teacher=teacher, step=k, bf16=bf16)
            sync(device)
            if k >= 2:
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        label = spec["name"] + ("[slope]" if spec.get("gradient") == "slope" else "")
        rows.append((label, statistics.median(times), peak))
        del model, objective, optimiser
    base_time = rows[0][1]
    print(f"  {'objective':24s} {'step ms':>9s} {'ratio to FM':>12s} {'peak GiB':>9s} {'img/s':>8s}")
    for label, median, peak in rows:
        print(f"  {label:24s} {1000 * median:9.1f} {median / base_time:12.2f} {peak:9.1f} {batch / median:8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test the script anywhere")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    big = SMALL if args.smoke else CIFAR
    batch = 8 if args.smoke else args.batch
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}")
    print("1. JVP correctness on the device")
    jvp_checks(device, big)
    print("2. bf16")
    bf16_checks(device, big)
    print(f"3. training step per objective, U-Net {big['channels']} ch x {list(big['channel_mult'])}, "
          f"batch {batch}, fp32 with TF32, median of {args.reps}")
    throughput(device, big, batch, args.reps, OBJECTIVES)
    print(f"4. the same with bf16 autocast (JVPs stay fp32), median of {args.reps}")
    throughput(device, big, batch, args.reps, BF16_OBJECTIVES, bf16=True)


if __name__ == "__main__":
    main()
