"""Scaling by editing the config and redeploying in place, with live calls on the gateway.

Deployed as ``serve deploy`` / ``serve run config.yaml`` do (a declarative Serve config handed
to the controller), because that is the path that updates in place: in Ray Serve 2.60 a
Python ``serve.run`` of an application gives every deployment a new random version, so even a
``num_replicas``-only change there replaces every replica. In the config path a change to
``num_replicas``, or to ``autoscaling_config`` while autoscaling stays on, keeps the running
replicas and their sockets; switching between the two modes changes the application's code
version (Serve hashes the deployments' autoscaling policies into it) and replaces them.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from callray.sim.client import RetellClient
from harness.targets import deployment_options
from tests.test_serve_durable import reconnect, start_call

pytestmark = pytest.mark.ray

NAMESPACE = "callray-test-scale"
GRACE_S = 2.0  # graceful_shutdown_timeout_s: a removed replica's sockets are cut this soon


class ScaleApp:
    """One callray application (durable architecture) deployed from a Serve config."""

    def __init__(self, name: str, port: int, args: dict[str, Any]):
        self.name, self.port, self.args = name, port, args
        self.url = f"ws://127.0.0.1:{port}/{name}/llm-websocket"

    def apply(self, **deployment: Any) -> None:
        """Deploy (or redeploy) with ``deployment`` as the CallGateway's options; same args."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        options = {"name": "CallGateway", "max_ongoing_requests": 1000, "graceful_shutdown_timeout_s": GRACE_S,
                   "ray_actor_options": deployment_options("config/serve.yaml")["ray_actor_options"], **deployment}
        config = ServeDeploySchema.model_validate({"applications": [{
            "name": self.name, "route_prefix": f"/{self.name}", "import_path": "serve_app:build_app",
            "args": self.args, "deployments": [options]}]})
        _get_global_client().deploy_apps(config)

    def replica_states(self) -> dict[str, int]:
        from ray import serve

        app = serve.status().applications.get(self.name)
        if app is None or "CallGateway" not in app.deployments:
            return {}
        return {getattr(k, "value", str(k)): v for k, v in app.deployments["CallGateway"].replica_states.items() if v}

    def wait_running(self, replicas: int, timeout: float = 120) -> None:
        """Until exactly ``replicas`` replicas run (none starting or stopping) and /healthz answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.replica_states() == {"RUNNING": replicas}:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/{self.name}/healthz", timeout=5) as r:
                        if r.status == 200:
                            return
                except OSError:
                    pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name}: wanted {replicas} running replicas, have {self.replica_states()}")

    def replica_ids(self) -> set[str]:
        """The Serve replica actors of the gateway (their names carry the replica id)."""
        import ray

        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{self.name}#CallGateway#")}


@pytest.fixture
def make_app(serve_port, redis_server, tmp_path) -> Iterator[Any]:
    """Build ScaleApps for a test; every one is deleted afterwards."""
    from ray import serve

    apps: list[ScaleApp] = []

    def make(name: str) -> ScaleApp:
        app = ScaleApp(name, serve_port, {
            "architecture": "distributed",
            "redis": {"url": redis_server.url}, "state": {"backend": "redis"},
            "cache": {"backend": "redis"},
            "hosts": {"namespace": NAMESPACE},
            "gateway": {"activate_timeout_s": 60},
            "archive": {"dir": str(tmp_path / f"archive-{name}")},
        })
        apps.append(app)
        return app

    yield make
    for app in apps:
        serve.delete(app.name)


def greetings_and_configs(client: RetellClient) -> tuple[int, int]:
    return len(client.responses(0)), sum(1 for f in client.frames if f.get("response_type") == "config")


async def still_on_same_socket(clients: list[RetellClient], response_id: int) -> None:
    """Every socket answers its next turn itself: no reconnect, no second config or greeting."""
    before = [greetings_and_configs(c) for c in clients]
    answers = await asyncio.gather(*(c.turn(response_id, "What are your opening hours?") for c in clients))
    for client, answer, seen in zip(clients, answers, before):
        assert "Monday" in answer, f"call {client.call_id}: {answer!r}"
        assert not client.closed, f"call {client.call_id}: socket closed"
        assert greetings_and_configs(client) == seen == (1, 1), f"call {client.call_id}: greeted or configured again"


async def resumes_after_reconnect(app: ScaleApp, old: RetellClient, response_id: int) -> None:
    """Retell reconnects with the same call_id; the call goes on with its history."""
    client = await reconnect(app.url, old.call_id)
    try:
        assert client.responses(0)[0]["content"] == ""  # no second greeting
        client.transcript = list(old.transcript)
        name = old.transcript[0]["content"].split()[-1]
        assert name in await client.turn(response_id, "I'd like to book an appointment")
    finally:
        await client.close()


async def wait_for_drops(clients: list[RetellClient], timeout: float = 60) -> list[RetellClient]:
    """The calls whose socket the server closed; waits for the first, then a moment for the rest."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(c.closed for c in clients):
        await asyncio.sleep(0.2)
    await asyncio.sleep(GRACE_S + 1)
    return [c for c in clients if c.closed]


async def open_until_one_lands_on(app: ScaleApp, replicas: set[str], clients: list[RetellClient]) -> None:
    """Open calls (three, then a few more at most) until one lives on one of ``replicas`` (Serve
    replica actor names): behind HAProxy a new replica gets sockets only once HAProxy's health
    checks marked it up, so three calls right after a scale-up may all land on the old one."""
    from callray.stores.redis import RedisStateStore
    from callray.stores.redis_client import redis_client

    ids = {name.rsplit("#", 1)[1] for name in replicas}
    store = RedisStateStore(redis_client(app.args["redis"]["url"]))
    try:
        for i in range(12):
            client = await start_call(app.url, ("Dev", "Eli", "Fay")[i % 3])
            clients.append(client)
            owner = await store.owner(client.call_id)
            if i >= 2 and owner is not None and any(f"-{rid}-" in owner[0] for rid in ids):
                return
            if i >= 2:
                await asyncio.sleep(0.5)
    finally:
        await store.client.aclose()
    raise AssertionError(f"12 new calls and none on the new replica {ids}")


async def close_all(clients: list[RetellClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients if not c.closed), return_exceptions=True)


async def test_num_replicas_up_and_down_in_place(make_app):
    app = make_app("scale")
    app.apply(num_replicas=1)
    app.wait_running(1)
    first = app.replica_ids()
    clients = [await start_call(app.url, name) for name in ("Ana", "Ben", "Cleo")]
    try:
        app.apply(num_replicas=2)
        app.wait_running(2)
        assert first < app.replica_ids(), "the running replica was replaced: not an in-place update"
        await still_on_same_socket(clients, 2)
        both = app.replica_ids()
        await open_until_one_lands_on(app, both - first, clients)

        app.apply(num_replicas=1)
        app.wait_running(1)
        assert app.replica_ids() < both, "scaling down replaced the surviving replica"
        dropped = await wait_for_drops(clients)
        assert dropped, "no call was on the removed replica"
        kept = [c for c in clients if c not in dropped]
        assert kept, "every call was cut: the surviving replica was restarted"
        await still_on_same_socket(kept, 3)
        for old in dropped:
            assert old.close_code != 1000  # an abnormal close: Retell reconnects
            await resumes_after_reconnect(app, old, 4)
    finally:
        await close_all(clients)


async def test_autoscaling_config_change_in_place(make_app):
    app = make_app("scale-auto")
    autoscaling = {"target_ongoing_requests": 100, "upscale_delay_s": 1, "downscale_delay_s": 600}
    app.apply(autoscaling_config={"min_replicas": 1, "max_replicas": 1, **autoscaling})
    app.wait_running(1)
    first = app.replica_ids()
    clients = [await start_call(app.url, name) for name in ("Gus", "Hana")]
    try:
        app.apply(autoscaling_config={"min_replicas": 2, "max_replicas": 3, **autoscaling})
        app.wait_running(2)
        assert first < app.replica_ids(), "the running replica was replaced: not an in-place update"
        await still_on_same_socket(clients, 2)
        clients += [await start_call(app.url, name) for name in ("Ivy", "Jon")]
        both = app.replica_ids()

        app.apply(autoscaling_config={"min_replicas": 1, "max_replicas": 3, **autoscaling})
        await asyncio.sleep(5)  # the controller applies it; downscale_delay_s keeps both replicas
        app.wait_running(2)
        assert app.replica_ids() == both
        await still_on_same_socket(clients, 3)
    finally:
        await close_all(clients)


async def test_switching_to_autoscaling_replaces_replicas_and_calls_resume(make_app):
    """Ray Serve 2.60: num_replicas -> autoscaling_config changes the app's code version, so
    every replica is replaced as in an upgrade; the calls reconnect and carry on."""
    app = make_app("scale-switch")
    app.apply(num_replicas=1)
    app.wait_running(1)
    first = app.replica_ids()
    clients = [await start_call(app.url, name) for name in ("Kai", "Lena")]
    try:
        app.apply(autoscaling_config={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 100})
        dropped = await wait_for_drops(clients)
        app.wait_running(1)
        assert not first & app.replica_ids(), "replica kept: Serve now switches modes in place (update the docs)"
        assert dropped == clients
        for old in dropped:
            await resumes_after_reconnect(app, old, 2)
    finally:
        await close_all(clients)
