"""A real `mlflow server` on loopback for the tests that need one: a SQLite backend, served artifacts, and
optionally MLflow's basic-auth app."""

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from support.ray_ports import free_port

MLFLOW = os.path.join(os.path.dirname(sys.executable), "mlflow")  # the CLI installed beside this interpreter


@contextlib.contextmanager
def mlflow_server(folder, *args: str, env: dict[str, str] | None = None):
    """Start `mlflow server` over a store in `folder`, yield its URL, kill it at the end. Extra `args` go to
    the command line (e.g. `--app-name basic-auth`; `{port}` in one becomes the server's port); `env` is
    added to the server's environment."""
    port = free_port()
    log = open(os.path.join(folder, f"mlflow-server-{port}.log"), "w")
    proc = subprocess.Popen([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{folder}/server.db",
                             "--artifacts-destination", os.path.join(folder, "server-artifacts"),
                             *(a.replace("{port}", str(port)) for a in args)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except urllib.error.HTTPError:  # it answers (an authenticating server may refuse even /health)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                log.close()
                raise RuntimeError(f"mlflow server did not come up: {open(log.name).read()[-2000:]}")
            time.sleep(1)
    try:
        yield url
    finally:
        os.killpg(proc.pid, 9)  # a graceful stop waits on its workers for 20 s; the store is SQLite, committed
        proc.wait(30)
        log.close()
