"""The virtual-actor host without Ray: activation, delivery, ownership, deactivation."""

from __future__ import annotations

import asyncio
import json

from callray.agents.registry import AgentRegistry
from callray.host import STREAM_CLOSED, Host
from callray.settings import CallraySettings
from callray.stores.memory import MemoryResponseCache, MemoryStateStore


def make_host() -> Host:
    settings = CallraySettings()
    return Host(settings, AgentRegistry.from_settings(settings.agents), store=MemoryStateStore(),
                cache=MemoryResponseCache())


def request(rid: int, text: str) -> str:
    return json.dumps({"interaction_type": "response_required", "response_id": rid,
                       "transcript": [{"role": "user", "content": text}]})


async def test_deliver_validates_frames_and_answers_the_owner_socket():
    host = make_host()
    stream = host.stream("c1", "s1")
    first = await anext(stream)
    assert json.loads(first[0])["response_id"] == 0
    assert await host.deliver("c1", "s1", '{"interaction_type": "response_required", "response_id": "x"}') == "ok"
    assert host.counters["invalid_frames"] == 1
    assert await host.deliver("c1", "s1", request(1, "What are your hours?")) == "ok"
    batch = await asyncio.wait_for(anext(stream), 5)
    assert any(json.loads(f).get("content_complete") for f in batch)


async def test_newest_socket_owns_the_call_and_the_old_stream_ends():
    host = make_host()
    old = host.stream("c1", "s1")
    await anext(old)
    new = host.stream("c1", "s2")
    assert json.loads((await anext(new))[0])["content"] == ""  # greeted already: empty response 0
    closing = await anext(old)
    assert closing.startswith(STREAM_CLOSED) and "superseded" in closing
    assert await host.deliver("c1", "s1", request(1, "hello")) == "superseded"
    assert host.counters["activations"] == 1


async def test_deactivated_call_reactivates_from_the_store():
    host = make_host()
    stream = host.stream("c1", "s1")
    await anext(stream)
    await host.deliver("c1", "s1", request(1, "Hi, my name is Maria"))
    await asyncio.wait_for(anext(stream), 5)
    await host.detach("c1", "s1")
    assert await host.deactivate("c1") and "c1" not in host.calls
    again = host.stream("c1", "s2")
    assert json.loads((await anext(again))[0])["content"] == ""
    await host.deliver("c1", "s2", request(2, "I'd like to book an appointment"))
    batch = await asyncio.wait_for(anext(again), 5)
    assert "Maria" in "".join(json.loads(f)["content"] for f in batch)
    assert host.counters["activations"] == 2
