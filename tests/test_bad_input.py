"""Malformed experiment, sweep and study files through the real command line: every one must end in one
paragraph naming the problem, exit code 2, no traceback, and nothing created on disk or in MLflow."""

import copy
import os
import random
import subprocess
import sys

import pytest
import yaml

from fmm.cli import main

EXPERIMENT = {
    "name": "fuzz", "data": {"target": "flower"}, "network": {"name": "mlp", "dim": 2, "width": 32, "depth": 2},
    "objective": {"name": "lmd"}, "teacher": {"kind": "exact", "target": "flower"},
    "train": {"steps": 10, "batch_size": 32}, "scaling": {"num_workers": 1, "cpus_per_worker": 1},
}
SWEEP = {"name": "fuzz-sweep", "base": "base.yaml", "space": {"optim.lr": {"float": [1e-3, 1e-2], "log": True}},
         "metric": "loss", "search": {"num_samples": 2}}
STUDY = {"name": "fuzz-study", "base": {k: v for k, v in EXPERIMENT.items() if k not in ("name", "objective", "teacher")},
         "teacher": {"exact": "flower"}, "methods": {"lmd": {"objective": {"name": "lmd"}}},
         "evaluation": {"steps": [1, 2], "samples": 100}}

garbage = bytes(random.Random(0).randrange(256) for _ in range(2000))
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8))


def changed(tree, dotted, value):
    tree = copy.deepcopy(tree)
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[key]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return tree


DELETE = object()

# (what the file is, its bytes or tree, a fragment the error must contain)
COMMON = [
    ("empty file", b"", "is empty"),
    ("binary garbage", garbage, "not UTF-8 text"),
    ("NUL bytes in text", b"name: x\x00\n", "not valid YAML"),
    ("broken YAML", b"name: [1, 2\nnetwork: {", "not valid YAML"),
    ("a list, not a mapping", b"- a\n- b\n", "holds a list"),
    ("a scalar", b"42\n", "holds a int"),
    ("alias bomb", ALIAS_BOMB.encode(), "expands to more than"),
]
EXPERIMENT_CASES = COMMON + [
    ("unknown top-level key", changed(EXPERIMENT, "colour", "red"), "unknown key 'colour'"),
    ("unknown nested key", changed(EXPERIMENT, "train.stepz", 5), "unknown key 'train.stepz'"),
    ("wrong type", changed(EXPERIMENT, "train.steps", "many"), "'train.steps'"),
    ("section of the wrong type", changed(EXPERIMENT, "network", 5), "'network'"),
    ("missing section", changed(EXPERIMENT, "network", DELETE), "'network'"),
    ("missing name", changed(EXPERIMENT, "name", DELETE), "'name'"),
    ("huge step count", changed(EXPERIMENT, "train.steps", 10**30), "'train.steps'"),
    ("huge batch", changed(EXPERIMENT, "train.batch_size", 10**12), "'train.batch_size'"),
    ("huge network", changed(EXPERIMENT, "network.width", 10**7), "parameters, more than"),
    ("infinite learning rate", changed(EXPERIMENT, "optim", {"lr": float("inf")}), "'optim.lr'"),
    ("NaN learning rate", changed(EXPERIMENT, "optim", {"lr": float("nan")}), "'optim.lr'"),
    ("negative workers", changed(EXPERIMENT, "scaling.num_workers", -3), "'scaling.num_workers'"),
    ("unknown objective", changed(EXPERIMENT, "objective.name", "magic"), "unknown objective 'magic'"),
    ("zero sampling steps", changed(EXPERIMENT, "train.eval_steps", [0]), "'train.eval_steps'"),
    ("credentials in storage.path", changed(EXPERIMENT, "storage", {"path": "s3://AKIAX:hunter2@bucket/runs"}),
     "storage.path carries credentials"),
    ("credentials in tracking.uri", changed(EXPERIMENT, "tracking", {"uri": "http://me:hunter2@mlflow:5000"}),
     "tracking.uri carries credentials"),
    ("credentials in an S3 query", changed(EXPERIMENT, "data", {"path": "s3://b/d?access_key=A&secret_key=hunter2"}),
     "data.path carries credentials"),
]
SWEEP_CASES = COMMON + [
    ("unknown key", changed(SWEEP, "colour", 1), "unknown key 'colour'"),
    ("empty space", changed(SWEEP, "space", {}), "space is empty"),
    ("missing metric", changed(SWEEP, "metric", DELETE), "'metric'"),
    ("huge trial count", changed(SWEEP, "search", {"num_samples": 10**12}), "'search.num_samples'"),
    ("range of strings", changed(SWEEP, "space", {"optim.lr": {"float": ["a", "b"]}}), "optim.lr"),
    ("key the experiment lacks", changed(SWEEP, "space", {"optim.nope": {"float": [0.1, 0.2]}}), "optim.nope"),
]
STUDY_CASES = COMMON + [
    ("unknown key", changed(STUDY, "colour", 1), "unknown key 'colour'"),
    ("methods of the wrong type", changed(STUDY, "methods", [1, 2]), "'methods'"),
    ("missing teacher", changed(STUDY, "teacher", DELETE), "'teacher'"),
    ("huge sample count", changed(STUDY, "evaluation.samples", 10**15), "'evaluation.samples'"),
    ("unknown method", changed(STUDY, "methods", {"x": {"objective": {"name": "nope"}}}), "unknown objective 'nope'"),
    ("NaN in the base", changed(STUDY, "base.optim", {"lr": float("nan")}), "'optim.lr'"),
    ("credentials in tracking.uri", changed(STUDY, "tracking", {"uri": "http://me:hunter2@mlflow:5000"}),
     "tracking.uri carries credentials"),
]


def write(folder, name, content):
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else yaml.safe_dump(content).encode())
    return path


def check_refused(capsys, folder, argv, fragment, keep):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "hunter2" not in err  # a refused credential is not echoed either
    assert sorted(os.listdir(folder)) == sorted(keep), os.listdir(folder)  # no runs/, sweeps/, studies/, mlflow.db


CASES = ([("train", "exp.yaml", {}, *case) for case in EXPERIMENT_CASES]
         + [("sweep", "sweep.yaml", {"base.yaml": EXPERIMENT}, *case) for case in SWEEP_CASES]
         + [("study", "study.yaml", {}, *case) for case in STUDY_CASES])


@pytest.mark.parametrize("command,name,others,what,content,fragment", CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_a_malformed_file_is_refused(tmp_path, monkeypatch, capsys, command, name, others, what, content, fragment):
    """The experiment of `fmm train`, the sweep of `fmm sweep` (its base experiment valid) and the study of
    `fmm study`, each malformed one way."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for other, text in others.items():
        write(tmp_path, other, text)
    write(tmp_path, name, content)
    check_refused(capsys, tmp_path, [command, name], fragment, [*others, name])


def test_a_malformed_file_through_the_installed_command_is_one_line_and_exit_two(tmp_path):
    write(tmp_path, "exp.yaml", garbage)
    out = subprocess.run([sys.executable, "-m", "fmm.cli", "train", "exp.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "not UTF-8 text" in out.stderr and "Traceback" not in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["exp.yaml"]
