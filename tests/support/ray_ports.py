"""Loopback ports for the services tests start, Ray nodes joined to a cluster and lost again, and stopping a
Ray cluster the test started itself."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the CLI installed beside this interpreter


def stop_ray_under(temp_dir: str) -> None:
    """Kill every process of a Ray started with --temp-dir=temp_dir: those whose command line or open files
    lie under it (its agents rename themselves but keep their logs open there). `ray stop` would stop every
    Ray on the machine, the test session's own cluster included."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                owned = temp_dir.encode() in f.read()
            if not owned:
                fds = f"/proc/{pid}/fd"
                owned = any(os.readlink(os.path.join(fds, fd)).startswith(temp_dir) for fd in os.listdir(fds))
            if owned:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    time.sleep(1)


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this process: the kernel may offer a just-closed port
    again, and one `ray start` given the same port for two components refuses to start."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def own_ports() -> list[str]:
    """Every port a Ray node opens, chosen here, so that another Ray on this machine cannot hold one."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--object-manager-port={free_port()}"]


def node_temp_dir(node_manager_port: int) -> str:
    """A joined node's own Ray temp dir. Without one, `ray start --address` records the cluster it joined
    in /tmp/ray/ray_current_cluster, and from then on every `ray.init()` without an address on this
    machine joins that cluster (or hangs on it once it is gone), and Ray's state API, which Ray Train's
    placement-group cleaner queries from inside another cluster, answers from it."""
    return f"/tmp/fmmw{node_manager_port}"  # short: Ray's socket paths must fit 107 bytes


def start_worker_node(address: str, env: dict, cpus: int = 1, gpus: int = 0) -> int:
    """A raylet joined to the head at `address` (logical CPUs and GPUs as given); returns its node-manager
    port, which names it."""
    port = free_port()
    out = subprocess.run([RAY, "start", f"--address={address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
                          f"--node-manager-port={port}", f"--temp-dir={node_temp_dir(port)}",
                          "--disable-usage-stats", *own_ports()],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return port


def kill_node(node_manager_port: int) -> int:
    """SIGKILL a node's raylet and every process under it (its workers and agents): a lost machine. Returns
    how many raylets it found."""
    parents = {}
    raylets = []
    others = set()  # the node's log monitor: started beside the raylet, not under it
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if f"--node_manager_port={node_manager_port}".encode() in cmdline:
                raylets.append(int(pid))
            elif f"{node_temp_dir(node_manager_port)}/".encode() in cmdline:
                others.add(int(pid))
        except OSError:
            continue
    doomed = set(raylets) | others
    while True:
        more = {pid for pid, parent in parents.items() if parent in doomed} - doomed
        if not more:
            break
        doomed |= more
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(node_temp_dir(node_manager_port), ignore_errors=True)
    return len(raylets)
