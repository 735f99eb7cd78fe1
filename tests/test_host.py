"""The virtual-actor host without Ray: activation, delivery, ownership, deactivation, and
commands reaching the host that owns a call (in-process and, between hosts, through Redis)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from callray.agents.registry import AgentRegistry
from callray.commands import Say, Superseded, TransferCall, parse_command
from callray.outbox import Outbox, StreamEnd
from callray.protocol import InboundEvent, ResponseFrame, parse_event
from callray.directory import CallDirectory
from callray.host import Delivery, Host
from callray.settings import CallraySettings
from callray.stores.base import StateStore
from callray.stores.memory import MemoryResponseCache, MemoryStateStore
from callray.stores.redis import RedisStateStore
from callray.stores.redis_client import connect_redis

# These sockets send no call_details: the clinic greets at once instead of waiting for it.
SETTINGS = CallraySettings(turns={"greeting_wait_ms": 0})
AGENTS = AgentRegistry.from_settings(SETTINGS.agents)


def make_host(store: StateStore | None = None, name: str = "host") -> Host:
    return Host(SETTINGS, AGENTS, store=store or MemoryStateStore(), cache=MemoryResponseCache(), name=name)


def request(rid: int, text: str) -> InboundEvent:
    return parse_event({"interaction_type": "response_required", "response_id": rid,
                        "transcript": [{"role": "user", "content": text}]})


def texts(frames) -> list[dict]:
    return [json.loads(f.to_json()) for f in frames]


async def answer(outbox: Outbox, rid: int) -> str:
    """The content of response ``rid`` once it completes on ``outbox``."""
    parts = []
    async with asyncio.timeout(5):
        async for frame in outbox.frames():
            if isinstance(frame, ResponseFrame) and frame.response_id == rid:
                parts.append(frame.content)
                if frame.content_complete:
                    return "".join(parts)
    raise AssertionError(f"outbox closed ({outbox.close_reason}) before response {rid} completed")


async def test_deliver_answers_the_owner_socket():
    host = make_host()
    stream = host.stream("c1", "s1")
    first = await anext(stream)
    assert first[0].response_id == 0 and first[0].content_complete
    assert await host.deliver("c1", "s1", request(1, "What are your hours?")) is Delivery.OK
    batch = await asyncio.wait_for(anext(stream), 5)
    assert any(isinstance(f, ResponseFrame) and f.content_complete and f.response_id == 1 for f in batch)


async def test_newest_socket_owns_the_call_and_the_old_stream_ends():
    host = make_host()
    old = host.stream("c1", "s1")
    await anext(old)
    new = host.stream("c1", "s2")
    assert texts(await anext(new))[0]["content"] == ""  # greeted already: empty response 0
    assert await anext(old) is StreamEnd.SUPERSEDED
    assert await host.deliver("c1", "s1", request(1, "hello")) is Delivery.SUPERSEDED
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
    assert texts(await anext(again))[0]["content"] == ""
    await host.deliver("c1", "s2", request(2, "I'd like to book an appointment"))
    batch = await asyncio.wait_for(anext(again), 5)
    assert "Maria" in "".join(f["content"] for f in texts(batch))
    assert host.counters["activations"] == 2


async def test_a_newer_activation_on_another_host_fences_the_older_one():
    """Two replicas, one store: the reconnect lands on the other replica; the first replica's
    next checkpoint is refused, it closes its socket as superseded and drops the call unsaved."""
    store = MemoryStateStore()
    a, b = make_host(store, "replica-a"), make_host(store, "replica-b")
    old = Outbox("socket-1")
    conversation = await a.attach("c1", old, None)
    assert "Maple Street" in texts(old.drain())[0]["content"]
    conversation.handle(request(1, "Hi, my name is Maria"))
    assert "Maria" in await answer(old, 1)
    await asyncio.sleep(0.05)  # its checkpoint runs after the completing frame (a reconnect comes far later)
    new = Outbox("socket-2")
    await b.attach("c1", new, None)
    assert texts(new.drain())[0]["content"] == ""  # greeted once per call, not per replica
    conversation.handle(request(2, "What are your hours?"))  # the old socket is still half-alive
    await answer(old, 2)
    await asyncio.sleep(0.05)  # the turn's checkpoint runs after the completing frame
    assert old.close_reason is StreamEnd.SUPERSEDED and "c1" not in a.calls and a.counters["taken_over"] == 1
    stored = await store.load("c1")
    assert [t.response_id for t in stored.turns] == [1]  # the fenced turn was never written
    b.calls["c1"].handle(request(3, "I'd like to book an appointment"))
    assert "Maria" in await answer(new, 3)  # the new owner has the history


async def test_commands_reach_only_a_live_call_and_superseded_drops_it():
    host = make_host()
    outbox = Outbox("s1")
    await host.attach("c1", outbox, None)
    outbox.drain()
    assert not await host.command("nobody", Say(line="Hello?"))
    assert await host.command("c1", TransferCall(number="+15550100", line="Connecting you."))
    interrupt = texts(outbox.drain())[-1]
    assert interrupt["response_type"] == "agent_interrupt" and interrupt["transfer_number"] == "+15550100"
    assert await host.command("c1", Superseded(epoch=host.calls["c1"].state.epoch))
    assert "c1" in host.calls  # same epoch: not a newer activation
    assert await host.command("c1", Superseded(epoch=99))
    assert "c1" not in host.calls and outbox.close_reason is StreamEnd.SUPERSEDED
    assert host.counters["taken_over"] == 1  # one takeover, counted once


def test_a_transfer_command_needs_a_number_and_commands_read_back_by_kind():
    with pytest.raises(ValueError, match="number"):
        TransferCall(line="x")
    with pytest.raises(ValueError, match="number"):
        parse_command({"kind": "transfer", "line": "x"})
    with pytest.raises(ValueError, match="kind"):
        parse_command({"kind": "dance"})
    command = TransferCall(number="+15550100", line="Connecting you.")
    assert parse_command(command.model_dump(mode="json")) == command
    assert parse_command({"kind": "superseded", "epoch": 3}) == Superseded(epoch=3)


async def test_directory_sends_commands_to_the_owning_replica_through_redis(redis_url):
    """A command that starts on replica B (e.g. a webhook) reaches the call live on replica A;
    A's claim after B tells B at once that it lost the call."""
    client = await connect_redis(redis_url)
    prefix = f"test-dir-{uuid.uuid4().hex}:"
    store = RedisStateStore(client, prefix=prefix)
    names = [f"replica-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    hosts = [make_host(store, name) for name in names]
    directories = [CallDirectory(name, host, store=store, redis=client) for name, host in zip(names, hosts)]
    for host, directory in zip(hosts, directories):
        host.on_claimed = directory.notify_superseded
    serving = [asyncio.create_task(d.serve()) for d in directories]
    try:
        await asyncio.sleep(0.2)  # both subscribed
        outbox = Outbox("s1")
        await hosts[0].attach("c1", outbox, None)
        outbox.drain()
        assert await directories[1].send("c1", Say(line="A colleague joins shortly."))
        said = texts(outbox.drain())
        assert said and said[-1]["content"] == "A colleague joins shortly."
        assert directories[0].counts["served"] == 1 and directories[1].counts["remote"] == 1
        assert not await directories[1].send("never-activated", Say(line="x"))

        newer = Outbox("s2")
        await hosts[1].attach("c1", newer, None)  # the reconnect landed on the other replica
        async with asyncio.timeout(5):
            while "c1" in hosts[0].calls:
                await asyncio.sleep(0.02)
        assert outbox.close_reason is StreamEnd.SUPERSEDED
        assert await directories[0].send("c1", Say(line="Still there?"))
        assert texts(newer.drain())[-1]["content"] == "Still there?"
    finally:
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        await client.aclose()


class SlowRedisSaves(RedisStateStore):
    """A replica whose saves reach Redis a while after they were sent (a busy Redis, a slow link)."""

    async def save(self, state, events=None):
        await asyncio.sleep(0.3)
        return await super().save(state, events)


async def test_a_reconnect_to_another_replica_while_the_last_checkpoint_is_in_flight_keeps_that_turn(redis_url):
    """Retell reconnects to replica B just after replica A answered a turn, while A's checkpoint
    of it is still on its way. B's claim used to fence that checkpoint off: the turn was lost
    (the agent forgot it). Now B first asks A to hand the call over: A saves it and lets it go,
    then B claims it with the turn."""
    client = await connect_redis(redis_url)
    prefix = f"test-handover-{uuid.uuid4().hex}:"
    names = [f"replica-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    stores = [SlowRedisSaves(client, prefix=prefix), RedisStateStore(client, prefix=prefix)]
    hosts = [make_host(store, name) for store, name in zip(stores, names)]
    directories = [CallDirectory(name, host, store=host.store, redis=client) for name, host in zip(names, hosts)]
    for host, directory in zip(hosts, directories):
        host.on_claimed, host.release_elsewhere = directory.notify_superseded, directory.release
    serving = [asyncio.create_task(d.serve()) for d in directories]
    try:
        await asyncio.sleep(0.2)  # both subscribed
        old = Outbox("s1")
        await hosts[0].attach("c1", old)
        await asyncio.sleep(0.5)  # the greeting is saved
        await hosts[0].deliver("c1", "s1", request(1, "What are your hours?"))
        assert "Monday to Friday" in await answer(old, 1)  # A's checkpoint of turn 1 is now in flight

        new = Outbox("s2")
        conversation = await hosts[1].attach("c1", new)  # the reconnect, on replica B
        assert [t.response_id for t in conversation.state.turns] == [1]
        assert old.close_reason is StreamEnd.SUPERSEDED and "c1" not in hosts[0].calls  # 4001, as on one replica
        assert texts(new.drain())[0]["content"] == ""  # response 0 of a resumed call: no second greeting
        assert directories[0].counts["served"] >= 1
    finally:
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        await client.aclose()


async def test_memory_that_ends_expired_ended_and_excess_calls_are_dropped():
    """The in-memory store sweeps expired calls, keeps an ended call briefly, and has a cap."""
    from callray.stores.base import CallState
    from callray.stores.memory import ENDED_TTL_S

    store = MemoryStateStore(ttl_s=3600, max_calls=100)
    for i in range(2000):
        await store.save(CallState(call_id=f"old-{i}"))
    assert len(store._data) <= 100  # never more than the cap, however many calls came
    ended = CallState(call_id="done", ended=True)
    await store.save(ended)
    now = time.monotonic()
    assert store._data["done"].expires <= now + ENDED_TTL_S
    assert store.sweep(now + ENDED_TTL_S + 1) == 1 and await store.load("done") is None
    left = len(store._data)
    assert store.sweep(now + 3601) == left and not store._data  # everything expired is gone after a sweep


async def test_a_host_keeps_a_bounded_number_of_detached_calls():
    settings = CallraySettings.parse({"hosts": {"max_detached_calls": 3}, "turns": {"greeting_wait_ms": 0}})
    host = Host(settings, AGENTS, store=MemoryStateStore(), cache=MemoryResponseCache())
    for i in range(10):
        await host.attach(f"c{i}", Outbox(f"s{i}"), None)
        await host.detach(f"c{i}", f"s{i}")
    assert len(host.calls) == 3 and set(host.calls) == {"c7", "c8", "c9"}  # the newest wait for a reconnect
    again = Outbox("s0-again")
    await host.attach("c0", again, None)  # a deactivated call comes back from the store, not greeted again
    assert texts(again.drain())[0]["content"] == ""


async def test_the_longest_detached_call_leaves_first_and_a_reconnected_one_stays():
    """The bound goes by how long a call has been without a socket (docs/reliability.md); a call
    that reconnected is not detached any more, and a reconnect re-activates an evicted one."""
    settings = CallraySettings.parse({"hosts": {"max_detached_calls": 2}, "turns": {"greeting_wait_ms": 0}})
    host = Host(settings, AGENTS, store=MemoryStateStore(), cache=MemoryResponseCache())
    outboxes = {f"c{i}": Outbox(f"s{i}") for i in range(4)}
    for call_id, outbox in outboxes.items():
        await host.attach(call_id, outbox, None)
    await host.detach("c1", "s1")
    await host.detach("c0", "s0")
    back = Outbox("s1-again")
    await host.attach("c1", back, None)  # c1 reconnects: no longer detached
    await host.detach("c2", "s2")
    await host.detach("c3", "s3")  # three detached (c0, c2, c3) over a bound of two: c0 goes
    assert set(host.calls) == {"c1", "c2", "c3"}
    assert host.calls["c1"].connected
    await host.attach("c0", Outbox("s0-again"), None)  # from the store; c2 and c3 stay detached
    await host.detach("c1", "s1-again")  # now c2, c3, c1 are detached: c2 goes
    assert set(host.calls) == {"c0", "c1", "c3"}


async def test_a_calls_state_keeps_a_window_of_turns_and_only_the_call_fields_it_uses():
    settings = CallraySettings.parse({"turns": {"turns_kept": 3}})
    store = MemoryStateStore()
    host = Host(settings, AGENTS, store=store, cache=MemoryResponseCache())
    outbox = Outbox("s1")
    conversation = await host.attach("c1", outbox, None)
    conversation.handle(parse_event({"interaction_type": "call_details", "call": {
        "call_id": "c1", "agent_id": "a", "from_number": "+15550001111", "transcript": "x" * 10_000,
        "recording_url": "https://example.com/r.wav", "metadata": {"plan": "gold"}}}))
    for rid in range(1, 8):
        conversation.handle(request(rid, "What are your hours?"))
        await answer(outbox, rid)
    await asyncio.sleep(0.05)
    stored = await store.load("c1")
    assert [t.response_id for t in stored.turns] == [5, 6, 7]
    assert set(stored.call) == {"call_id", "agent_id", "from_number", "metadata"}


class FlakyStore(MemoryStateStore):
    """A memory store whose saves can be made to fail, as Redis does during an outage."""

    failing = False

    async def save(self, state, events=None):
        if self.failing:
            raise ConnectionError("store down")
        return await super().save(state, events)


class CountingStore(MemoryStateStore):
    """A memory store that counts its saves."""

    saves = 0

    async def save(self, state, events=None):
        self.saves += 1
        return await super().save(state, events)


async def test_a_calls_start_is_one_save_and_a_change_during_a_save_gets_its_own():
    """The greeting and call_details each ask for a checkpoint at once: one save carries both.
    A change made while a save is in flight is not in it, so it is saved after it."""
    store = CountingStore()
    host = Host(CallraySettings(turns={"greeting_wait_ms": 500}), AGENTS, store=store, cache=MemoryResponseCache())
    outbox = Outbox("s1")
    conversation = await host.attach("c1", outbox, None)  # the greeting waits for call_details
    conversation.handle(parse_event({"interaction_type": "call_details", "call": {"call_id": "c1", "agent_id": "a"}}))
    await asyncio.sleep(0.05)
    stored = await store.load("c1")
    assert store.saves == 1 and stored.greeted and stored.call["agent_id"] == "a"
    conversation.handle(request(1, "What are your hours?"))
    await answer(outbox, 1)
    await asyncio.sleep(0.05)
    assert store.saves == 2 and [t.response_id for t in (await store.load("c1")).turns] == [1]
    slow = asyncio.Event()
    store.save = lambda state, events=None, save=store.save: _after(slow, save(state, events))  # type: ignore[method-assign]
    first = asyncio.create_task(conversation.checkpoint())
    await asyncio.sleep(0.01)  # the first save is in flight (its state serialised)...
    conversation.state.agent_state = {"note": "changed during the save"}
    second = asyncio.create_task(conversation.checkpoint())  # ... so this ask needs a save of its own
    slow.set()
    await asyncio.gather(first, second)
    assert store.saves == 4 and (await store.load("c1")).agent_state == {"note": "changed during the save"}


async def _after(event: asyncio.Event, coro):
    await event.wait()
    return await coro


async def test_events_of_a_crashed_host_and_its_successor_never_share_an_identity():
    """Issue 11 §2: a host that dies after emitting events its checkpoint never saved must not
    make its successor reuse their identities, or consumers drop the successor's events."""
    from callray.consumers.analytics import Analytics

    events = []
    store = FlakyStore()
    a = Host(SETTINGS, AGENTS, store=store, cache=MemoryResponseCache(), name="a", events=SimpleSink(events))
    old = Outbox("socket-1")
    conversation = await a.attach("c1", old, None)  # greeted and checkpointed
    await asyncio.sleep(0.05)
    store.failing = True  # the turn's event goes out, its checkpoint does not: then the host dies
    conversation.handle(request(1, "Hi, my name is Maria"))
    await answer(old, 1)
    await asyncio.sleep(0.05)  # the event and the failed checkpoint follow the completing frame
    store.failing = False
    b = Host(SETTINGS, AGENTS, store=store, cache=MemoryResponseCache(), name="b", events=SimpleSink(events))
    new = Outbox("socket-2")
    await b.attach("c1", new, None)
    b.calls["c1"].handle(request(2, "What are your hours?"))
    await answer(new, 2)
    await asyncio.sleep(0.05)
    assert len({(e.call_id, e.key) for e in events}) == len(events)
    analytics = Analytics()
    for event in events:
        await analytics.handle(event)
    calls = analytics.snapshot()["overall"]["calls"]
    assert calls["reconnects"] == 1 and analytics.snapshot()["agents"]["clinic"]["turns"] == 2


class SimpleSink:
    def __init__(self, into: list):
        self.into = into

    def emit(self, event) -> None:
        self.into.append(event)


class SlowSaves(MemoryStateStore):
    """Saves reach the store a while after they were sent, as on a busy Redis."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s = delay_s

    async def save(self, state, events=None):
        sent = state.model_copy(deep=True)  # what went on the wire
        await asyncio.sleep(self.delay_s)
        version = await super().save(sent, events)
        state.version, state.updated_at = sent.version, sent.updated_at
        return version


async def test_a_reconnect_to_the_same_replica_while_a_save_is_in_flight_keeps_the_new_socket():
    """The reconnect's claim bumps the owner epoch; the save sent before it then arrives under the
    old epoch and is refused. That refusal is this activation's own doing, not a takeover: the
    new socket used to be closed with 4001 (Retell ends the call on it)."""
    host = Host(SETTINGS, AGENTS, store=SlowSaves(0.1), cache=MemoryResponseCache())
    first = Outbox("s1")
    await host.attach("c1", first)
    await asyncio.sleep(0.02)  # the greeting's checkpoint is on its way
    second = Outbox("s2")
    conversation = await host.attach("c1", second)  # the reconnect, on this replica
    assert first.close_reason is StreamEnd.SUPERSEDED
    await asyncio.sleep(0.4)  # the late save is refused, and saved again under the new epoch
    assert not second.closed and host.calls.get("c1") is conversation and not conversation.lost
    second.drain()
    await host.deliver("c1", "s2", request(1, "What are your hours?"))
    assert "Monday to Friday" in await answer(second, 1)
    await asyncio.sleep(0.3)
    stored = await host.store.load("c1")
    assert stored is not None and stored.greeted and stored.turns[-1].response_id == 1  # its saves land
