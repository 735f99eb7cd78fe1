"""The outbox: with Redis state and a Redis Stream bus, a call's events are written to the stream
by the same script that writes its checkpoint, so a replica that dies after a save loses none of
the events of what it saved (before, they waited a few ms in the replica's bus buffer)."""

from __future__ import annotations

import asyncio
import json
import uuid

from callray.agents.registry import AgentRegistry
from callray.outbox import Outbox
from callray.events import CallStarted, CallTurn, parse_event
from callray.host import Host
from callray.protocol import ResponseFrame
from callray.protocol import parse_event as parse_frame_event
from callray.settings import CallraySettings
from callray.stores.base import CallFencedError, CallState
from callray.events.bus import TappedSink
from callray.stores.factory import build_stores
from callray.stores.redis import RedisStateStore
from callray.stores.redis_client import connect_redis


async def stream_events(client, stream: str) -> list:
    return [parse_event(fields[b"event"]) for _, fields in await client.xrange(stream)]


def turn(call_id: str, seq: int, epoch: int) -> CallTurn:
    return CallTurn(call_id=call_id, seq=seq, epoch=epoch, response_id=seq, caller_text=f"question {seq}")


async def test_a_save_appends_its_events_once_and_a_refused_save_appends_none(redis_url):
    client = await connect_redis(redis_url)
    stream = f"callray:test-outbox:{uuid.uuid4().hex}"
    store = RedisStateStore(client, stream=stream)
    assert store.carries_events
    claim = await store.claim("c1", "host-a")
    state = CallState(call_id="c1", epoch=claim.epoch, event_seq=2)
    events = [CallStarted(call_id="c1", seq=1, epoch=claim.epoch), turn("c1", 2, claim.epoch)]
    await store.save(state, events)
    assert events == []  # written: the store takes them off the owner's list
    assert [(e.type, e.seq) for e in await stream_events(client, stream)] == [("call.started", 1), ("call.turn", 2)]

    # a save whose reply was lost sends its events again with the next one: appended once
    state.event_seq = 3
    events = [turn("c1", 2, claim.epoch), turn("c1", 3, claim.epoch)]
    await store.save(state, events)
    assert [e.seq for e in await stream_events(client, stream)] == [1, 2, 3]

    # a newer activation elsewhere: the old owner's save is refused, and so are its events
    await store.claim("c1", "host-b")
    state.event_seq = 4
    events = [turn("c1", 4, claim.epoch)]
    try:
        await store.save(state, events)
        raise AssertionError("a fenced save was written")
    except CallFencedError:
        pass
    assert [e.seq for e in events] == [4]  # still the owner's (who drops the call)
    assert [e.seq for e in await stream_events(client, stream)] == [1, 2, 3]
    await client.delete(stream, store.key("c1"))
    await client.aclose()


async def test_a_turn_s_event_is_in_the_stream_once_its_checkpoint_is_even_if_the_bus_never_publishes(redis_url):
    """The replica's bus buffer never reaches Redis here (its bus is closed, as a SIGKILLed
    replica's never flushes); the turn's event still reaches the stream, with the checkpoint.
    Before, it was dropped. Metrics still see every event once, and nothing is published twice."""
    stream = f"callray:test-outbox:{uuid.uuid4().hex}"
    settings = CallraySettings(redis={"url": redis_url}, state={"backend": "redis"},
                               events={"backend": "redis_streams", "stream": stream}, archive={"backend": "none"},
                               turns={"greeting_wait_ms": 0})
    stores = await build_stores(settings)
    assert stores.state.carries_events
    await stores.events.close()  # nothing it buffers is ever published
    observed = []
    host = Host(settings, AgentRegistry.from_settings(settings.agents), store=stores.state,
                events=TappedSink(stores.events, observed.append), name="replica-a")
    call_id = f"outbox-{uuid.uuid4().hex[:8]}"
    outbox = Outbox("s1")
    conversation = await host.attach(call_id, outbox)
    conversation.handle(parse_frame_event(
        {"interaction_type": "response_required", "response_id": 1,
         "transcript": [{"role": "user", "content": "When are you open?"}]}))
    async with asyncio.timeout(5):
        async for frame in outbox.frames():
            if isinstance(frame, ResponseFrame) and frame.response_id == 1 and frame.content_complete:
                break
    await asyncio.gather(*conversation._background)
    await conversation.checkpoint()

    stored = await stores.state.load(call_id)
    assert stored.turns[-1].response_id == 1
    written = await stream_events(stores.redis, stream)
    assert [e.type for e in written] == ["call.started", "call.turn"]
    assert written[1].response_id == 1 and written[1].caller_text == "When are you open?"
    assert stored.event_seq == written[-1].seq  # the checkpoint and its events went together
    assert [e.type for e in observed] == ["call.started", "call.turn"]  # observed once, not published by the bus
    assert conversation.unsaved_events == []
    assert json.loads((await stores.redis.hget(f"callray:call:{call_id}", "q")).decode()) == written[-1].seq
    await host.deactivate(call_id)
    await stores.redis.delete(stream)
    await stores.close()
