"""Speed-up at equal quality on the toy targets: the exact teacher's solvers against a distilled flow map.

    python experiments/benchmarks/speedup.py [--samples 20000] [--train-steps 1500] [--fid-images 64]
                                             [--targets flower,checkerboard] [--weighting learned|uniform]

For the 8-mode flower and the checkerboard: distil the exact velocity with LMD (as `fmm demo`),
then run the `fmm evaluate` protocol on one noise set of `--samples` points: Euler, Heun and RK4
(Euler last step) at NFE 1..256 and dopri5, against the flow map at 1, 2 and 4 steps, scored by
sliced W2 against exact samples. Prints where each first comes within 10% of the teacher's best
sliced W2, with NFE and wall-clock per sample, and the FID Inception's feature throughput on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from fmm.evaluation.protocol import Scorer, format_report, run_protocol
from fmm.flowmap import FlowMap
from fmm.groundtruth import ExactVelocity, make_target
from fmm.interpolants import Interpolant
from fmm.nets import TwoTimeMLP
from fmm.objectives import make_objective
from fmm.training import fit


# LMD's loss weighting per target. The checkerboard's velocity grows like 1/(1 - t) towards its singular end, so
# its Lagrangian residuals near t = 1 dwarf the rest and a uniform mean is ruled by a few samples; the learned
# (s, t) uncertainty weighting (base.LearnedWeight) evens them out: sliced W2 0.0245 / 0.0201 at 1 / 2 steps
# after 5000 steps, against 0.0381 / 0.0254 uniform. On the smooth flower the uniform mean is better in 1500
# steps (0.0688 at 1 step, against 0.0781 learned).
WEIGHTING = {"flower": "uniform", "checkerboard": "learned"}


def distil(target_name: str, steps: int, weighting: str) -> tuple[FlowMap, ExactVelocity]:
    interp = Interpolant("linear")
    target = make_target(target_name)
    teacher = ExactVelocity(target, interp)
    t_max = teacher.t_max if teacher.t_max is not None else 1.0
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = FlowMap(TwoTimeMLP(dim=2, width=256, depth=3))
    objective = make_objective({"name": "lmd", "diagonal_fraction": 0.25, "weighting": weighting,
                                "time_sampling": {"t_max": t_max}}, interp)
    fit(model, objective, lambda n: target.sample(n, gen).float(), steps=steps, batch=1024, lr=2e-3, teacher=teacher)
    return model.eval(), teacher


def fid_throughput(images: int) -> None:
    from fmm.evaluation import fid

    try:
        extractor = fid.InceptionFeatures(device="cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as err:
        print(f"FID throughput: skipped ({err})")
        return
    x = torch.rand(images, 3, 32, 32) * 2 - 1
    extractor(x[:8])
    start = time.perf_counter()
    extractor(x)
    secs = time.perf_counter() - start
    print(f"FID Inception features on {extractor.device}: {images / secs:.1f} images/s ({images} CIFAR-sized images)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--fid-images", type=int, default=64)
    parser.add_argument("--targets", default="flower,checkerboard")
    parser.add_argument("--weighting", choices=["learned", "uniform"],
                        help=f"LMD's loss weighting over (s, t) (default per target: {WEIGHTING})")
    args = parser.parse_args()
    for name in args.targets.split(","):
        weighting = args.weighting or WEIGHTING.get(name, "uniform")
        model, teacher = distil(name, args.train_steps, weighting)
        noise = torch.randn(args.samples, 2, generator=torch.Generator().manual_seed(0))
        reference = teacher.target.sample(args.samples, torch.Generator().manual_seed(1))
        scorer = Scorer((2,), reference, wanted=["sw2", "energy"])
        report = run_protocol(model, teacher, noise, [1, 2, 4], scorer, teacher_max_nfe=256, log=lambda *_: None,
                              progress=False)
        print(f"\n{name}: LMD flow map ({args.train_steps} steps, {weighting} weighting), {args.samples} samples, "
              "primary metric sliced W2")
        print(format_report(report), flush=True)
    fid_throughput(args.fid_images)


if __name__ == "__main__":
    main()
