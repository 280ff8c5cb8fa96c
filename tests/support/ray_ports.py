"""Loopback ports for the services tests start, and stopping a Ray cluster the test started itself."""

import os
import signal
import socket
import time


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
