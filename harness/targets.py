"""What a benchmark or chaos run measures against, and the processes behind it.

Serve targets (callray in each architecture and placement, and the bare Serve floor) are
deployed as applications of one private local Ray; peers outside Ray (the hand-written
baseline, Retell's public Python demo) run as subprocesses at the niceness Ray gives its own
workers, so a peer is not favoured by the scheduler. Every process started here is stopped by
its pid (or Serve handle) on every exit path, Ctrl-C included.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from rich.console import Console

from callray.settings import PROJECT_DIR, CallraySettings
from callray.sim.local import RedisServer, free_port, serve_ingress_env, spawn

log = logging.getLogger("harness.targets")

#: callray targets and the config file each one deploys (with its placement).
CALLRAY_TARGETS: dict[str, tuple[str, str]] = {
    "single": ("config/single.yaml", "local"),
    "distributed": ("config/distributed.yaml", "local"),
    "event_driven": ("config/event_driven.yaml", "local"),
    "dedicated": ("config/single.yaml", "dedicated"),
    "python": ("config/single.yaml", "local"),
}
#: callray targets that answer with another agent than their config file's default.
TARGET_AGENTS: dict[str, str] = {"python": "examples/echo/echo.yaml"}
FLOORS = ("floor", "floor_token")
PEERS = ("baseline", "retell_demo", "retell_demo_pinned")
REDIS_TARGETS = ("distributed", "event_driven")
TARGET_NOTES: dict[str, str] = {
    "floor": "harness/floor_app.py: a bare Serve WebSocket deployment, same protocol, no state; with the LLM, "
             "callray's stream reader and phrase frames (one shared client)",
    "floor_token": "the same bare Serve app with the LLM read through the SDK the ordinary way, one frame per token",
    "baseline": "harness/baseline_server.py: one hand-written FastAPI process (one shared client, no SDK retries)",
    "retell_demo": "RetellAI/retell-custom-llm-python-demo, unmodified, on this interpreter's current libraries "
                   "(a new OpenAI client per call, one frame per token), pointed at the fake LLM",
    "retell_demo_pinned": "the same demo in its own venv with its requirements.txt (openai 1.23, uvicorn 0.21 with "
                          "wsproto), as its README installs it",
    "single": "callray, config/single.yaml: 1 gateway replica, calls in it, state and cache in memory",
    "distributed": "callray, config/distributed.yaml: 2 gateway replicas, state and cache in Redis",
    "event_driven": "callray, config/event_driven.yaml: autoscaled gateway (2-8), Redis, Redis Streams events",
    "dedicated": "callray, config/single.yaml with placement: dedicated (one Ray actor per call, warm pool)",
    "python": "callray, config/single.yaml answering with a Python agent (examples/echo, kind: python)",
}


def wait_until(ready: Callable[[], bool], what: str, proc: subprocess.Popen | None = None,
               timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} was not ready within {timeout_s:.0f} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def psutil() -> Any:
    """psutil, which Ray ships in ray/thirdparty_files and puts on sys.path when imported."""
    try:
        import psutil as module
    except ImportError:
        import ray  # noqa: F401 - adds ray/thirdparty_files to sys.path

        import psutil as module
    return module


def rss_mb(pids: list[int]) -> float:
    ps = psutil()
    total = 0
    for pid in pids:
        with contextlib.suppress(ps.Error):
            total += ps.Process(pid).memory_info().rss
    return total / 2**20


class Processes:
    """The subprocesses a run started, each stopped by its pid (terminate, then kill)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.running: dict[int, tuple[str, subprocess.Popen]] = {}
        atexit.register(self.stop_all)

    def start(self, name: str, argv: list[str], *, nice: int = 0, **kwargs: Any) -> subprocess.Popen:
        if nice:
            argv = ["nice", "-n", str(nice), *argv]
        with open(self.log_dir / f"{name}.log", "ab") as logf:
            # A new session: Ctrl-C reaches only this process, which then stops the children in order.
            proc = spawn(argv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.running[proc.pid] = (name, proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        self.running.pop(proc.pid, None)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running.values())):
            self.stop(proc)

    def close(self) -> None:
        self.stop_all()
        atexit.unregister(self.stop_all)

    def start_redis(self, data_dir: Path) -> str:
        """A private redis-server (appendonly, fsync every second), stopped with the others."""
        server = RedisServer(data_dir, fsync="everysec", log_path=self.log_dir / "redis.log")
        server.start()
        self.running[server.proc.pid] = ("redis", server.proc)
        return server.url

    def start_fake_llm(self, ttft_ms: float, tokens_per_s: float) -> str:
        port = free_port()
        proc = self.start("fake-llm", [sys.executable, "-m", "callray.sim.fake_llm", "--port", str(port),
                                       "--ttft-ms", str(ttft_ms), "--tokens-per-s", str(tokens_per_s)],
                          cwd=PROJECT_DIR)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/v1/models"), f"fake LLM on port {port}", proc, 30)
        return f"http://127.0.0.1:{port}/v1"


# ====================================================================== Ray and Serve


@contextlib.contextmanager
def ray_session(console: Console, ingress: str = "proxy") -> Iterator[int]:
    """A private local Ray with Serve on a free port behind ``ingress`` (Serve's Python proxy or
    HAProxy); yields the port. Shut down on exit."""
    temp_dir = tempfile.mkdtemp(prefix="crb-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {"RAY_AUTH_MODE": "disabled", **serve_ingress_env(ingress, Path(temp_dir) / "haproxy")}
    os.environ.update(env)  # read by the Ray processes ray.init starts (the controller picks the ingress)
    import ray
    from ray import serve

    console.log(f"starting a private local Ray behind {ingress} (temp dir {temp_dir})")
    # Ray puts the driver's current directory first on every worker's sys.path; from the project
    # it would shadow the working_dir of a deployment that runs another checkout (harness/versions.py).
    with contextlib.chdir(temp_dir):
        ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp_dir,
                 runtime_env={"env_vars": env}, logging_level="warning", log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    failed = False
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    except BaseException:
        failed = True
        raise
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if failed:
            console.log(f"Ray logs kept in {temp_dir}/session_latest/logs")
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)


def alive_actors() -> list[dict[str, Any]]:
    """Alive actors from the GCS (the state API needs the dashboard, which the harness does not start)."""
    from ray._private import state

    return [a for a in state.actors().values() if a.get("State") == "ALIVE"]


def serve_processes(app: str, namespace: str | None = None) -> list[tuple[str, int]]:
    """(class, pid) of the processes serving ``app``: the ingress (Serve's proxy, or HAProxy's
    manager actor and the haproxy process it runs), its replicas and the named actors of its
    namespace (call hosts, pools, consumers)."""
    import ray

    names = set()
    if namespace:
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace}
    out = []
    for actor in alive_actors():
        cls = actor.get("ActorClassName", "")
        if (cls.startswith(f"ServeReplica:{app}:") or cls in ("ProxyActor", "HAProxyManager")
                or actor.get("Name") in names) and actor.get("Pid"):
            out.append((cls, actor["Pid"]))
            if cls == "HAProxyManager":
                with contextlib.suppress(Exception):
                    out += [("haproxy", child.pid) for child in psutil().Process(actor["Pid"]).children(recursive=True)
                            if "haproxy" in child.name()]
    return out


def replica_addresses(app: str) -> list[str]:
    """``host:port`` of each of ``app``'s replicas as HAProxy reaches them (direct ingress),
    read from the HAProxy config Serve wrote for this session (``ray_session``'s)."""
    asked = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"])
    # Serve writes it one directory further down, in a directory named after the cluster
    config = "".join(path.read_text() for path in asked.parent.glob(f"*/{asked.name}"))
    return re.findall(rf"^\s*server SERVE_REPLICA_{re.escape(app)}-\S+ (\S+)", config, re.MULTILINE)


def kill_namespace(namespace: str) -> None:
    """Kill the named actors a callray target left in its namespace (they are detached)."""
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace:
            with contextlib.suppress(Exception):
                ray.kill(ray.get_actor(entry["name"], namespace=namespace), no_restart=True)


#: The read token of every callray target the harness deploys (its /calls, /analytics and /ui).
READ_TOKEN = secrets.token_urlsafe(24)


def read_json(url: str, wait_s: float = 0.0) -> dict[str, Any] | None:
    """GET a read route's JSON with the harness's token, retrying a 404 for up to ``wait_s``
    (archives are written after the turn); None if it never came."""
    deadline = time.monotonic() + wait_s
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                return None
        except OSError:
            if time.monotonic() > deadline:
                return None
        time.sleep(0.5)


@dataclass
class Deployed:
    """A running target: where to call it, how to find its processes, how to stop it."""

    name: str
    url: str
    processes: Callable[[], list[tuple[str, int]]]
    teardown: Callable[[], None]
    holding: frozenset[str] = frozenset()
    http_base: str | None = None
    notes: list[str] = field(default_factory=list)


def deployment_options(config_file: str) -> dict[str, Any]:
    doc = yaml.safe_load((PROJECT_DIR / config_file).read_text())
    dep = (doc["applications"][0].get("deployments") or [{}])[0]
    keys = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "graceful_shutdown_timeout_s",
            "ray_actor_options")
    return {k: dep[k] for k in keys if k in dep}


def callray_args(target: str, *, namespace: str, redis_url: str | None, agent_file: Path | None,
                 webhook_key: str = "", archive: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Serve application args of a callray target: its config file's, pointed at the run's
    Redis, a namespace of its own, (LLM mode) the bench LLM agent, (``webhook_key``) Retell's
    webhooks signed with that key and (``archive``) an archive section (default: files)."""
    config_file, placement = CALLRAY_TARGETS[target]
    args = yaml.safe_load((PROJECT_DIR / config_file).read_text())["applications"][0]["args"]
    args["hosts"]["namespace"] = namespace
    args["hosts"]["placement"] = placement
    args["gateway"].pop("guard", None)  # the simulator connects from loopback without the secret
    args["gateway"]["ingress"] = "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"  # the session's
    args["gateway"]["read_token"] = READ_TOKEN
    args["webhook"]["api_key"] = webhook_key
    args["archive"] = archive or {"backend": "files", "dir": "var/calls"}  # the benchmarks measure the turn path
    if redis_url is not None:
        args["redis"] = {**args.get("redis", {}), "url": redis_url}
    else:
        args.pop("redis", None)  # its ${REDIS_URL} need not be set to learn that it is not used
        if CallraySettings.parse(args, source=config_file).uses_redis:
            raise RuntimeError(f"{target} needs Redis")
    if agent_file is not None:
        args["agents"] = {"default": "bench_llm", "files": {"bench_llm": str(agent_file)}, "by_retell_agent_id": {}}
    elif target in TARGET_AGENTS:
        args["agents"] = {"default": target, "files": {target: str(PROJECT_DIR / TARGET_AGENTS[target])},
                          "by_retell_agent_id": {}}
    return args


def write_llm_agent(directory: Path, llm_base_url: str) -> Path:
    """``config/agents/assistant_llm.yaml`` with its provider replaced by the fake LLM."""
    data = yaml.safe_load((PROJECT_DIR / "config/agents/assistant_llm.yaml").read_text())
    data["providers"] = [{"base_url": llm_base_url, "model": "gpt-4o-mini",
                          "api_key_env": "CALLRAY_BENCH_UNSET_KEY", "api_key_fallback": "fake-key"}]
    path = directory / "bench_llm.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def deploy_serve_target(target: str, port: int, *, namespace: str, redis_url: str | None = None,
                        llm_base_url: str | None = None, agent_file: Path | None = None,
                        webhook_key: str = "", archive: dict[str, Any] | None = None,
                        timeout_s: float = 180.0, app: str | None = None, code: Path | None = None) -> Deployed:
    """Deploy ``target`` as Serve application ``app`` (default: the target's name) under
    ``/app``; wait until healthy. ``code``: a callray checkout its replicas run instead of this
    one (their working_dir), to measure two versions in one Ray session."""
    from ray import serve

    app = app or target
    base = f"http://127.0.0.1:{port}/{app}"

    def teardown() -> None:
        with contextlib.suppress(Exception):
            serve.delete(app)
        kill_namespace(namespace)

    try:
        if target in FLOORS:
            from harness.floor_app import MAX_ONGOING_REQUESTS, Floor

            # the floor's replica runs as the default config's does (on the replica's own event loop)
            floor = Floor.options(max_ongoing_requests=MAX_ONGOING_REQUESTS,
                                  ray_actor_options=deployment_options("config/serve.yaml")["ray_actor_options"]).bind(
                llm_base_url=llm_base_url, framing="token" if target == "floor_token" else "phrase")
            serve.run(floor, name=app, route_prefix=f"/{app}", blocking=False)
            wait_until(lambda: http_ok(f"{base}/healthz"), f"{base}/healthz", timeout_s=timeout_s)
            return Deployed(app, f"ws://127.0.0.1:{port}/{app}/llm-websocket",
                            lambda: serve_processes(app), teardown, http_base=base)

        from serve_app import CallGateway

        config_file = CALLRAY_TARGETS[target][0]
        args = callray_args(target, namespace=namespace, redis_url=redis_url, agent_file=agent_file,
                            webhook_key=webhook_key, archive=archive)
        if app != target:  # two deployments of one config side by side: each its own event stream
            args["events"]["stream"] = f"callray:{app}:events"
        settings = CallraySettings.parse(args, source=f"{config_file} (bench {target})")
        options = deployment_options(config_file)
        if code is not None:
            actor = options.setdefault("ray_actor_options", {})
            # a directory every node has (one machine): used in place, not uploaded
            actor["runtime_env"] = {**actor.get("runtime_env", {}), "working_dir": f"local://{code.resolve()}"}
        serve.run(CallGateway.options(**options).bind(settings), name=app, route_prefix=f"/{app}", blocking=False)
        wait_until(lambda: http_ok(f"{base}/healthz"), f"{base}/healthz", timeout_s=timeout_s)
        return Deployed(app, f"ws://127.0.0.1:{port}/{app}{settings.gateway.path_prefix}",
                        lambda: serve_processes(app, namespace), teardown,
                        holding=frozenset(p.strip() for p in settings.turns.holding_phrases), http_base=base)
    except Exception as exc:
        detail = _deploy_failure(app)
        teardown()
        if detail:
            raise RuntimeError(f"deploying {target} failed: {detail}") from exc
        raise
    except BaseException:
        teardown()
        raise


def _deploy_failure(app: str) -> str:
    """The last line of the error Serve recorded for ``app`` (e.g. the replica constructor's exception)."""
    from ray import serve

    try:
        status = serve.status().applications.get(app)
    except Exception:  # the status itself is best effort
        return ""
    if status is None:
        return ""
    messages = [d.message for d in status.deployments.values() if d.message] + [status.message]
    lines = [line.strip() for m in messages if m for line in m.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def ray_worker_niceness(app: str) -> int:
    """The niceness Ray gave the app's replica processes (Ray starts workers at nice 15)."""
    ps = psutil()
    for _, pid in serve_processes(app):
        with contextlib.suppress(ps.Error):
            return ps.Process(pid).nice()
    return 0


# ====================================================================== peers outside Ray


def start_baseline(procs: Processes, llm_base_url: str | None, nice: int) -> Deployed:
    port = free_port()
    argv = [sys.executable, "-m", "harness.baseline_server", "--port", str(port)]
    argv += ["--llm-base-url", llm_base_url] if llm_base_url else ["--echo"]
    proc = procs.start("baseline", argv, nice=nice, cwd=PROJECT_DIR,
                       env={**os.environ, "OPENAI_API_KEY": "baseline-no-key"})
    wait_until(lambda: port_open(port), f"baseline server on port {port}", proc, 30)
    return Deployed("baseline", f"ws://127.0.0.1:{port}/llm-websocket", lambda: [("baseline", proc.pid)],
                    lambda: procs.stop(proc))


def demo_python(checkout: Path, pinned: bool) -> Path:
    """The interpreter to run Retell's demo with: this one (current libraries), or, ``pinned``,
    the checkout's own venv with its requirements.txt installed."""
    if not pinned:
        return Path(sys.executable)
    for candidate in (checkout / ".venv" / "bin" / "python", checkout / "venv" / "bin" / "python"):
        if candidate.exists():
            return candidate
    raise RuntimeError(f"{checkout}/.venv does not exist: create it with `python -m venv {checkout}/.venv && "
                       f"{checkout}/.venv/bin/pip install -r {checkout}/requirements.txt`")


def check_demo_imports(python: Path) -> None:
    """The demo imports python-dotenv and retell-sdk: say which install is missing, by name."""
    probe = subprocess.run([str(python), "-c", "import dotenv, retell, fastapi, openai, uvicorn"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode:
        missing = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"Retell's demo cannot start on {python}: {missing} "
                           "(pip install -e '.[bench]' installs python-dotenv and retell-sdk)")


#: The demo's README step 2 ("fill out the API keys in .env"), done for the fake LLM.
DEMO_ENV = "OPENAI_API_KEY=demo-no-key\nOPENAI_ORGANIZATION_ID=org-bench\nRETELL_API_KEY=demo-no-key\n"


def start_retell_demo(procs: Processes, checkout: Path, llm_base_url: str, nice: int,
                      pinned: bool = False) -> Deployed:
    """Retell's public Python demo, unmodified, from a local checkout: its ``app`` is copied to
    the run's directory beside a ``.env`` filled as the demo's README asks (the demo loads it
    with override), and started as the README says (``uvicorn app.server:app``, without
    --reload). Its OpenAI client reaches the fake LLM through the SDK's ``OPENAI_BASE_URL``."""
    if not (checkout / "app" / "server.py").exists():
        raise RuntimeError(f"--retell-demo {checkout}: no app/server.py (a checkout of "
                           "RetellAI/retell-custom-llm-python-demo is expected)")
    python = demo_python(checkout, pinned)
    check_demo_imports(python)
    name = "retell_demo_pinned" if pinned else "retell_demo"
    run_dir = procs.log_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(checkout / "app", run_dir / "app", ignore=shutil.ignore_patterns("__pycache__"))
    (run_dir / ".env").write_text(DEMO_ENV)
    port = free_port()
    env = {**os.environ, "OPENAI_BASE_URL": llm_base_url, "PYTHONUNBUFFERED": "1"}
    proc = procs.start(name, [str(python), "-m", "uvicorn", "app.server:app", "--host", "127.0.0.1",
                              "--port", str(port), "--log-level", "warning"], nice=nice, cwd=run_dir, env=env)
    wait_until(lambda: port_open(port), f"Retell's demo on port {port}", proc, 60)
    return Deployed(name, f"ws://127.0.0.1:{port}/llm-websocket", lambda: [(name, proc.pid)],
                    lambda: procs.stop(proc), notes=[f"interpreter {python}"])
