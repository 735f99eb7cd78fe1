"""Two Ray nodes on one machine: callray spread over both, then the second node dies.

Starts a private Redis, a Ray head and a second Ray node (each ``ray start --block``, with
its own temp dir and ports, so it touches no other cluster on the machine), deploys callray's
distributed architecture from ``config/distributed.yaml`` as ``serve deploy`` would (two
gateway replicas, at most one per node; each call lives in the replica holding its socket),
opens calls, then kills the second node's raylet. Its gateway replica dies with it; the calls
that lived there reconnect (as Retell does) and resume on the head with their history. Every
process started here is stopped by its pid at the end, whatever happens.

    python scripts/multinode.py           # the demo, step by step
    python scripts/multinode.py --check   # the same; exit status 1 unless every check passed
    python scripts/multinode.py --ingress haproxy   # behind HAProxy on the head instead of Serve's proxy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets
import yaml

from callray.sim.client import RetellClient
from callray.sim.local import INGRESSES, RedisServer, free_port, serve_ingress_env

REPO = Path(__file__).resolve().parents[1]

APP = "callray"
NAMESPACE = "callray-multinode"
NAMES = ["Maria", "Nadia", "Omar", "Priya", "Quinn", "Rosa"]
GRACE_S = 2
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops a node at once
    # The GCS declares a node dead after ~3 missed 1 s health checks (default ~15-30 s).
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    # One proxy (on the head: two on one machine would want the same port). Serve's proxy
    # prefers replicas on its own node, which would put every socket on the head's replica.
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
}
T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def children(pid: int) -> list[int]:
    """Direct child pids of ``pid`` (from /proc: no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_processes_under(base: Path) -> list[int]:
    """SIGKILL the processes whose command line names ``base`` (this run's private directory:
    stray Ray workers of our nodes), except this one; returns their pids."""
    pids = [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and str(base) in command_line(int(p.name))]
    for pid in pids:
        kill_pid(pid)
    return pids


def ray_cli() -> str:
    """The ``ray`` command of the interpreter running this script (its venv need not be on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


@dataclass
class RayNode:
    """One ``ray start --block`` process: its node's processes are its children."""

    label: str
    temp_dir: Path
    args: list[str]
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def start(self) -> None:
        self.temp_dir.mkdir(parents=True)
        self.log_path = self.temp_dir.parent / f"ray-start-{self.label}.log"
        base = random.randrange(20000, 29000, 100)
        ports = ["--node-manager-port", free_port(), "--object-manager-port", free_port(),
                 "--min-worker-port", base, "--max-worker-port", base + 99,
                 "--dashboard-agent-listen-port", free_port(), "--dashboard-agent-grpc-port", free_port(),
                 "--runtime-env-agent-port", free_port(), "--metrics-export-port", free_port()]
        command = [ray_cli(), "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp_dir),
                   "--object-store-memory", str(150 * 1024 * 1024), "--disable-usage-stats",
                   *self.args, *map(str, ports)]
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV},
                                         start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "Ray runtime started" in text:
                log(f"{self.label}: `ray start` pid {self.proc.pid}, raylet pid {self.raylet_pid()}, "
                    f"temp dir {self.temp_dir}")
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label}: ray start exited {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"{self.label}: ray start did not report a running node in 90 s (see {self.log_path})")

    def raylet_pid(self) -> int | None:
        for pid in children(self.proc.pid) if self.proc else []:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                return pid
        return None

    def stop(self) -> None:
        """SIGTERM the ``ray start --block`` process (it stops its node), then SIGKILL if needed."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in children(self.proc.pid):
                kill_pid(pid)
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class Cluster:
    """Everything this script starts, under one private directory; stopped by pid."""

    base: Path
    gcs_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    redis: RedisServer | None = None
    head: RayNode | None = None
    node2: RayNode | None = None

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def start_redis(self) -> None:
        self.redis = RedisServer(self.base / "redis", appendonly=False)
        self.redis.start()
        log(f"redis: pid {self.redis.proc.pid}, {self.redis_url}")

    def start_nodes(self) -> None:
        self.head = RayNode("head", self.base / "h", [
            "--head", "--port", str(self.gcs_port), "--num-cpus", "2", "--include-dashboard", "false",
            "--ray-client-server-port", str(free_port()), "--resources", json.dumps({"head": 1})])
        self.head.start()
        self.node2 = RayNode("node2", self.base / "w", [
            "--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", "1", "--resources", json.dumps({"node2": 1})])
        self.node2.start()

    def stop(self) -> None:
        for node in (self.node2, self.head):
            if node is not None:
                node.stop()
        leftovers = kill_processes_under(self.base)
        if leftovers:
            log(f"killed {len(leftovers)} leftover process(es) of this cluster: {leftovers}")
        if self.redis is not None:
            self.redis.stop()


# ----------------------------------------------------------------------------- the driver side


def serve_config(cluster: Cluster) -> dict[str, Any]:
    """config/distributed.yaml's application, pointed at our Redis, spread over two nodes."""
    doc = yaml.safe_load((REPO / "config/distributed.yaml").read_text())
    app = doc["applications"][0]
    app["name"] = APP
    args = app["args"]
    args["redis"]["url"] = cluster.redis_url
    args["hosts"].update(namespace=NAMESPACE)
    args["gateway"]["guard"]["secret"] = None  # a loopback demo: the calls connect without the socket secret
    args["archive"] = {"backend": "files", "dir": str(cluster.base / "archive")}  # one machine: files do
    args["logging"]["level"] = "WARNING"
    gateway = next(d for d in app["deployments"] if d["name"] == "CallGateway")
    gateway.update(num_replicas=2, max_replicas_per_node=1, graceful_shutdown_timeout_s=GRACE_S)
    return {"applications": [app]}


def placement(node_labels: dict[str, str]) -> dict[str, str]:
    """Alive gateway replicas of the app (by replica id) -> the label of their node."""
    from ray._private import state

    prefix = f"SERVE_REPLICA::{APP}#CallGateway#"
    where = {}
    for info in state.actors().values():
        if info["State"] == "ALIVE" and info["Name"].startswith(prefix):
            where[info["Name"].removeprefix(prefix)] = node_labels.get(info["Address"]["NodeID"], "?")
    return dict(sorted(where.items()))


async def owner_replica(cluster: Cluster, call_id: str) -> str:
    """The replica id of the activation that holds the call (recorded with it in Redis; the
    owner name is ``{app}-{replica id}-{suffix}``)."""
    from callray.stores.redis import RedisStateStore
    from callray.stores.redis_client import connect_redis

    client = await connect_redis(cluster.redis_url)
    try:
        owner = await RedisStateStore(client).owner(call_id)
    finally:
        await client.aclose()
    return owner[0].removeprefix(f"{APP}-").rsplit("-", 1)[0] if owner else "?"


def show_placement(title: str, where: dict[str, str]) -> None:
    log(title)
    for name, node in where.items():
        print(f"           replica {name:<20} on {node}", flush=True)


async def wait_until(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def app_replicas() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "CallGateway" not in app.deployments:
        return {}
    return {getattr(k, "value", str(k)): v for k, v in app.deployments["CallGateway"].replica_states.items() if v}


def healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


async def reconnect(url: str, call_id: str, attempts: int = 60) -> RetellClient:
    """As Retell does: the same URL and call_id again until a replica takes the socket."""
    for _ in range(attempts):
        try:
            client = await RetellClient(url, call_id).connect()
            await client.complete(0, timeout=15)
            return client
        except (OSError, websockets.WebSocketException):  # refused, closed early or timed out
            await asyncio.sleep(0.5)
    raise RuntimeError(f"call {call_id} could not reconnect")


async def scenario(cluster: Cluster) -> list[str]:
    """Runs the demo; returns the failed checks (empty: all passed)."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        log(f"CHECK {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    log(f"step 3: driver connects with ray.init(address='127.0.0.1:{cluster.gcs_port}')")
    ray.init(address=f"127.0.0.1:{cluster.gcs_port}", _node_ip_address="127.0.0.1", logging_level="warning",
             log_to_driver=False, namespace=NAMESPACE)
    await wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, 60, "two alive nodes")
    labels = {}
    for node in ray.nodes():
        if node["Alive"]:
            labels[node["NodeID"]] = "node2" if "node2" in node["Resources"] else "head"
            log(f"        node {node['NodeID'][:12]} = {labels[node['NodeID']]:<5} "
                f"CPU {node['Resources'].get('CPU')}, raylet port {node['NodeManagerPort']}")
    node2_id = next(k for k, v in labels.items() if v == "node2")

    log(f"step 4: serve.start (proxy on the head, 127.0.0.1:{cluster.http_port}); deploy config/distributed.yaml "
        "with num_replicas 2, max_replicas_per_node 1")
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": cluster.http_port})
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(serve_config(cluster)))
    await wait_until(lambda: app_replicas() == {"RUNNING": 2} and healthy(cluster.http_port), 180,
                     "two running gateway replicas")
    before = placement(labels)
    show_placement("        placement before:", before)
    replicas_on_node2 = [n for n, where in before.items() if where == "node2"]
    check(len(set(before.values())) == 2, "one gateway replica on each node")

    url = f"ws://127.0.0.1:{cluster.http_port}/llm-websocket"
    log(f"step 5: open {len(NAMES)} calls at {url}/<call_id>, each says its caller's name")
    clients: list[RetellClient] = []
    try:
        # Behind HAProxy a new replica gets sockets only once HAProxy's health checks marked it
        # up: keep opening calls (a few more at most) until node2 holds one, or the check fails.
        for i in range(len(NAMES) * 4):
            if i >= len(NAMES) and "node2" in [before.get(await owner_replica(cluster, c.call_id)) for c in clients]:
                break
            if i >= len(NAMES):
                await asyncio.sleep(0.5)
            name = NAMES[i % len(NAMES)]
            client = await RetellClient(url, f"call-mn-{os.getpid()}-{i}").connect()
            await client.complete(0)
            answer = await client.turn(1, f"Hi, my name is {name}")
            owner = await owner_replica(cluster, client.call_id)
            log(f"        {client.call_id} ({name}): lives in replica {owner} on {before.get(owner, '?')}; "
                f"agent: {answer[:60]!r}")
            clients.append(client)
        on_node2 = {c.call_id for c in clients if before.get(await owner_replica(cluster, c.call_id)) == "node2"}
        check(bool(on_node2), "a call lives on node2 (its death must drop one)")

        raylet = cluster.node2.raylet_pid()
        log(f"step 6: kill node2's raylet (SIGKILL pid {raylet}, a child of node2's `ray start` pid "
            f"{cluster.node2.proc.pid}); its workers, the gateway replica among them, die with it")
        if raylet is None:
            raise RuntimeError("node2's raylet is not running")
        kill_pid(raylet)
        await wait_until(lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node2_id), 60,
                         "the GCS to mark node2 dead")
        log("        the GCS marked node2 dead")
        await asyncio.sleep(GRACE_S + 1)  # let the proxy close the sockets of the dead replica
        dropped = [c for c in clients if c.closed]
        log(f"        sockets closed by the server: {[c.call_id for c in dropped]} "
            f"(close codes {[c.close_code for c in dropped]})")
        if replicas_on_node2:
            check({c.call_id for c in dropped} == on_node2, "exactly the calls that lived on node2 lost their socket")

        log("step 7: every call takes its next turn: dropped ones reconnect with the same call_id first")
        for i, old in enumerate(list(clients)):  # the extra calls opened for node2 too
            name, client, how = NAMES[i % len(NAMES)], old, "same socket"
            if old.closed:
                client = await reconnect(url, old.call_id)
                client.transcript = list(old.transcript)
                check(client.responses(0)[0]["content"] == "", f"{old.call_id}: reconnected, no second greeting")
                how = "reconnected"
            answer = await client.turn(2, "I'd like to book an appointment")
            check(name in answer, f"{old.call_id} ({how}): the agent still knows {name}: {answer[:70]!r}")
            if client is not old:
                clients.append(client)

        after = placement(labels)
        show_placement("step 8: placement after:", after)
        check(all(where == "head" for where in after.values()), "every live replica is on the head")
        owners = {c.call_id: await owner_replica(cluster, c.call_id) for c in clients}
        check(all(after.get(o) == "head" for o in owners.values()), "every call lives in a replica on the head")
    finally:
        await asyncio.gather(*(c.close() for c in clients if not c.closed),
                             return_exceptions=True)
        ray.shutdown()
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 unless every check passed")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir (Ray logs) afterwards")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="an empty directory with a short path for Ray's temp dirs (default: a new /tmp/crmn-*)")
    parser.add_argument("--ingress", choices=INGRESSES, default="proxy",
                        help="Serve's Python proxy (default) or HAProxy, on the head")
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below on SIGTERM too

    # Short: Ray's socket paths under it must stay below 108 characters.
    base = options.workdir.resolve() if options.workdir else Path(tempfile.mkdtemp(prefix="crmn-", dir="/tmp"))
    cluster = Cluster(base)
    RAY_ENV.update(serve_ingress_env(options.ingress, base / "haproxy"))  # never another Ray's ports or files
    failures: list[str] = ["did not finish"]
    try:
        log(f"step 1: private redis-server (dir {base})")
        cluster.start_redis()
        log("step 2: Ray head and a second Ray node on this machine, each with its own temp dir and ports")
        cluster.start_nodes()
        failures = asyncio.run(scenario(cluster))
    except Exception as exc:  # noqa: BLE001 - any error is a failed run, reported after the clean-up
        log(f"ERROR: {type(exc).__name__}: {exc}")
        failures = [f"{type(exc).__name__}: {exc}"]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        log("step 9: stop everything started here, by pid")
        cluster.stop()
        if options.keep_logs:
            log(f"logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    log("RESULT: PASS" if not failures else f"RESULT: FAIL ({len(failures)}): " + "; ".join(failures))
    return 1 if failures and options.check else 0


if __name__ == "__main__":
    sys.exit(main())
