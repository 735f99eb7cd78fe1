"""Shared fixtures: a private redis-server per test session, started and stopped by pid."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from callray.sim.local import RedisServer, free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def redis_server():
    """One appendonly redis-server for the whole session (tests use distinct keys)."""
    with tempfile.TemporaryDirectory(prefix="callray-redis-") as tmp:
        server = RedisServer(Path(tmp), appendonly=True)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


# --------------------------------------------------------------------------- PostgreSQL

#: The PostgreSQL a test session uses: the machine's own (.ci/run makes sure one runs on
#: 127.0.0.1:5432), or the server CALLRAY_TEST_DATABASE_URL names. Each session creates a
#: database of its own there and drops it at the end.
TEST_POSTGRES = os.environ.get("CALLRAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A fresh database on the session's PostgreSQL; its URL."""
    import asyncio
    import uuid

    import asyncpg

    name = f"callray_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        try:
            conn = await asyncpg.connect(TEST_POSTGRES, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            pytest.fail(f"PostgreSQL at {TEST_POSTGRES} is not reachable ({exc!r}): start it (.ci/run does) "
                        f"or set CALLRAY_TEST_DATABASE_URL")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        yield TEST_POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# --------------------------------------------------------------------------- Ray and Serve


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray for the session (never a running cluster), shut down at the end,
    behind the ingress CALLRAY_TEST_INGRESS names: ``haproxy`` (the shipped configs') unless
    it says ``proxy`` (Serve's Python proxy)."""
    import ray

    from callray.sim.local import serve_ingress_env

    tmp = tempfile.mkdtemp(prefix="cr-", dir="/tmp")
    env = {"RAY_AUTH_MODE": "disabled",
           **serve_ingress_env(TEST_INGRESS, Path(tmp) / "haproxy")}
    os.environ.update(env)  # the Ray processes ray.init starts read the ingress from their environment
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=tmp,
             runtime_env={"env_vars": env}, logging_level="warning")
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
            for path in [tmp, *ARCHIVE_DIRS]:
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


ARCHIVE_DIRS: list[str] = []  # removed when the session's Ray shuts down
#: The Serve ingress of the session's Ray (callray.sim.local.INGRESSES).
TEST_INGRESS = os.environ.get("CALLRAY_TEST_INGRESS", "haproxy")
WEBHOOK_KEY = "key_test_callray"
SOCKET_SECRET = "s3cret-path-token"
READ_TOKEN = "read-token-of-the-test-deployments"
ADMIN_TOKEN = "admin-token-of-the-test-deployments"


def deploy(name: str, args: dict, port: int, *, replicas: int = 1, env: dict[str, str] | None = None) -> str:
    """Deploy callray as application ``name`` under ``/name``; returns its WebSocket base URL.
    ``env`` is added to the replicas' environment (as a deployment's own environment would be)."""
    from ray import serve

    from harness.targets import deployment_options
    from serve_app import CallGateway, CallraySettings

    args.setdefault("gateway", {}).setdefault("read_token", READ_TOKEN)
    args["gateway"].setdefault("admin_token", ADMIN_TOKEN)
    args["gateway"]["ingress"] = TEST_INGRESS  # what the session's Ray runs (a config's value would only be logged)
    if "archive" not in args:
        args["archive"] = {"backend": "files", "dir": tempfile.mkdtemp(prefix=f"callray-archive-{name}-")}
        ARCHIVE_DIRS.append(args["archive"]["dir"])
    settings = CallraySettings.parse(args)
    actor = deployment_options("config/serve.yaml")["ray_actor_options"]  # the replicas run as shipped
    actor.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env or {})
    options: dict = {"num_replicas": replicas, "ray_actor_options": actor}
    app = CallGateway.options(**options).bind(settings)
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    deadline = time.monotonic() + 120
    import urllib.request

    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}/healthz", timeout=5) as r:
                if r.status == 200:
                    return f"ws://127.0.0.1:{port}/{name}{settings.gateway.path_prefix}"
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"application {name} did not become healthy")


@pytest.fixture(scope="session")
def single_app(serve_port) -> str:
    """The default single-server architecture (in-memory state, clinic flow agent)."""
    return deploy("single", {"hosts": {"namespace": "callray-test-single"}}, serve_port)


SHOP_TOOLS = (
    "def lookup_order(order_id: str) -> dict:\n"
    "    \"\"\"Find an order by its number.\"\"\"\n"
    "    return {\"order\": order_id, \"status\": \"shipped\"}\n"
)


def shop_agent_file(fake_llm, tmp_path_factory) -> str:
    """An LLM agent (model ``shop-model`` on the fake LLM) with a Python function tool beside it."""
    import yaml

    folder = tmp_path_factory.mktemp("shop-agent")
    (folder / "shop_tools.py").write_text(SHOP_TOOLS)
    (folder / "shop.yaml").write_text(yaml.safe_dump({
        "kind": "llm", "name": "shop", "system_prompt": "You are a shop assistant.",
        "providers": [{"base_url": fake_llm.base_url, "model": "shop-model", "api_key_env": "CALLRAY_TEST_NO_KEY",
                       "api_key_fallback": "fake-key"}],
        "tools": [{"function": "shop_tools:lookup_order"}]}))
    return str(folder / "shop.yaml")


@pytest.fixture(scope="session")
def durable_app(serve_port, redis_server, fake_llm, tmp_path_factory) -> str:
    """The distributed architecture: Redis state and cache, two gateway replicas; the clinic
    agent, (at ``/echo``) the Python agent of examples/echo loaded from its folder, and (at
    ``/shop``) an LLM agent with a Python function tool."""
    return deploy("durable", {
        "architecture": "distributed",
        "agents": {"default": "clinic", "files": {"clinic": "config/agents/clinic.yaml",
                                                  "echo": "examples/echo/echo.yaml",
                                                  "shop": shop_agent_file(fake_llm, tmp_path_factory)}},
        "redis": {"url": redis_server.url}, "state": {"backend": "redis"},
        "cache": {"backend": "redis"},
        "hosts": {"namespace": "callray-test-durable"},
        "gateway": {"activate_timeout_s": 60},
        "webhook": {"api_key": WEBHOOK_KEY},
    }, serve_port, replicas=2)


@pytest.fixture(scope="session")
def dedicated_app(serve_port, fake_llm, tmp_path_factory) -> str:
    """Dedicated placement: one actor per call from a warm pool of two; the clinic agent and
    (at ``/assistant``) the LLM agent; the greeting waits for call_details (up to 2 s), which
    the test client sends only when a test asks."""
    return deploy("dedicated", {
        "agents": {"default": "clinic", "files": {"clinic": "config/agents/clinic.yaml",
                                                  "assistant": llm_agent_file(fake_llm, tmp_path_factory)}},
        "hosts": {"placement": "dedicated", "warm_pool": 2, "namespace": "callray-test-dedicated"},
        "turns": {"greeting_wait_ms": 2000},
        "webhook": {"api_key": WEBHOOK_KEY},
    }, serve_port)


@pytest.fixture(scope="session")
def events_app(serve_port, redis_server, postgres_url) -> str:
    """The event-driven architecture: Redis Streams feeding analytics, archive and escalation."""
    return deploy("events", {
        "architecture": "event_driven",
        "redis": {"url": redis_server.url}, "state": {"backend": "redis"},
        "cache": {"backend": "redis"},
        "hosts": {"namespace": "callray-test-events"},
        "events": {
            "backend": "redis_streams", "stream": "callray:test-events", "claim_idle_ms": 1000,
            "escalation": {"keywords": ["lawyer"], "transfer_number": "+15550009999",
                           "handoff_line": "Let me get a colleague for you.", "max_fallback_turns": 0},
        },
        "archive": {"backend": "postgres", "database_url": postgres_url},  # as the shipped config keeps records
        "webhook": {"api_key": WEBHOOK_KEY},
        # A balancer in front (its X-Forwarded-For believed from loopback, where Serve's ingress
        # connects from) and callers from 127.0.0.0/8 or 203.0.113.0/24 only.
        "gateway": {"guard": {"secret": SOCKET_SECRET, "secret_in": "either", "trusted_proxies": ["127.0.0.0/8"],
                              "allow_ips": ["127.0.0.0/8", "203.0.113.0/24"]}},
    }, serve_port) + f"/{SOCKET_SECRET}"


@pytest.fixture(scope="session")
def fake_llm():
    """A local OpenAI-compatible streaming server (the paid API is unreachable here)."""
    from callray.sim.fake_llm import FakeLLMSettings, running_fake_llm

    with running_fake_llm(FakeLLMSettings(ttft_ms=50, tokens_per_s=200, seed=1)) as server:
        yield server


@pytest.fixture(scope="session")
def default_app(serve_port, fake_llm) -> str:
    """config/serve.yaml as shipped, its replicas given only OPENAI_BASE_URL (the fake LLM)."""
    import yaml

    from callray.settings import PROJECT_DIR

    args = yaml.safe_load((PROJECT_DIR / "config/serve.yaml").read_text())["applications"][0]["args"]
    args["hosts"]["namespace"] = "callray-test-default"
    args.pop("archive")
    return deploy("default", args, serve_port, env={"OPENAI_BASE_URL": fake_llm.base_url, "OPENAI_API_KEY": ""})


def llm_agent_file(fake_llm, tmp_path_factory) -> str:
    """The shipped LLM agent (config/agents/assistant_llm.yaml) on the fake LLM, without tools."""
    import yaml

    from callray.settings import PROJECT_DIR

    data = yaml.safe_load((PROJECT_DIR / "config/agents/assistant_llm.yaml").read_text())
    data["providers"] = [{"base_url": fake_llm.base_url, "model": "gpt-4o-mini", "api_key_env": "CALLRAY_TEST_NO_KEY",
                          "api_key_fallback": "fake-key"}]
    data["tools"] = []
    agent_file = tmp_path_factory.mktemp("agents") / "assistant.yaml"
    agent_file.write_text(yaml.safe_dump(data))
    return str(agent_file)


@pytest.fixture(scope="session")
def llm_app(serve_port, fake_llm, tmp_path_factory) -> str:
    """Two agents in one deployment: the clinic flow agent and an LLM agent on the fake LLM,
    routed by path or by Retell agent_id; the greeting waits for call_details."""
    return deploy("llm", {
        "agents": {"default": "clinic", "files": {"clinic": "config/agents/clinic.yaml",
                                                  "assistant": llm_agent_file(fake_llm, tmp_path_factory)},
                   "by_retell_agent_id": {"agent_dental_1": "assistant"}},
        "turns": {"greeting_wait_ms": 1000, "latency_budget_ms": 2000},
        "hosts": {"namespace": "callray-test-llm"},
    }, serve_port)
