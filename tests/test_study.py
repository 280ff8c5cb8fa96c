"""`fmm study` and `fmm compare` on real components: tiny studies through the CLI on a running local Ray
cluster, one against a real `mlflow server` on loopback read back over its REST API, one at two seeds
killed and resumed, and the bad input refused before anything trains."""

import copy
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient

from support.experiments import cluster, node_types, teacher_file
from support.browser import browser, chromium
from support.mlflow_server import mlflow_server as start_mlflow_server
from fmm import cli
from fmm.experiment.study_schema import StudyConfig, load_study, plan_study
from fmm.jobs.cluster import check_evaluation_fits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "name": "tiny",
    "base": {
        "data": {"target": "flower"},
        "network": {"name": "mlp", "dim": 2, "width": 64, "depth": 2},
        "optim": {"lr": 3e-3},
        "train": {"steps": 150, "batch_size": 256, "log_every": 50, "checkpoint_every": 150, "ema_decay": 0.9},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    },
    "teacher": {"train": {"objective": {"name": "flow_matching"}, "train": {"steps": 200}}},
    "methods": {"lmd": {"objective": {"name": "lmd"}}, "lsd": {"objective": {"name": "lsd"}},
                "cd": {"objective": {"name": "cd"}}},
    "evaluation": {"steps": [1, 2, 4], "samples": 800, "metrics": ["sw2", "energy"], "teacher_max_nfe": 16},
}


def write_study(folder, **changes) -> str:
    study = copy.deepcopy(TINY)
    study.update(changes)
    path = os.path.join(folder, "study.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(study, f)
    return path


def run_cli(*args, cwd, timeout=900):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "fmm.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def table_cells(output: str, labels) -> dict[str, list[str]]:
    """The quality table's row for each label: the printed cells after the sampler and n columns (cells
    are separated by two spaces or more; the best-at-this-step and tie marks are dropped)."""
    rows = {}
    for line in output.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if parts and parts[0] in labels and parts[0] not in rows and len(parts) >= 4:
            rows[parts[0]] = [re.sub(r" [*~]$", "", cell) for cell in parts[3:]]
    return rows


def members(client, parent_id):
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["study_member"]: r for r in runs if "study_member" in r.data.tags}


# -- bad input: refused before anything trains ---------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    ({"methods": {"xyz": {"objective": {"name": "not_a_method"}}}}, r"method 'xyz'.*unknown objective 'not_a_method'"),
    ({"methods": {}}, "methods is empty"),
    ({"methods": {"lmd": {"network": {"width": 64}}}}, "method 'lmd' needs objective"),
    ({"teacher": {"train": {"objective": {"name": "lmd"}}}}, "teacher: objective 'lmd' needs a teacher itself"),
    ({"teacher": {"exact": "flower", "checkpoint": "x.pt"}}, "exactly one of train"),
    ({"teacher": {"exact": "checkerboard"}}, "teacher.exact 'checkerboard' is that toy target's velocity"),
    ({"evaluation": {"metrics": ["fid"]}}, r"evaluation.metrics \['fid'\] do not apply to data of shape \[2\]"),
    ({"evaluation": {"steps": [0, 2]}}, "steps are positive"),
    ({"base": {**TINY["base"], "objective": {"name": "lmd"}}}, "base.objective"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"seeds": []}, "seeds is empty"),
    ({"seeds": [0, 1, 0]}, r"seeds repeats \[0\]"),
    ({"evaluation": {**TINY["evaluation"], "sets": 0}}, "evaluation.sets"),
])
def test_bad_studies_are_refused_before_anything_trains(tmp_path, change, message):
    path = write_study(str(tmp_path), **change)
    with pytest.raises(ValueError, match=message):
        study = load_study(path)
        plan_study(study, f"sqlite:///{tmp_path}/mlflow.db")


def test_members_with_conflicting_data_shapes_are_refused(tmp_path):
    from fmm.experiment.data import prepare

    prepare("digits", str(tmp_path / "digits"), shards=1)
    methods = {"points": {"objective": {"name": "lsd"}},
               "images": {"objective": {"name": "lsd"}, "data": {"path": str(tmp_path / "digits")},
                          "network": {"name": "unet", "in_channels": 1, "image_size": 8, "channels": 16,
                                      "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}}}
    study = load_study(write_study(str(tmp_path), methods=methods))
    with pytest.raises(ValueError, match=r"'teacher' trains on data of shape \[2\] but 'images' on \[1, 8, 8\]"):
        plan_study(study, f"sqlite:///{tmp_path}/mlflow.db")


def test_the_cli_refuses_a_bad_study_in_one_paragraph_and_writes_nothing(tmp_path):
    path = write_study(str(tmp_path), methods={"xyz": {"objective": {"name": "not_a_method"}}})
    out = run_cli("study", path, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "unknown objective 'not_a_method'" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["study.yaml"]  # no studies/, no mlflow.db


def test_more_evaluation_sets_than_the_dataset_holds_disjoint_references_for_are_refused(tmp_path, monkeypatch,
                                                                                         capsys):
    """digits holds 1797 images: 3 disjoint sets of 800 do not fit. One paragraph, exit 2, nothing written."""
    from fmm.cli import main
    from fmm.experiment.data import prepare

    prepare("digits", str(tmp_path / "digits"), shards=1)
    unet = {"name": "unet", "in_channels": 1, "image_size": 8, "channels": 16, "channel_mult": [1, 2],
            "num_blocks": 1, "attn_resolutions": []}
    base = {**TINY["base"], "data": {"path": str(tmp_path / "digits")}, "network": unet}
    write_study(str(tmp_path), base=base, evaluation={"steps": [1], "samples": 800, "sets": 3, "metrics": ["fd_classifier"]})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["study", "study.yaml"]) == 2
    err = capsys.readouterr().err
    assert "evaluation.sets: 3 disjoint reference subsets of evaluation.samples 800 need 2400 rows" in err
    assert "holds 1797" in err and "sets <= 2" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["digits", "study.yaml"]


def test_compare_names_a_missing_experiment_and_what_exists(tmp_path, monkeypatch, capsys):
    from fmm.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["compare", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store" in err and "Traceback" not in err
    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").create_experiment("other")
    assert main(["compare", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "no study or MLflow experiment named 'nowhere'" in err and "other" in err


@pytest.mark.parametrize("name", ["toy_flower", "toy_flower_seeds", "toy_flower_init", "digits", "cifar10", "imagenet32"])
def test_the_shipped_studies_are_valid(tmp_path, name, monkeypatch):
    path = os.path.join(ROOT, "experiments", "studies", f"{name}.yaml")
    monkeypatch.setenv("FMM_BUCKET", "s3://a-bucket/fmm")  # the cluster studies keep data and storage under it
    study = load_study(path)
    if name in ("cifar10", "imagenet32"):
        assert study.base["data"]["path"] == f"s3://a-bucket/fmm/data/{name}"
        assert study.storage.path == "s3://a-bucket/fmm/studies" and study.tracking.uri is None
    assert isinstance(study, StudyConfig)
    if name == "digits":
        from fmm.experiment.data import prepare

        prepare("digits", str(tmp_path / "digits"), shards=1)
        study.base["data"] = {"path": str(tmp_path / "digits")}
    plan = plan_study(study, "http://127.0.0.1:5000" if name in ("cifar10", "imagenet32") else
                      f"sqlite:///{tmp_path}/mlflow.db")
    assert len(plan.methods) == len(study.methods)
    if name in ("cifar10", "imagenet32"):
        # Data on S3 and GPU workers: every member fits the node types of ray_cluster.yaml, and the teacher
        # shares the members' budget and network.
        from fmm.jobs.cluster import check_resources

        for member in plan.methods:
            assert check_resources(member.exp, {"CPU": 4.0}, 2, node_types(cluster())) >= 1, member.label
        assert study.evaluation.resources == {"GPU": 1, "CPU": 8} and study.evaluation.fid_samples == 50000
        check_evaluation_fits(study.evaluation.resources, [res for _, res, _ in node_types(cluster())], "node type")
        with pytest.raises(ValueError, match=r"evaluation.resources \{'GPU': 16\}: no node type of this cluster holds "
                                             r"that much \(\{'CPU': 4.0\}; \{'CPU': 8.0, 'GPU': 1.0\}; .*lower it or add a node type"):
            check_evaluation_fits({"GPU": 16}, [res for _, res, _ in node_types(cluster())], "node type")
        assert plan.teacher.exp.train.steps == member.exp.train.steps
        assert plan.teacher.exp.network == member.exp.network


def test_a_member_that_distils_nothing_can_start_from_the_study_teacher(tmp_path):
    """init: teacher on a self-distillation member: the study's teacher's weights, once it is trained (or
    at once for a checkpoint teacher); a distillation member still gets the teacher itself."""
    methods = {"lsd": {"objective": {"name": "lsd"}, "init": "teacher"}, "lmd": {"objective": {"name": "lmd"}},
               "sct": {"objective": {"name": "sct"}}}
    plan = plan_study(load_study(write_study(str(tmp_path), methods=methods)), f"sqlite:///{tmp_path}/mlflow.db")
    lsd, lmd, sct = ({m.label: m for m in plan.methods}[k] for k in ("lsd", "lmd", "sct"))
    assert (lsd.awaits_teacher, lmd.awaits_teacher, sct.awaits_teacher) == (True, True, False)
    plan.give_teacher("abc123")
    assert lsd.exp.init == "runs:/abc123/checkpoints/final.pt" and lsd.exp.teacher is None
    assert lmd.exp.teacher["path"] == "runs:/abc123/checkpoints/final.pt" and lmd.exp.init is None
    assert sct.exp.init is None and sct.exp.teacher is None
    study = load_study(write_study(str(tmp_path), methods=methods, teacher={"checkpoint": "/some/teacher.pt"}))
    lsd = {m.label: m for m in plan_study(study, f"sqlite:///{tmp_path}/mlflow.db").methods}["lsd"]
    assert lsd.exp.init == "/some/teacher.pt" and not lsd.awaits_teacher
    with pytest.raises(ValueError, match="init: teacher starts the student from its teacher's weights"):
        plan_study(load_study(write_study(str(tmp_path), methods=methods, teacher={"exact": "flower"})),
                   f"sqlite:///{tmp_path}/mlflow.db")


def test_seeds_give_each_method_one_run_per_seed_and_a_swept_method_can_be_reseeded(tmp_path):
    """seeds: [0, 1, 2]: each non-swept method's seed runs are its experiment at train.seed = s, named
    <study>-<label>-seed<s>; the teacher trains once; a swept method is one run (its best trial) unless
    its sweep says reseed, which trains the best trial's configuration at each seed."""
    sweep = {"space": {"optim.lr": {"float": [1e-3, 5e-3]}}, "metric": "eval/sw2_steps001", "reseed": True}
    methods = {"lmd": {"objective": {"name": "lmd"}},
               "lsd": {"objective": {"name": "lsd"}, "train": {"eval_every": 50}, "sweep": sweep}}
    plan = plan_study(load_study(write_study(str(tmp_path), methods=methods, seeds=[0, 1, 2])),
                      f"sqlite:///{tmp_path}/mlflow.db")
    lmd, lsd = plan.methods
    assert plan.teacher.exp.train.seed == 0 and lsd.seeds is None
    runs = lmd.seed_runs()
    assert [(s, e.name, e.train.seed) for s, e in runs] == [(s, f"tiny-lmd-seed{s}", s) for s in (0, 1, 2)]
    assert lmd.exp.name == "tiny-lmd" and runs[1][1].objective == lmd.exp.objective
    lsd.reseed({"optim.lr": 0.0042}, [0, 1, 2])
    assert [(e.name, e.train.seed, e.optim.lr) for _, e in lsd.seed_runs()] == [
        (f"tiny-lsd-seed{s}", s, 0.0042) for s in (0, 1, 2)]
    one = plan_study(load_study(write_study(str(tmp_path), seeds=[7])), f"sqlite:///{tmp_path}/mlflow.db")
    assert all(m.seeds is None and m.exp.train.seed == 7 for m in one.methods)
    with pytest.raises(ValueError, match="sweep.reseed trains the best trial again at each of the study's seeds"):
        plan_study(load_study(write_study(str(tmp_path), methods=methods)), f"sqlite:///{tmp_path}/mlflow.db")


# -- a tiny study end to end ------------------------------------------------------------------------------

@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on loopback, with a SQLite backend and served artifacts."""
    with start_mlflow_server(str(tmp_path)) as url:
        yield url


def rest(url: str, path: str, **query) -> dict:
    from urllib.parse import urlencode

    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}?{urlencode(query)}", timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_a_study_through_the_cli_on_an_mlflow_server_reads_back_over_rest_as_compare_prints_it(tmp_path,
                                                                                               mlflow_server,
                                                                                               ray_cluster, gpu_node):
    """`fmm study` end to end at three evaluation sets: a trained teacher, a distilled member, a
    self-distillation member swept whose best trial's configuration is trained again at the study's
    seed (`reseed`, its run nested under the method's run); the study's table, `fmm compare`'s table
    read back from the MLflow server, the same means and 95% intervals over REST and in the CSV. (A
    study at two seeds, killed and resumed: the next test.)"""
    methods = {"cd": {"objective": {"name": "cd"}},
               "lsd": {"objective": {"name": "lsd"}, "train": {"eval_every": 75, "eval_samples": 200},
                       "sweep": {"space": {"optim.lr": {"float": [1e-3, 5e-3], "log": True}},
                                 "metric": "eval/sw2_steps001", "reseed": True,
                                 "search": {"num_samples": 1, "max_concurrent_trials": 1},
                                 "scheduler": {"kind": "fifo"}}}}
    teacher = {"train": {"objective": {"name": "flow_matching"}, "train": {"steps": 100}},
               "register_as": "served-teacher@champion"}
    write_study(str(tmp_path), name="served", methods=methods, teacher=teacher, storage={"path": str(tmp_path / "studies")},
                tracking={"uri": mlflow_server, "experiment": "served"}, seeds=[0],
                evaluation={**TINY["evaluation"], "sets": 3, "resources": {"GPU": 1}})
    address = ray_cluster.get_runtime_context().gcs_address
    out = run_cli("study", "study.yaml", "--address", address, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    compared = run_cli("compare", "served", "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:]
    printed = table_cells(compared.stdout, ["lsd", "cd"])
    assert printed == table_cells(out.stdout, ["lsd", "cd"])  # the study's own table is the same
    assert re.search(r"teacher ODE\s+best solver", compared.stdout) and re.search(r"exact ODE\s+best solver",
                                                                                    compared.stdout)
    assert "floor: exact samples score sw2" in compared.stdout

    client = MlflowClient(mlflow_server)
    experiment_id = client.get_experiment_by_name("served").experiment_id
    parent = client.search_runs([experiment_id], "tags.kind = 'study'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    parent = parent[0]
    sweeps = client.search_runs([experiment_id], "tags.kind = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    runs = members(client, parent.info.run_id)
    assert set(runs) == {"teacher", "cd", "lsd"} and runs["cd"].data.tags["eval_sampler"] == "consistency"
    # Evaluated as Ray tasks asking for a GPU: on the one node that declares one (not the head, which
    # declares none), not in the study's driver, and on the CPU there (no CUDA here).
    head = ray_cluster.get_runtime_context().get_node_id()
    assert [n["NodeID"] for n in ray_cluster.nodes() if n["Alive"] and n["Resources"].get("GPU", 0)] == [gpu_node]
    assert gpu_node != head
    evaluated = [r for r in client.search_runs([experiment_id]) if "eval_node" in r.data.tags]  # teacher, scored runs
    assert len(evaluated) == 3 and runs["teacher"].info.run_id in {r.info.run_id for r in evaluated}
    for run in evaluated:
        tags = run.data.tags
        assert (tags["eval_worker"], tags["eval_device"], tags["eval_node"]) == ("task", "cpu", gpu_node), tags
    assert "evaluating 4 run(s) as Ray tasks with {'GPU': 1.0}" in out.stdout  # teacher, exact, cd, lsd
    assert "exact/heun-le/sw2" in parent.data.metrics and "floor/sw2/set2" in parent.data.metrics
    assert (parent.data.tags["exact_eval_worker"], parent.data.tags["exact_eval_node"]) == ("task", gpu_node)
    best = sweeps[0].data.tags["best_mlflow_run_id"]
    reseeded = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{runs['lsd'].info.run_id}'")
    assert [(r.data.tags["study_seed"], r.data.params["train.seed"]) for r in reseeded] == [("0", "0")]
    assert reseeded[0].data.tags["study_role"] == "seed" and "sw2/set2" in reseeded[0].data.metrics
    lsd_lr = {client.get_run(best).data.params["optim.lr"], runs["lsd"].data.params["optim.lr"]}
    assert len(lsd_lr) == 1  # the reseeded runs train the best trial's configuration
    # Every run, down to a sweep trial and a reseeded run created in Ray tasks, names the study's checkout,
    # user and command (MLflow's source tags).
    for run in (runs["teacher"], runs["cd"], client.get_run(best), reseeded[0]):
        assert {k: run.data.tags.get(k) for k in ("git_commit", "git_dirty", "mlflow.user", "mlflow.source.name")} \
            == {k: parent.data.tags[k] for k in ("git_commit", "git_dirty", "mlflow.user", "mlflow.source.name")}
    assert parent.data.tags["mlflow.source.name"] == "fmm study"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert artifacts == {"comparison/comparison.csv", "comparison/comparison.md", "comparison/sw2_vs_steps.png"}
    local = client.download_artifacts(parent.info.run_id, "comparison/comparison.csv", str(tmp_path))
    with open(local) as f:
        lines = f.read().splitlines()
    assert lines[0] == "method,role,solver,nfe,mean,low,high,n,seconds_per_sample"
    value, low, high = (client.get_metric_history(runs["cd"].info.run_id, k)[0] for k in ("sw2", "sw2/low", "sw2/high"))
    assert any(line.startswith(f"cd,method,consistency,{value.step},{value.value!r},{low.value!r},{high.value!r},3,")
               for line in lines)  # 3 sets

    experiment = rest(mlflow_server, "experiments/get-by-name", experiment_name="served")["experiment"]
    found = urllib.request.Request(f"{mlflow_server}/api/2.0/mlflow/runs/search", method="POST",
                                   data=json.dumps({"experiment_ids": [experiment["experiment_id"]],
                                                    "filter": "tags.study = 'served'"}).encode(),
                                   headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(found, timeout=30) as response:
        found_runs = json.loads(response.read())["runs"]
    by_member = {}
    for run in found_runs:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        if "study_member" in tags and tags["study_role"] != "seed":
            by_member[tags["study_member"]] = run["info"]["run_id"]
    assert set(by_member) == {"teacher", "cd", "lsd"}
    teacher = rest(mlflow_server, "runs/get", run_id=by_member.pop("teacher"))["run"]
    assert {m["key"] for m in teacher["data"]["metrics"]} >= {"teacher/euler/sw2", "teacher/heun-le/sw2",
                                                                "teacher/rk4-le/sw2"}  # its ODE solvers
    for label, run_id in by_member.items():  # the printed mean and interval are what MLflow holds
        history = {k: sorted(rest(mlflow_server, "metrics/get-history", run_id=run_id, metric_key=k)["metrics"],
                             key=lambda m: int(m["step"])) for k in ("sw2", "sw2/low", "sw2/high", "sw2/n")}
        assert [int(m["step"]) for m in history["sw2"]] == [1, 2, 4]
        assert [m["value"] for m in history["sw2/n"]] == [3, 3, 3]
        shown = [f"{m['value']:.4g} ± {(h['value'] - lo['value']) / 2:.2g}"
                 for m, lo, h in zip(history["sw2"], history["sw2/low"], history["sw2/high"])]
        assert printed[label] == shown, label

    # The teacher registered under the name the study gave it; the distilled member names that version.
    version = client.get_model_version_by_alias("served-teacher", "champion")
    assert version.run_id == runs["teacher"].info.run_id and parent.data.tags["teacher.model"] == "served-teacher/1"
    assert runs["cd"].data.tags["teacher.model"] == "served-teacher/1"
    assert "registered the teacher as models:/served-teacher/1" in out.stdout

    # What a person sees: the parent run and the member's quality-versus-steps chart in the MLflow UI,
    # in headless Chromium, with the values MLflow holds.
    if chromium() is None:
        print("MLflow UI check skipped: no Chromium here (Debian's `chromium` package; .ci/run installs it)")
        return
    link = re.search(r"browse them with: open (\S+)", out.stdout).group(1)
    assert link.endswith(f"/runs/{parent.info.run_id}?workflowType=machine_learning")
    cd_run = runs["cd"].info.run_id
    values = [m.value for m in sorted(client.get_metric_history(cd_run, "sw2"), key=lambda m: m.step)]
    with browser(str(tmp_path)) as page:
        text = page.open(link, f"document.body.innerText.includes('{parent.info.run_name}') && "
                               f"document.body.innerText.includes('Tags') && document.body.innerText")
        assert "Evaluation runs" not in text and "Model registry" in text  # the training view, not GenAI's
        assert "kind" in text and "study" in text and "git_commit" in text
        page.screenshot(str(tmp_path / "study-run.png"))
        metric = (f"{mlflow_server}/#/metric?runs={json.dumps([cd_run])}&metric=%22sw2%22&experiments="
                  f"{json.dumps([experiment_id])}&plot_metric_keys=%5B%22sw2%22%5D&plot_layout={{}}&x_axis=step"
                  f"&y_axis_scale=linear&line_smoothness=1&show_point=true&deselected_curves=[]"
                  f"&last_linear_y_axis_range=[]&workflowType=machine_learning")
        curves = page.open(metric, "(() => { const g = document.querySelector('.js-plotly-plot'); "
                                   "return g && g.data && g.data.length ? g.data.map(t => ({name: t.name, "
                                   "x: Array.from(t.x || []), y: Array.from(t.y || [])})) : null })()")
        page.screenshot(str(tmp_path / "member-sw2.png"))
    assert {(tuple(c["x"]), tuple(c["y"])) for c in curves} == {((1, 2, 4), tuple(values))}
    assert all(runs["cd"].info.run_name in c["name"] for c in curves)


@pytest.mark.slow
def test_a_study_with_seeds_killed_midway_resumes_without_retraining_finished_seeds(tmp_path, ray_cluster, gpu_node,
                                                                                     capsys, monkeypatch):
    """seeds: [0, 1], one run at a time, on a running Ray cluster (this session's), the teacher a given
    checkpoint: the study's driver is killed (SIGKILL) once seed 0 has finished, as when the machine
    that submitted it goes; `--resume` keeps the finished seed's run, trains the other, and the
    member's cells are over 2 seeds x 2 sets, printed as MLflow holds them. Evaluation asks for a GPU:
    the seeds, the given teacher's solvers and the exact velocity's are all scored on the GPU node."""
    import signal

    address = ray_cluster.get_runtime_context().gcs_address
    evaluation = {"steps": [1, 2], "samples": 300, "sets": 2, "metrics": ["sw2"], "teacher_max_nfe": 4,
                  "resources": {"GPU": 1}}
    base = {**TINY["base"], "train": {**TINY["base"]["train"], "steps": 100, "checkpoint_every": 50}}
    teacher_file(tmp_path, std=0.05)  # teacher.pt (a gentle velocity), given by a path relative to the study's folder
    write_study(str(tmp_path), name="seeded", base=base, teacher={"checkpoint": "teacher.pt"}, seeds=[0, 1],
                methods={"lmd": {"objective": {"name": "lmd"}}}, evaluation=evaluation, max_concurrent=1)
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("MLFLOW_TRACKING_URI", None)
    record = tmp_path / "studies" / "seeded" / "fmm_study.json"
    proc = subprocess.Popen([sys.executable, "-m", "fmm.cli", "study", "study.yaml", "--address", address],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    finished = {}
    try:
        deadline = time.time() + 300
        while not finished and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                finished = dict(json.loads(record.read_text())["state"].get("seed_runs", {}).get("lmd", {}))
            except (OSError, ValueError, KeyError):
                pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert list(finished) == ["0"], finished

    def resume():  # in this process, already joined to the cluster: no second interpreter start-up
        code = cli.main(["study", "study.yaml", "--resume", "--address", address])
        printed = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=printed.out, stderr=printed.err)

    # A start killed between creating its MLflow run and writing its record leaves a RUNNING run no resume
    # continues (the kill may or may not have hit that window; here it always has): it must not stand.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    container = json.loads(record.read_text())["state"]["member_runs"]["lmd"]
    stray = client.create_run(client.get_run(container).info.experiment_id, run_name="seeded-lmd-seed1", tags={
        "mlflow.parentRunId": container, "study": "seeded", "study_member": "lmd", "study_role": "seed",
        "study_seed": "1"}).info.run_id
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = resume()
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    for seed in finished:
        assert f"seeded-lmd-seed{seed}: finished earlier" in out.stdout
        assert f"training seeded-lmd-seed{seed} " not in out.stdout
    state = json.loads(record.read_text())["state"]
    assert {k: v for k, v in state["seed_runs"]["lmd"].items() if k in finished} == finished
    member = client.get_run(state["members"]["lmd"])
    assert member.info.status == "FINISHED" and member.data.tags["study_seeds"] == "0,1"
    assert [m.value for m in client.get_metric_history(member.info.run_id, "sw2/n")] == [4, 4]
    held = {k: [m.value for m in sorted(client.get_metric_history(member.info.run_id, k), key=lambda m: m.step)]
            for k in ("sw2", "sw2/low", "sw2/high")}
    assert table_cells(out.stdout, ["lmd"])["lmd"] == [f"{m:.4g} ± {(h - lo) / 2:.2g}"
                                                       for m, lo, h in zip(held["sw2"], held["sw2/low"], held["sw2/high"])]
    seed_runs = client.search_runs([member.info.experiment_id], f"tags.mlflow.parentRunId = '{member.info.run_id}'")
    # Every stray ends KILLED and points at the run that stands: the one made here, and the driver's own when
    # the kill also hit that window (it may or may not).
    strays = {r.info.run_id: r for r in seed_runs if r.info.status != "FINISHED"}
    assert stray in strays and len(strays) <= 2
    for run in strays.values():
        assert run.info.status == "KILLED" and run.data.tags["study_seed"] == "1"
        assert run.data.tags["superseded_by"] == state["seed_runs"]["lmd"]["1"]
    seed_runs = [r for r in seed_runs if r.info.run_id not in strays]
    assert sorted(r.data.tags["study_seed"] for r in seed_runs) == ["0", "1"]
    for run in seed_runs:
        tags = run.data.tags
        assert (tags["eval_worker"], tags["eval_device"], tags["eval_node"]) == ("task", "cpu", gpu_node), tags
    parent = client.get_run(member.data.tags["mlflow.parentRunId"])
    for part in ("teacher", "exact"):  # loaded and scored on the GPU node, logged into the study's run
        tags = parent.data.tags
        assert (tags[f"{part}_eval_worker"], tags[f"{part}_eval_device"], tags[f"{part}_eval_node"]) == \
            ("task", "cpu", gpu_node), tags
        assert f"{part}/heun-le/sw2" in parent.data.metrics
    teacher_history = len(client.get_metric_history(parent.info.run_id, "teacher/heun-le/sw2"))
    assert "evaluating 4 run(s) as Ray tasks with {'GPU': 1.0}" in out.stdout  # 2 seeds, teacher, exact

    # Resuming the finished study retrains nothing, scores nothing twice and gives the same table.
    again = resume()
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 2 and "training seeded-" not in again.stdout
    assert len(client.get_metric_history(member.info.run_id, "sw2")) == 2
    assert all(len(client.get_metric_history(r.info.run_id, "sw2")) == 2 for r in seed_runs)
    assert len(client.get_metric_history(parent.info.run_id, "teacher/heun-le/sw2")) == teacher_history
    assert table_cells(again.stdout, ["lmd"]) == table_cells(out.stdout, ["lmd"])
