"""A tracking server that lets no one in who does not belong: MLflow's basic-auth app on loopback, a
training run logged with credentials from MLflow's environment variables, and refused without them."""

import base64
import urllib.error
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from fmm.infra import tracking
from support.mlflow_server import mlflow_server
from fmm.jobs.train import open_run
from fmm.worker.loop import run_loop
from fmm.worker.sessions import LocalSession
from fmm.worker.trainer import loop_config
from support.experiments import experiment

PASSWORD = "a-long-test-password-1"


@pytest.fixture
def auth_server(tmp_path):
    """`mlflow server --app-name basic-auth` with its user store beside the tracking store; only users it
    knows may read or write (no default permission)."""
    ini = tmp_path / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{tmp_path}/basic_auth.db\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    with mlflow_server(str(tmp_path), "--app-name", "basic-auth", "--serve-artifacts", "--allowed-hosts",
                       "127.0.0.1:{port}",
                       env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
                            "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-secret-key"}) as url:
        yield url


def train(tmp_path, url):
    exp = experiment(tmp_path, name="guarded", network={"name": "mlp", "dim": 2, "width": 32, "depth": 2},
                     train__steps=20, train__checkpoint_every=10, train__log_every=5,
                     tracking={"uri": url, "experiment": "guarded"})
    record = open_run(exp)
    config = loop_config(exp, record)
    return record, run_loop(config, LocalSession(config["run_dir"]))


@pytest.mark.slow
def test_a_run_is_logged_with_credentials_from_the_environment_and_refused_without(tmp_path, auth_server,
                                                                                   monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(ValueError) as refused:
        train(tmp_path / "anonymous", auth_server)
    message = str(refused.value)
    assert auth_server in message and "401" in message and "MLFLOW_TRACKING_USERNAME" in message
    assert not (tmp_path / "anonymous" / "runs" / "guarded" / "fmm_run.json").exists()  # no record written

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(ValueError, match="401"):
        tracking.ensure_experiment(auth_server, "guarded")

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    record, result = train(tmp_path / "admitted", auth_server)
    assert result["step"] == 20
    client = MlflowClient(auth_server)
    logged = client.get_run(record.mlflow_run_id)
    assert logged.data.tags["mlflow.user"]
    assert {m.name for m in client.search_logged_models([record.experiment_id])
            if m.source_run_id == record.mlflow_run_id} == {"model", "best_model"}
    assert [m.step for m in client.get_metric_history(record.mlflow_run_id, "train/loss")] == [5, 10, 15, 20]
    assert {a.path for a in client.list_artifacts(record.mlflow_run_id, "checkpoints")} >= {"checkpoints/final.pt"}

    port = auth_server.rsplit(":", 1)[1]
    login = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    path = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=guarded"

    def status(host: str) -> int:
        request = urllib.request.Request(f"{auth_server}{path}", headers={"Host": host, "Authorization": login})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    assert status(f"127.0.0.1:{port}") == 200
    assert status(f"rebound.example:{port}") in (400, 403)  # a name the server does not answer to

    with pytest.raises(ValueError, match="carries credentials in its URI"):  # never in the URI
        tracking.resolve_uri(auth_server.replace("http://", f"http://admin:{PASSWORD}@"))
