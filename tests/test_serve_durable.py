"""The distributed architecture: calls survive gateway replicas and Redis restarts, move between
replicas under an owner epoch, and commands reach them wherever they live."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from callray.sim.client import RetellClient
from tests.test_serve_single import new_call_id

pytestmark = pytest.mark.ray


async def start_call(url: str, name: str) -> RetellClient:
    client = await RetellClient(url, new_call_id()).connect()
    await client.complete(0)
    assert name in await client.turn(1, f"Hi, my name is {name}")
    return client


def gateway_replica_pids(app: str) -> list[int]:
    """The process ids of an application's gateway replicas (asked of the replica actors)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"{app}#CallGateway" in a["name"]]
    handles = [ray.get_actor(name, namespace="serve") for name in names]
    return ray.get([h.__ray_call__.remote(lambda _self: os.getpid()) for h in handles], timeout=10)


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
    while time.monotonic() < deadline and not any(c.closed for c in clients):
        await asyncio.sleep(0.1)
    dropped = [c for c in clients if c.closed]
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
        if not c.closed:
            await c.close()


async def test_newest_socket_wins(durable_app, redis_server):
    first = await start_call(durable_app, "Rosa")  # the reconnect follows at once: turn 1's save may be in flight
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


async def test_redis_restart_mid_call_loses_nothing(durable_app, redis_server):
    client = await start_call(durable_app, "Sven")
    try:
        redis_server.stop()
        try:
            assert (await client.turn(2, "What are your hours?")).strip()  # still talking without Redis
            assert "Sven" in await client.turn(3, "I'd like to book an appointment")
        finally:
            redis_server.start()
        stored = await eventually_stored(redis_server.url, client.call_id, lambda s: len(s.turns) >= 3)
        assert [t.response_id for t in stored.turns] == [1, 2, 3]  # the write-behind store caught up
        assert stored.agent_state.get("pending", {}).get("slot") == "day"
        assert "Tuesday" in await client.turn(4, "Tuesday please")
    finally:
        await client.close()


async def eventually_stored(redis_url: str, call_id: str, done, timeout: float = 20.0):
    """The call's state as Redis holds it, once ``done(state)``."""
    from callray.stores.redis import RedisStateStore
    from callray.stores.redis_client import connect_redis

    client = await connect_redis(redis_url)
    try:
        store = RedisStateStore(client)
        deadline = time.monotonic() + timeout
        while True:
            state = await store.load(call_id)
            if (state is not None and done(state)) or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def owner_of(redis_url: str, call_id: str) -> tuple[str, int] | None:
    from callray.stores.redis import RedisStateStore
    from callray.stores.redis_client import connect_redis

    client = await connect_redis(redis_url)
    try:
        return await RedisStateStore(client).owner(call_id)
    finally:
        await client.aclose()


async def replicas_running(app: str, count: int, timeout: float = 120.0) -> None:
    """Until ``count`` replicas of the app's gateway answer (another test may have killed one:
    Serve reports a killed replica RUNNING until its health check fails)."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = serve.status().applications[app].deployments["CallGateway"].replica_states
        if {getattr(k, "value", str(k)): v for k, v in states.items() if v} == {"RUNNING": count}:
            try:
                if len(set(await asyncio.to_thread(gateway_replica_pids, app))) == count:
                    return
            except Exception:  # a dead replica's actor does not answer
                pass
        await asyncio.sleep(0.5)
    raise AssertionError(f"{app}: {count} replicas not running within {timeout} s")


async def reconnected_on_the_other_replica(url: str, redis_url: str, start) -> tuple[RetellClient, RetellClient,
                                                                                    tuple, tuple]:
    """A call ``start()`` opened, and a second socket of it that Serve placed on the other
    replica (Serve picks the replica: retried until it does), with the owner before and after."""
    for _ in range(12):
        first = await start()  # no wait for its last checkpoint: the old replica hands the call over
        owner = await owner_of(redis_url, first.call_id)
        second = await RetellClient(url, first.call_id).connect()
        assert await second.complete(0) == ""  # never greeted twice
        taken = await owner_of(redis_url, first.call_id)
        if taken[0] != owner[0]:
            return first, second, owner, taken
        await second.close()
        await first.close()
    raise AssertionError("twelve reconnects all landed on the replica that held the call")


async def test_a_reconnect_landing_on_the_other_replica_takes_the_call_over(durable_app, redis_server):
    """The old socket is closed with 4001, each request is answered once, nobody is greeted twice."""
    await replicas_running("durable", 2)
    first, second, owner, taken = await reconnected_on_the_other_replica(
        durable_app, redis_server.url, lambda: start_call(durable_app, "Tessa"))
    try:
        assert taken[1] > owner[1]  # the new activation holds a newer epoch
        with pytest.raises(ConnectionError):
            await first.wait_for(lambda f: False, timeout=15)
        assert first.close_code == 4001
        second.transcript = list(first.transcript)
        assert "Tessa" in await second.turn(2, "I'd like to book an appointment")  # the history moved along
        for client in (first, second):
            completes = [f["response_id"] for f in client.frames if f.get("content_complete")]
            assert len(completes) == len(set(completes))
        assert len(first.responses(0)) == 1 and "Maple Street" in first.responses(0)[0]["content"]
    finally:
        await second.close()


async def test_commands_reach_a_call_owned_by_another_replica(durable_app, redis_server):
    """A background actor (here the test process) and a webhook on either replica reach the
    replica that owns the call, through the owner recorded in Redis and its command channel."""
    from callray.commands import Say
    from callray.directory import CallDirectory
    from callray.stores.redis import RedisStateStore
    from callray.stores.redis_client import connect_redis
    from callray.webhook import sign
    from tests.conftest import WEBHOOK_KEY
    from tests.test_serve_events import http_base, post_webhook

    client = await start_call(durable_app, "Umar")
    redis = await connect_redis(redis_server.url)
    try:
        directory = CallDirectory("test-process", store=RedisStateStore(redis), redis=redis)
        assert await directory.send(client.call_id, Say(line="A colleague will join shortly."))
        said = await client.wait_for(lambda f: f.get("response_type") == "agent_interrupt")
        assert said["content"] == "A colleague will join shortly."
        raw = ('{"event":"call_ended","call":{"call_id":"%s","disconnection_reason":"user_hangup"}}'
               % client.call_id).encode()
        status = await asyncio.to_thread(post_webhook, http_base(durable_app), raw, sign(raw, WEBHOOK_KEY))
        assert status == 204
        stored = await eventually_stored(redis_server.url, client.call_id, lambda s: s.ended)
        assert stored.ended and stored.call["disconnection_reason"] == "user_hangup"
        assert not await directory.send("no-such-call", Say(line="x"))
    finally:
        await redis.aclose()
        await client.close()


async def test_dedicated_host_killed_mid_call_keeps_the_socket_and_answers(dedicated_app, ray_cluster):
    import ray

    client = await RetellClient(dedicated_app, new_call_id()).connect()
    try:
        await client.complete(0)
        await client.turn(1, "What are your hours?")
        pool = ray.get_actor("dedicated-pool", namespace="callray-test-dedicated")
        host = ray.get_actor(await pool.assigned_to.remote(client.call_id), namespace="callray-test-dedicated")
        old_pid = await host.pid.remote()
        ray.kill(host, no_restart=False)
        await client.send({"interaction_type": "ping_pong", "timestamp": 42})
        await client.wait_for(lambda f: f.get("timestamp") == 42)  # the gateway answers while the host is down
        assert (await client.turn(2, "Where are you located?")).strip() and client.close_code is None
        # this driver's handle learns of the restart in its own time (under load, after the call's
        # gateway did): until then Ray says the actor "is restarting", which may be retried
        deadline = time.monotonic() + 30
        while True:
            try:
                new_pid = await host.pid.remote()
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert new_pid != old_pid
        # its in-memory state died with the actor (docs/operations.md); the call goes on regardless
        assert (await client.turn(3, "Do you take insurance?")).strip()
        assert [f["response_id"] for f in client.frames if f.get("response_id") == 0] == [0]
    finally:
        await client.close()


async def test_dedicated_host_killed_before_the_greeting_still_greets_the_socket(dedicated_app, ray_cluster):
    """Issue 11 §4: the greeting waits for call_details; the call's actor dies meanwhile. The
    socket never heard response 0, so the restarted actor must send it (once). The caller does
    not send call_details, so the greeting waits its full second: answered at once, it raced the
    kill (and won behind HAProxy, whose sockets open faster)."""
    import ray

    client = await RetellClient(dedicated_app, new_call_id(), call_details=False).connect()
    try:
        pool = ray.get_actor("dedicated-pool", namespace="callray-test-dedicated")
        deadline = time.monotonic() + 10
        while (name := await pool.assigned_to.remote(client.call_id)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert name is not None and not client.responses(0)  # activated, greeting still waiting
        ray.kill(ray.get_actor(name, namespace="callray-test-dedicated"), no_restart=False)
        assert "Maple Street" in await client.complete(0, timeout=30)
        assert len(client.responses(0)) == 1 and client.close_code is None
        assert (await client.turn(1, "What are your hours?")).strip()
    finally:
        await client.close()


STORY = "The first part goes here. The second part follows it. The third part comes next. The last part ends it."


async def test_dedicated_host_killed_mid_answer_never_repeats_what_the_caller_heard(dedicated_app, fake_llm,
                                                                                  ray_cluster):
    """Issue 11 §5: the call's actor dies while an LLM answer streams. The caller heard its
    beginning, so the answer is closed there (Retell asks again) rather than regenerated under
    the same id, which Retell would append to what was already spoken."""
    import ray
    from callray.sim.fake_llm import ScriptedReply

    fake_llm.state.responder = lambda body: (ScriptedReply(text=STORY, tokens_per_s=15)
                                             if "story" in str(body["messages"][-1]) else None)
    client = await RetellClient(dedicated_app + "/assistant", new_call_id()).connect()
    try:
        await client.send({"interaction_type": "call_details", "call": {"call_id": client.call_id}})
        await client.complete(0)
        await client.say(1, "Please tell me a story")
        await client.wait_for(lambda f: f.get("response_id") == 1 and f.get("content"))  # the caller hears it begin
        pool = ray.get_actor("dedicated-pool", namespace="callray-test-dedicated")
        ray.kill(ray.get_actor(await pool.assigned_to.remote(client.call_id), namespace="callray-test-dedicated"),
                 no_restart=False)
        heard = await client.complete(1, timeout=30)
        assert heard and STORY.startswith(heard.strip()) and heard.strip() != STORY  # cut short, nothing twice
        assert len([f for f in client.responses(1) if f.get("content_complete")]) == 1
        assert (await client.turn(2, "What are your hours?")).strip()
    finally:
        fake_llm.state.responder = None
        await client.close()


async def test_cache_is_shared_across_replicas(durable_app):
    """Pre-cached at start into Redis: every call, on either replica, is answered from the cache."""
    from tests.test_serve_events import eventually, get, http_base

    base, call_ids = http_base(durable_app), []
    for _ in range(4):
        client = await RetellClient(durable_app, new_call_id()).connect()
        try:
            await client.complete(0)
            assert "Monday" in await client.turn(1, "What are your opening hours?")
            call_ids.append(client.call_id)
        finally:
            await client.close()
    for call_id in call_ids:
        status, record = await eventually(
            lambda: (r := get(f"{base}/calls/{call_id}"))[0] == 200 and r[1].get("turns") and r) or (0, {})
        assert status == 200 and record["turns"][0]["cache_hit"] is True


async def test_dedicated_placement_full_call_and_pool_refills(dedicated_app, ray_cluster):
    import ray

    pool = ray.get_actor("dedicated-pool", namespace="callray-test-dedicated")
    before = await pool.stats.remote()  # another test's call may still hold its actor
    client = await RetellClient(dedicated_app, new_call_id()).connect()
    try:
        assert "Maple Street" in await client.complete(0)
        assert "Uma" in await client.turn(1, "Hi, my name is Uma")
        assert (await pool.stats.remote())["assigned"] == before["assigned"] + 1
        assert await pool.assigned_to.remote(client.call_id)
        await client.turn(2, "Goodbye")
        assert any(f.get("end_call") for f in client.responses(2))
    finally:
        await client.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = await pool.stats.remote()
        if stats["assigned"] == before["assigned"] and stats["idle"] == 2 and stats["started"] > before["started"]:
            break
        await asyncio.sleep(0.5)
    assert stats["assigned"] == before["assigned"] and stats["idle"] == 2 and stats["started"] > before["started"]
    assert await pool.assigned_to.remote(client.call_id) is None  # its actor went away with the call


async def test_a_redeploy_gives_new_calls_new_settings_and_leaves_live_calls_where_they_are(ray_cluster):
    """Issue 11 §7 for dedicated placement: the pool outlives a redeploy. New settings reach
    every call activated afterwards; a live call keeps its actor (its agent and stores)."""
    import ray

    from actors.placement import DedicatedPool
    from callray.settings import CallraySettings

    old = CallraySettings.parse({"hosts": {"placement": "dedicated", "warm_pool": 1,
                                           "namespace": "callray-test-redeploy"}})
    new = old.model_copy(update={"turns": old.turns.model_copy(update={"latency_budget_ms": 650.0})}, deep=True)
    pool = DedicatedPool.options(name="redeploy-pool", namespace="callray-test-redeploy").remote(old, "redeploy")

    def budget(handle):
        return handle.__ray_call__.remote(lambda actor: actor.settings.turns.latency_budget_ms)

    try:
        await pool.fill.remote()
        live = await pool.acquire.remote("call-live")
        await pool.fill.remote()  # a warm actor with the old settings
        assert await pool.configure.remote(new) == 1 and await pool.configure.remote(new) == 0
        await pool.fill.remote()
        fresh = await pool.acquire.remote("call-new")
        assert await budget(live) == old.turns.latency_budget_ms and await budget(fresh) == 650.0
        assert await pool.assigned_to.remote("call-live") is not None
    finally:
        await pool.fill.remote()
        idle = await pool.__ray_call__.remote(lambda actor: [h for _, h in actor.idle])
        for handle in idle:
            ray.kill(handle, no_restart=True)
        for call_id in ("call-live", "call-new"):
            await pool.release.remote(call_id)
        ray.kill(pool, no_restart=True)


async def test_a_webhook_for_a_call_without_an_actor_does_not_start_one(dedicated_app, ray_cluster):
    """Dedicated placement: a signed webhook for any call id used to acquire a call actor
    (~150 MB) that nobody released."""
    import json
    import ray

    from callray.webhook import sign
    from tests.conftest import WEBHOOK_KEY
    from tests.test_serve_events import post_webhook

    pool = ray.get_actor("dedicated-pool", namespace="callray-test-dedicated")
    before = await pool.stats.remote()
    base = dedicated_app.rsplit("/llm-websocket", 1)[0].replace("ws://", "http://")
    for i in range(3):
        body = json.dumps({"event": "call_ended", "call": {"call_id": f"never-here-{i}-{new_call_id()}",
                                                           "disconnection_reason": "user_hangup"}}).encode()
        assert await asyncio.to_thread(post_webhook, base, body, sign(body, WEBHOOK_KEY)) == 204
    after = await pool.stats.remote()
    assert after["assigned"] == before["assigned"] and after["started"] == before["started"]
