"""The installed package and its command line."""

import importlib.util
import os
import subprocess
import sys
import sysconfig

import fmm


def run_fmm(*args: str) -> subprocess.CompletedProcess:
    exe = os.path.join(sysconfig.get_path("scripts"), "fmm")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600)


def test_platform_source_root_never_shadows_the_standard_library():
    import platform

    assert platform.__file__.startswith(sysconfig.get_paths()["stdlib"])
    assert callable(platform.system)
    assert not os.path.exists(os.path.join(os.path.dirname(fmm.__file__), "..", "__init__.py"))
    assert importlib.util.find_spec("fmm") is not None


def test_console_script_lists_its_subcommands():
    result = run_fmm("--help")
    assert result.returncode == 0
    for command in ("demo", "list", "objectives", "train", "sweep", "study", "compare", "evaluate", "data", "sample"):
        assert command in result.stdout


def test_list_names_every_registry():
    result = run_fmm("list")
    assert result.returncode == 0
    for word in ("linear", "trig", "vp", "warped", "mlp", "unet", "dopri5", "checkerboard", "flower"):
        assert word in result.stdout


def test_bad_command_line_input_is_a_one_line_error_with_nonzero_exit():
    result = run_fmm("demo", "--target", "moons")
    assert result.returncode == 2
    assert "invalid choice: 'moons'" in result.stderr and "Traceback" not in result.stderr
    result = run_fmm("demo", "--steps", "0")
    assert result.returncode == 2 and "must be a positive integer" in result.stderr


def test_module_entry_point_matches_console_script():
    result = subprocess.run([sys.executable, "-m", "fmm.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and fmm.__version__ in result.stdout


def test_ci_runs_the_readme_test_command_as_written():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    block = readme.split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    ci_lines = [line.strip() for line in open(os.path.join(root, ".ci", "run")) if line.strip()]
    assert block in ci_lines


def test_objectives_command_lists_every_objective_with_its_paper():
    result = run_fmm("objectives")
    assert result.returncode == 0
    for name in ("flow_matching", "lmd", "emd", "pfmm", "two_map", "eulerian_direct", "lsd", "esd", "psd"):
        assert f"{name}  (teacher: " in result.stdout
    assert "2505.18825" in result.stdout and "stop_gradient=True" in result.stdout


def test_a_closed_pipe_ends_the_listing_quietly():
    exe = os.path.join(sysconfig.get_path("scripts"), "fmm")
    for command in ("list", "objectives", "--help"):
        # the reader takes one line and leaves; a large listing then meets a closed pipe
        result = subprocess.run(f"'{exe}' {command} | head -c 1 >/dev/null; echo \"exit=${{PIPESTATUS[0]}}\"",
                                shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
        assert result.stdout.strip() == "exit=0" and result.stderr == "", (command, result)


def test_bare_fmm_prints_its_help_and_exits_2():
    result = run_fmm()
    assert result.returncode == 2 and result.stdout == ""
    assert "usage: fmm" in result.stderr and "evaluate" in result.stderr


def test_every_option_says_what_it_does_and_its_default():
    import argparse

    from fmm.cli import build_parser

    def parsers(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from parsers(child, f"{path} {name}")

    checked = 0
    for path, parser in parsers(build_parser(), "fmm"):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            assert action.help, f"{path} {action.option_strings[0]} has no help"
            if action.default not in (None, False):
                shown = str(action.default)
                assert f"(default: {shown})" in text, f"{path} {action.option_strings[0]}: default {shown} not shown"
            checked += 1
    assert checked > 50


def test_dry_runs_validate_and_print_the_resolved_config_and_start_nothing(tmp_path):
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = os.path.join(sysconfig.get_path("scripts"), "fmm")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    def dry(*args):
        return subprocess.run([exe, *args, "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    train = dry("train", os.path.join(root, "experiments", "train", "flower_lmd.yaml"), "--set", "train.steps=123",
                "--workers", "2")
    assert train.returncode == 0, train.stderr
    config = yaml.safe_load(train.stdout)
    assert config["train"]["steps"] == 123 and config["scaling"]["num_workers"] == 2
    assert "dry run: the experiment is valid" in train.stdout
    sweep = dry("sweep", os.path.join(root, "experiments", "sweeps", "flower_toy.yaml"), "--set", "search.num_samples=3")
    assert sweep.returncode == 0, sweep.stderr
    assert yaml.safe_load(sweep.stdout)["search"]["num_samples"] == 3
    study = dry("study", os.path.join(root, "experiments", "studies", "toy_flower.yaml"))
    assert study.returncode == 0, study.stderr
    assert "member experiment(s) checked: toy-flower-teacher" in study.stdout, study.stdout[-500:]
    bad = dry("train", os.path.join(root, "experiments", "train", "flower_lmd.yaml"), "--set", "train.steps=0")
    assert bad.returncode == 2 and "train.steps" in bad.stderr
    assert os.listdir(tmp_path) == []  # no run folder, no MLflow store, nothing
