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
