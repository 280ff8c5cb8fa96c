"""The `fmm` command line: parses arguments and dispatches; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys

from fmm import __version__


def _demo(args: argparse.Namespace) -> int:
    from fmm.demo import DemoConfig, format_rows, run_demo

    cfg = DemoConfig(target=args.target, steps=args.steps, batch=args.batch, lr=args.lr,
                     samples=args.samples, seed=args.seed)
    rows = run_demo(cfg)
    print()
    print(f"sample quality per number of steps ({cfg.target}, {cfg.samples} samples against exact draws):")
    print(format_rows(rows))
    return 0


def _list(args: argparse.Namespace) -> int:
    from fmm.groundtruth import TARGETS
    from fmm.interpolants import SCHEDULES
    from fmm.nets import NETWORKS, network_parameters
    from fmm.sampling import SOLVERS

    print("schedules:", ", ".join(f"{name}({', '.join(cls().params())})" for name, cls in SCHEDULES.items()))
    for name in NETWORKS:
        print(f"network {name}:", ", ".join(network_parameters(name)))
    print("ODE solvers:", ", ".join(SOLVERS), "(plus the N-step flow-map sampler)")
    print("toy targets with exact velocities:", ", ".join(TARGETS))
    return 0


def _objectives(args: argparse.Namespace) -> int:
    from fmm.objectives import describe

    for row in describe():
        print(f"{row['name']}  (teacher: {row['teacher']})")
        print(f"    paper:    {row['paper']}")
        print(f"    equation: {row['equation']}")
        print(f"    options:  {row['options']}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmm",
        description="Flow Map Matching: learn two-time flow maps X_{s,t} and compare few-step generative models.",
    )
    parser.add_argument("--version", action="version", version=f"fmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="fit a flow map to an exact toy velocity and print quality per step count")
    demo.add_argument("--target", choices=["flower", "checkerboard"], default="flower")
    demo.add_argument("--steps", type=_positive_int, default=600, help="training steps (default 600)")
    demo.add_argument("--batch", type=_positive_int, default=1024)
    demo.add_argument("--lr", type=_positive_float, default=2e-3)
    demo.add_argument("--samples", type=_positive_int, default=4000, help="evaluation samples (default 4000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    objectives = sub.add_parser("objectives", help="list every training objective with its paper, equation and options")
    objectives.set_defaults(func=_objectives)

    listing = sub.add_parser("list", help="list schedules, networks, solvers and toy targets")
    listing.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as err:
        print(f"fmm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
