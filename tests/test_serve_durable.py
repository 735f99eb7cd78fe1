"""The distributed architecture: calls survive hosts, gateway replicas and Redis restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from callray.placement import host_names, place
from tests.retell_client import RetellClient
from tests.test_serve_single import new_call_id

pytestmark = pytest.mark.ray


async def start_call(url: str, name: str) -> RetellClient:
    client = await RetellClient(url, new_call_id()).connect()
    await client.complete(0)
    assert name in await client.turn(1, f"Hi, my name is {name}")
    return client


async def test_host_killed_mid_call_resumes_with_full_state(durable_app, ray_cluster):
    import ray

    client = await start_call(durable_app, "Maria")
    try:
        host = ray.get_actor(place(client.call_id, host_names("durable", 2)), namespace="callray-test-durable")
        ray.kill(host, no_restart=False)
        answer = await client.turn(2, "I'd like to book an appointment")
        assert "Maria" in answer  # the flow agent still knows the caller's name
        assert len(client.responses(0)) == 1
    finally:
        await client.close()


def gateway_replica_pids(app: str) -> list[int]:
    """The process ids of an application's gateway replicas (asked of the replica actors)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"{app}#CallGateway" in a["name"]]
    handles = [ray.get_actor(name, namespace="serve") for name in names]
    return ray.get([h.__ray_call__.remote(lambda _self: os.getpid()) for h in handles])


async def reconnect(url: str, call_id: str, attempts: int = 40) -> RetellClient:
    """Retell reconnects to the same URL with the same call_id until a replica accepts."""
    for _ in range(attempts):
        try:
            client = await RetellClient(url, call_id).connect()
            await client.complete(0, timeout=10)
            return client
        except (OSError, ConnectionError, asyncio.TimeoutError, Exception):
            await asyncio.sleep(0.5)
    raise AssertionError(f"call {call_id} could not reconnect")


async def test_gateway_replica_killed_mid_call_reconnects_and_continues(durable_app):
    clients = [await start_call(durable_app, name) for name in ("Nadia", "Omar", "Priya", "Quinn")]
    pids = gateway_replica_pids("durable")
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(c._reader.done() for c in clients):
        await asyncio.sleep(0.1)
    dropped = [c for c in clients if c._reader.done()]
    assert dropped, "no call was on the killed replica"
    for old in dropped:
        client = await reconnect(durable_app, old.call_id)
        try:
            assert client.responses(0)[0]["content"] == ""  # response 0 is not spoken again
            client.transcript = old.transcript
            name = old.transcript[0]["content"].split()[-1]
            assert name in await client.turn(5, "I'd like to book an appointment")
        finally:
            await client.close()
    for c in clients:
        if not c._reader.done():
            await c.close()


async def test_newest_socket_wins(durable_app):
    first = await start_call(durable_app, "Rosa")
    second = await RetellClient(durable_app, first.call_id).connect()
    try:
        assert await second.complete(0) == ""
        with pytest.raises(ConnectionError):
            await first.wait_for(lambda f: False, timeout=15)
        assert first.close_code == 4001
        frames_on_first = len(first.frames)
        second.transcript = list(first.transcript)
        assert "Rosa" in await second.turn(2, "I'd like to book an appointment")
        assert len(first.frames) == frames_on_first
    finally:
        await second.close()


async def test_redis_restart_mid_call_loses_nothing(durable_app, redis_server, ray_cluster):
    import ray

    client = await start_call(durable_app, "Sven")
    try:
        redis_server.stop()
        try:
            assert (await client.turn(2, "What are your hours?")).strip()  # still talking without Redis
            assert "Sven" in await client.turn(3, "I'd like to book an appointment")
        finally:
            redis_server.start()
        await asyncio.sleep(3)  # the write-behind store catches up once Redis is back
        host = ray.get_actor(place(client.call_id, host_names("durable", 2)), namespace="callray-test-durable")
        stats = await host.stats.remote()
        assert stats["active_calls"] >= 1
        ray.kill(host, no_restart=False)  # forget the memory copy: what Redis holds must be complete
        assert "Tuesday" in await client.turn(4, "Tuesday please")
        assert "Sven" in await client.turn(5, "I'd like to book an appointment")
    finally:
        await client.close()


async def test_cache_is_shared_across_hosts(durable_app, ray_cluster):
    import ray

    for _ in range(2):
        client = await RetellClient(durable_app, new_call_id()).connect()
        try:
            await client.complete(0)
            assert "Monday" in await client.turn(1, "What are your opening hours?")
        finally:
            await client.close()
    hits = 0
    for name in host_names("durable", 2):
        stats = await ray.get_actor(name, namespace="callray-test-durable").stats.remote()
        hits += stats["cache"].get("clinic", {}).get("hits", 0)
    assert hits >= 2  # pre-cached at start: both calls were served from Redis


async def test_dedicated_placement_full_call_and_pool_refills(dedicated_app, ray_cluster):
    import ray

    pool = ray.get_actor("dedicated-pool", namespace="callray-test-dedicated")
    client = await RetellClient(dedicated_app, new_call_id()).connect()
    try:
        assert "Maple Street" in await client.complete(0)
        assert "Uma" in await client.turn(1, "Hi, my name is Uma")
        assert (await pool.stats.remote())["assigned"] == 1
        await client.turn(2, "Goodbye")
        assert any(f.get("end_call") for f in client.responses(2))
    finally:
        await client.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = await pool.stats.remote()
        if stats["assigned"] == 0 and stats["idle"] == 2 and stats["started"] >= 3:
            break
        await asyncio.sleep(0.5)
    assert stats == {"idle": 2, "assigned": 0, "started": stats["started"]} and stats["started"] >= 3
