"""A stalled Redis (a real redis-server frozen with SIGSTOP) never holds a turn up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
from pathlib import Path

import pytest

from callray.conversation import Conversation
from callray.outbox import Outbox
from callray.events import parse_event as parse_stored
from callray.protocol import ResponseFrame, parse_event
from callray.settings import CallraySettings, TurnSettings
from callray.sim.local import RedisServer
from callray.stores.base import CallState, StoreUnavailableError
from callray.stores.deadline import DeadlineCache
from callray.stores.factory import build_stores
from callray.stores.group_commit import MAX_BATCH
from callray.stores.memory import MemoryStateStore
from callray.stores.redis import RedisResponseCache, RedisStateStore
from callray.stores.redis_client import redis_client
from callray.stores.write_behind import WriteBehindStore
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
            frames.append(json.loads(frame.to_json()))
            if isinstance(frame, ResponseFrame) and frame.response_id == 1 and frame.content_complete:
                break
    answer = [f["content"] for f in frames if f.get("response_id") == 1]
    assert answer[0] == "You said: cache me please."  # the answer first, no holding phrase
    assert "Hold on." not in answer
    await conversation.deactivate()
    await stores.close()


async def test_a_redis_stall_never_rewinds_a_live_call(frozen_redis):
    """Redis frozen mid-call: saves time out and are kept by the write-behind store; one of them
    lands late when Redis wakes, so the delayed write finds a version it did not expect. That
    used to be taken for another writer: the conversation reloaded the stored (older) state and
    went back in time: its memory, latest_response_id and event seq (reused ids, dropped by the
    consumers as duplicates). Under its own owner epoch a call has no other writer: it keeps its
    state and saves it again. Its events wait with its unwritten state and reach the stream
    once each when Redis wakes, even those of the save whose reply was lost."""
    server, freeze = frozen_redis
    client = redis_client(server.url, timeout_s=0.2)
    store = WriteBehindStore(RedisStateStore(client, stream="callray:stall-events"))
    events = []

    class Sink:
        def emit(self, event) -> None:
            events.append(event)

    settings = TurnSettings(latency_budget_ms=2000, agent_timeout_s=5, greeting_wait_ms=0)
    claim = await store.claim("rewind", "host-a")
    state = CallState(call_id="rewind", agent="scripted", epoch=claim.epoch)
    conversation = Conversation(state, ScriptedAgent(), store=store, settings=settings, events=Sink())
    outbox = await conversation.attach(Outbox("s1"))

    async def turn(rid: int, text: str) -> None:
        """Ask and wait for the answer; its checkpoint may still be on its way, as in a live call
        where the caller speaks again before a slow save returns."""
        conversation.handle(parse_event({"interaction_type": "response_required", "response_id": rid,
                                         "transcript": [{"role": "user", "content": text}]}))
        async with asyncio.timeout(10):
            async for frame in outbox.frames():
                if isinstance(frame, ResponseFrame) and frame.response_id == rid and frame.content_complete:
                    break

    await turn(1, "remember alpha")
    await asyncio.sleep(0.1)
    freeze()
    await turn(2, "remember beta")   # its save hangs on the frozen Redis...
    await turn(3, "remember gamma")  # ... while the next turn changes the live state
    await asyncio.sleep(0.5)
    await turn(5, "remember delta")
    await asyncio.sleep(0.5)
    os.kill(server.proc.pid, signal.SIGCONT)
    await store.flush(timeout=5)
    await turn(6, "hello again")
    await asyncio.sleep(0.3)
    assert conversation.state.agent_state["memory"] == "delta"  # not rewound
    assert conversation.state.latest_response_id == 6
    seqs = [(e.epoch, e.seq) for e in events]
    assert len(seqs) == len(set(seqs))  # no event identity reused
    await conversation.checkpoint()
    stored = await RedisStateStore(client).load("rewind")
    assert stored.agent_state["memory"] == "delta" and stored.turns[-1].response_id == 6
    written = [parse_stored(fields[b"event"]) for _, fields in await client.xrange("callray:stall-events")]
    assert [(e.epoch, e.seq) for e in written] == seqs  # every event once, in order
    assert [e.response_id for e in written if e.type == "call.turn"] == [1, 2, 3, 5, 6]
    await conversation.deactivate()
    await store.close()


async def test_saves_waiting_behind_a_round_trip_to_a_frozen_redis_fail_with_it_unsent(frozen_redis):
    """Group commit: the saves queued behind a batch that timed out would only time out one batch
    after another; they fail with it (the write-behind keeps them), unsent."""
    server, freeze = frozen_redis
    client = redis_client(server.url, timeout_s=0.3)
    store = RedisStateStore(client)
    try:
        calls = [CallState(call_id=f"stall-{i}") for i in range(100)]
        assert await asyncio.gather(*(store.save(state) for state in calls)) == [1] * 100
        freeze()
        sent, round_trips = store._saves.runs, store._saves.round_trips
        async with asyncio.timeout(5):
            replies = await asyncio.gather(*(store.save(state) for state in calls), return_exceptions=True)
        assert all(isinstance(reply, StoreUnavailableError) for reply in replies), replies[:3]
        assert store._saves.round_trips - round_trips == 1  # the first batch timed out; the rest failed unsent
        assert store._saves.runs - sent == MAX_BATCH
    finally:
        await client.aclose()


@pytest.mark.parametrize("in_flight", [1, 5])
async def test_saves_of_a_group_commit_cancelled_mid_round_trip_are_cancelled_not_left_waiting(frozen_redis, in_flight):
    """The loop closing cancels the task that sends the saves. Those it was sending (alone or
    together, held in flight by the frozen Redis) and those waiting behind them are cancelled
    with it, never left waiting forever."""
    server, freeze = frozen_redis
    client = redis_client(server.url, timeout_s=30)
    store = RedisStateStore(client)
    try:
        await store.save(CallState(call_id="warm"))  # a pooled connection and the script loaded
        freeze()
        sent = [asyncio.ensure_future(store.save(CallState(call_id=f"sent-{i}"))) for i in range(in_flight)]
        await asyncio.sleep(0.2)  # in the round trip now
        waiting = asyncio.ensure_future(store.save(CallState(call_id="waiting")))
        await asyncio.sleep(0)
        store._saves._drainer.cancel()
        async with asyncio.timeout(5):
            replies = await asyncio.gather(*sent, waiting, return_exceptions=True)
        assert all(isinstance(reply, asyncio.CancelledError) for reply in replies), replies
    finally:
        await client.aclose()
