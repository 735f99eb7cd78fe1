"""Local helper processes for tests, benchmarks and scripts: a free port and a private
redis-server, started and stopped by its process (never a Redis someone else runs)."""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when the thread that started it ends, even if
    its process crashed and could not stop it (Linux; elsewhere a no-op). Start such children
    through :func:`spawn`, whose thread lives as long as the process."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# PR_SET_PDEATHSIG follows the starting *thread*: a child started from an asyncio worker thread
# would be killed when the event loop's executor shuts down. One long-lived thread starts them all.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="callray-spawn")


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` of a child that dies with this process, from any thread."""
    return _SPAWNER.submit(subprocess.Popen, argv, preexec_fn=die_with_parent, **kwargs).result()


# The ports free_port handed out lately. Linux may offer a port it offered a moment ago, and a
# caller often binds its port much later (HAProxy's metrics port binds when Serve starts, after
# Ray): two callers of one process must not both get it.
_HANDED_OUT: deque[int] = deque(maxlen=1024)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that none of this
    process's last 1024 calls returned."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port


class RedisServer:
    """A redis-server on a free port; ``restart`` keeps its port and data dir (with appendonly
    the data survives, as a production Redis with an append-only file would)."""

    def __init__(self, data_dir: Path, *, appendonly: bool = True, fsync: str = "always",
                 log_path: Path | None = None, port: int | None = None):
        self.dir, self.appendonly, self.fsync, self.log_path = Path(data_dir), appendonly, fsync, log_path
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH; install Redis 7 (apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.fsync]
        with open(self.log_path or "/dev/null", "ab") as out:
            # its own session: a Ctrl-C reaches the owner, which then stops it in order
            self.proc = spawn(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM (Redis flushes its append-only file), then SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


#: Serve's ingress, chosen when Ray starts: its Python proxy, or HAProxy in front of replicas
#: that serve HTTP and WebSockets themselves (``docs/operations.md``, "The ingress").
INGRESSES = ("proxy", "haproxy")


def serve_ingress_env(ingress: str, directory: Path) -> dict[str, str]:
    """The environment that makes a Ray started with it serve through ``ingress``. HAProxy's
    files and ports are made private to this run (in ``directory``, on free ports): Ray's
    defaults are fixed paths and ports that every Ray on the machine would share."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress {ingress!r}: expected one of {', '.join(INGRESSES)}")
    if ingress == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(directory / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(directory / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(directory),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(directory / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(directory / "metrics.sock"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
    }
