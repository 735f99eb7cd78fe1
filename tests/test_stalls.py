"""A stalled Redis (a real redis-server frozen with SIGSTOP) never holds a turn up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
from pathlib import Path

import pytest

from callray.conversation import Conversation, Outbox
from callray.protocol import parse_event
from callray.settings import CallraySettings, TurnSettings
from callray.sim.local import RedisServer
from callray.stores.base import CallState
from callray.stores.deadline import DeadlineCache
from callray.stores.factory import build_stores
from callray.stores.memory import MemoryStateStore
from callray.stores.redis import RedisResponseCache
from callray.stores.redis_client import redis_client
from tests.scripted_agent import ScriptedAgent


@pytest.fixture
def frozen_redis():
    """A redis-server of this test's own, and a way to freeze it (SIGSTOP) until the test ends."""
    with tempfile.TemporaryDirectory(prefix="callray-stall-") as tmp:
        server = RedisServer(Path(tmp), appendonly=False)
        server.start()
        frozen = []

        def freeze() -> None:
            os.kill(server.proc.pid, signal.SIGSTOP)
            frozen.append(True)

        try:
            yield server, freeze
        finally:
            if frozen:
                os.kill(server.proc.pid, signal.SIGCONT)
            server.stop()


async def test_a_frozen_cache_costs_a_turn_its_deadline_then_is_skipped(frozen_redis):
    server, freeze = frozen_redis
    client = redis_client(server.url, timeout_s=30)  # without a deadline a lookup would wait 30 s
    cache = DeadlineCache(RedisResponseCache(client), lookup_deadline_s=0.05, cooldown_s=60)
    await cache.put("a", "1", "hours", ["We open at 8."])
    assert await cache.get("a", "1", "hours") == ["We open at 8."]
    freeze()
    async with asyncio.timeout(5):
        assert await cache.get("a", "1", "hours") is None  # a miss at its deadline, not after 30 s
        assert cache.cooling
        assert await cache.get("a", "1", "hours") is None and cache.skipped == 1  # not even asked
        await cache.put("a", "1", "other", ["x"])  # skipped while cooling: no wait either
    await cache.close()
    await client.aclose()


async def test_a_turn_is_answered_at_once_while_the_cache_s_redis_is_frozen(frozen_redis):
    """Before: the lookup was awaited before the agent and the budget's timer, so the answer
    waited for Redis and the holding phrase came with it."""
    server, freeze = frozen_redis
    stores = await build_stores(CallraySettings(redis={"url": server.url, "timeout_s": 30},
                                                cache={"backend": "redis"}))  # the cache as a replica builds it
    settings = TurnSettings(latency_budget_ms=500, agent_timeout_s=5, holding_phrases=["Hold on."],
                            greeting_wait_ms=0)
    conversation = Conversation(CallState(call_id="stall"), ScriptedAgent(), store=MemoryStateStore(),
                                settings=settings, cache=stores.cache)
    outbox = await conversation.attach(Outbox("s1"))
    freeze()
    conversation.handle(parse_event({"interaction_type": "response_required", "response_id": 1,
                                     "transcript": [{"role": "user", "content": "cache me please"}]}))
    frames = []
    async with asyncio.timeout(5):
        async for frame in outbox.frames():
            frames.append(json.loads(frame.text))
            if frame.response_id == 1 and frame.complete:
                break
    answer = [f["content"] for f in frames if f.get("response_id") == 1]
    assert answer[0] == "You said: cache me please."  # the answer first, no holding phrase
    assert "Hold on." not in answer
    await conversation.deactivate()
    await stores.close()
