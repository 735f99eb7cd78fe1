"""A consumer actor whose start fails half-way consumes once a later start succeeds; it runs
behind the calls (Linux's SCHED_IDLE)."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from callray.events import CallTurn
from callray.settings import CallraySettings
from callray.events.redis_streams import RedisStreamBus
from callray.stores.redis_client import redis_client

pytestmark = pytest.mark.ray


async def test_an_analytics_actor_whose_replay_failed_consumes_after_the_next_start(ray_cluster, redis_server):
    """Before, the consumer was kept before its replay ran: a failed replay left an actor whose
    every later start returned early and which never consumed again."""
    from actors.consumers import EventConsumer

    ray = ray_cluster
    stream = f"callray:test-replay-{uuid.uuid4().hex[:8]}"
    client = redis_client(redis_server.url)
    await client.set(stream, "not a stream")  # the replay's XRANGE fails with WRONGTYPE
    settings = CallraySettings(redis={"url": redis_server.url}, state={"backend": "redis"},
                               events={"backend": "redis_streams", "stream": stream}, archive={"backend": "none"})
    actor = EventConsumer.options(namespace="callray-test-replay").remote(settings, "replay", "analytics")
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="WRONGTYPE"):
            await actor.start.remote()
        await client.delete(stream)
        assert await actor.start.remote() == "replay-analytics"
        pid = ray._private.state.actors()[actor._actor_id.hex()]["Pid"]
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        assert {os.sched_getscheduler(tid) for tid in threads} == {os.SCHED_IDLE}  # behind the calls, every thread
        bus = RedisStreamBus(client, stream=stream)
        await bus.publish(CallTurn(call_id="c1", seq=1, agent="clinic", response_id=1, first_chunk_ms=5.0))
        for _ in range(100):
            snapshot = await actor.snapshot.remote()
            if snapshot["overall"]["turns"] == 1:
                break
            await asyncio.sleep(0.1)
        assert snapshot["overall"]["turns"] == 1
    finally:
        ray.kill(actor)
        await client.delete(stream, f"{stream}:dead")
        await client.aclose()
