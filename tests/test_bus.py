"""The event bus against a real redis-server (and the in-memory twin): delivery to every
group, takeover from dead consumers, dead-lettering, and a producer that never blocks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from callray.events.bus import Delivery, EventBus
from callray.events.consume import consume
from callray.events.memory import MemoryBus
from callray.events.redis_streams import RedisStreamBus
from callray.consumers.analytics import Analytics
from callray.consumers.archive import TranscriptArchive
from callray.consumers.archive_files import FileRecords
from callray.events import CallEnded, CallStarted, CallTurn, Event
from callray.stores.redis_client import RedisConfigError, redis_client
from callray.sim.local import free_port


def script(calls: int = 3, turns: int = 4) -> list[Event]:
    events: list[Event] = []
    for c in range(calls):
        cid = f"call-{c}"
        events.append(CallStarted(call_id=cid, seq=0, agent="demo"))
        for t in range(1, turns + 1):
            events.append(CallTurn(call_id=cid, seq=t, agent="demo", response_id=t, caller_text=f"q{t}",
                                   agent_text=f"a{t}", first_chunk_ms=10.0 * t, cache_hit=t % 2 == 0))
        events.append(CallEnded(call_id=cid, seq=turns + 1, agent="demo", reason="user_hangup"))
    return events


@pytest.fixture
async def redis_bus(redis_url):
    stream = f"test:{uuid.uuid4().hex}"
    bus = RedisStreamBus(redis_client(redis_url), stream=stream, dead_letter_stream=f"{stream}:dead",
                         max_deliveries=3, claim_idle_ms=100, owns_client=True)
    yield bus
    await bus.client.delete(stream, f"{stream}:dead")
    await bus.close()


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def run_consumers(bus: EventBus, handlers: dict[str, object], done) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(consume(bus, group, f"{group}-1", getattr(h, "handle", h), stop=stop, block_ms=100,
                                         flush=getattr(h, "flush", None)))
             for group, h in handlers.items()]
    try:
        await until(done)
    finally:
        stop.set()
        await asyncio.gather(*tasks)


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_events_reach_three_groups_exactly(backend, redis_bus, tmp_path: Path):
    bus = redis_bus if backend == "redis" else MemoryBus(claim_idle_ms=100)
    events = script()
    for event in events:
        bus.emit(event)
    await bus.flush()
    assert bus.stats()["published"] == len(events) and bus.stats()["dropped"] == 0

    analytics, archive, seen = Analytics(), TranscriptArchive(FileRecords(tmp_path)), Counter()

    async def escalation_probe(event: Event) -> None:
        seen[(event.call_id, event.seq)] += 1

    await run_consumers(bus, {"analytics": analytics, "archive": archive, "escalation": escalation_probe},
                        lambda: len(seen) == len(events) and len(list(tmp_path.glob("*.json"))) == 3
                        and analytics.snapshot()["overall"]["calls"]["ended"] == 3)
    snap = analytics.snapshot()["overall"]
    assert snap["calls"] == {"active": 0, "started": 3, "ended": 3, "reconnects": 0}
    assert snap["turns"] == 12 and snap["cache_hits"] == 6
    assert set(seen.values()) == {1}
    for c in range(3):
        record = await archive.get(f"call-{c}")
        assert [t["response_id"] for t in record["turns"]] == [1, 2, 3, 4] and record["ended"]
    await bus.close()


async def test_dead_consumer_entries_are_claimed_and_counts_stay_exact(redis_bus):
    events = script(calls=2, turns=3)
    for event in events:
        await redis_bus.publish(event)
    analytics = Analytics()
    first = await redis_bus.read("analytics", "worker-a", count=6, block_ms=0)
    assert [d.deliveries for d in first] == [1] * 6
    for delivery in first[:4]:  # handled but never acked: the process "dies" here
        await analytics.handle(delivery.event)

    successor = RedisStreamBus(redis_bus.client, stream=redis_bus.stream, dead_letter_stream=redis_bus.dead_letter_stream,
                               max_deliveries=3, claim_idle_ms=100)
    await asyncio.sleep(0.15)  # worker-a's entries are now idle longer than claim_idle_ms
    claimed = await successor.read("analytics", "worker-b", count=100, block_ms=0)
    assert [d.id for d in claimed] == [d.id for d in first] and all(d.deliveries == 2 for d in claimed)
    stop = asyncio.Event()
    for delivery in claimed:
        await analytics.handle(delivery.event)
    await successor.ack("analytics", [d.id for d in claimed])
    task = asyncio.create_task(consume(successor, "analytics", "worker-b", analytics.handle, stop=stop, block_ms=100))
    await until(lambda: analytics.snapshot()["overall"]["calls"]["ended"] == 2)
    stop.set()
    await task
    snap = analytics.snapshot()["overall"]
    assert snap["calls"]["started"] == 2 and snap["turns"] == 6 and snap["calls"]["ended"] == 2
    pending = await redis_bus.client.xpending(redis_bus.stream, "analytics")
    assert pending["pending"] == 0


async def test_restarted_consumer_rereads_its_own_pending_first(redis_bus):
    for event in script(calls=1, turns=2):
        await redis_bus.publish(event)
    got = await redis_bus.read("archive", "archive-1", count=2, block_ms=0)
    assert len(got) == 2
    restarted = RedisStreamBus(redis_bus.client, stream=redis_bus.stream, claim_idle_ms=60_000)
    again = await restarted.read("archive", "archive-1", count=10, block_ms=0)
    assert [d.id for d in again] == [d.id for d in got] and all(d.deliveries == 2 for d in again)
    rest = await restarted.read("archive", "archive-1", count=10, block_ms=0)
    assert len(rest) == 2 and all(d.deliveries == 1 for d in rest)  # then new entries


async def test_failing_handler_lands_in_dead_letter_after_max_deliveries(redis_bus):
    poison = CallTurn(call_id="poison", seq=1, response_id=1, caller_text="boom")
    good = CallTurn(call_id="fine", seq=1, response_id=1)
    await redis_bus.publish(poison)
    await redis_bus.publish(good)
    attempts: Counter[str] = Counter()

    async def handler(event: Event) -> None:
        attempts[event.call_id] += 1
        if event.call_id == "poison":
            raise RuntimeError("handler bug")

    stop = asyncio.Event()
    task = asyncio.create_task(consume(redis_bus, "g", "c1", handler, stop=stop, block_ms=50))
    await until(lambda: redis_bus.stats()["dead_lettered"] == 1)
    stop.set()
    await task
    assert attempts == {"poison": 3, "fine": 1}
    dead = await redis_bus.dead_letters()
    assert len(dead) == 1 and dead[0]["group"] == "g" and "delivered 4 times" in dead[0]["reason"]
    assert '"call_id":"poison"' in dead[0]["event"]
    assert (await redis_bus.client.xpending(redis_bus.stream, "g"))["pending"] == 0


async def test_undecodable_entries_are_dead_lettered_at_once(redis_bus):
    await redis_bus.client.xadd(redis_bus.stream, {"event": "{not json"})
    await redis_bus.client.xadd(redis_bus.stream, {"something": "else"})
    await redis_bus.client.xadd(redis_bus.stream, {"event": '{"type": "call.unknown", "call_id": "x", "seq": 1}'})
    await redis_bus.publish(CallStarted(call_id="ok", seq=0))
    got = await redis_bus.read("g", "c", count=10, block_ms=0)
    assert [d.event.call_id for d in got] == ["ok"]
    dead = await redis_bus.dead_letters()
    assert len(dead) == 3
    assert dead[0]["reason"].startswith("undecodable") and "no 'event' field" in dead[1]["reason"]
    assert all(row["original_id"] for row in dead)


async def test_emit_never_blocks_and_counts_drops(redis_bus):
    small = RedisStreamBus(redis_bus.client, stream=redis_bus.stream, buffer_size=10)
    for i in range(25):  # no await in between: the flusher cannot run, the buffer fills
        small.emit(CallStarted(call_id=f"c{i}", seq=0))
    assert small.stats()["dropped"] == 15 and small.stats()["buffered"] == 10
    await small.flush()
    assert await redis_bus.client.xlen(redis_bus.stream) == 10
    small.emit(CallStarted(call_id="late", seq=0))  # the background flusher publishes this one
    await until(lambda: small.stats()["published"] == 11)
    await small.close()


async def test_emit_with_redis_down_neither_blocks_nor_raises():
    bus = RedisStreamBus(redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2), buffer_size=5,
                         owns_client=True)
    for i in range(8):
        bus.emit(CallStarted(call_id=f"c{i}", seq=0))
    await until(lambda: bus.stats()["publish_errors"] >= 1)
    stats = bus.stats()
    assert stats["buffered"] == 5 and stats["dropped"] == 3 and stats["published"] == 0
    assert "Error" in stats["last_error"]
    await bus.close()  # gives up on the unpublished buffer without raising


async def test_connect_names_the_setting_when_redis_is_down():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisConfigError, match="EVENTS_URL"):
        await RedisStreamBus.connect(url, setting="EVENTS_URL")


async def test_consumers_survive_a_redis_restart(redis_server, redis_bus):
    handled: Counter[str] = Counter()

    async def handler(event: Event) -> None:
        handled[event.call_id] += 1

    stop = asyncio.Event()
    task = asyncio.create_task(consume(redis_bus, "g", "c", handler, stop=stop, block_ms=100, error_backoff_s=0.1))
    await redis_bus.publish(CallStarted(call_id="before", seq=0))
    await until(lambda: handled["before"] == 1)
    redis_server.restart()
    redis_bus.emit(CallStarted(call_id="after", seq=0))
    await until(lambda: handled["after"] == 1, timeout=20)
    stop.set()
    await task
    assert handled == {"before": 1, "after": 1}


def test_memory_emit_outside_a_loop_only_buffers():
    bus = MemoryBus(buffer_size=2)
    for i in range(3):
        bus.emit(CallStarted(call_id=f"c{i}", seq=0))
    assert bus.stats()["buffered"] == 2 and bus.stats()["dropped"] == 1
    assert isinstance(bus, EventBus)


async def test_memory_bus_redelivers_then_dead_letters():
    bus = MemoryBus(max_deliveries=2, claim_idle_ms=30)
    await bus.publish(CallStarted(call_id="a", seq=0))
    await bus.publish(CallStarted(call_id="b", seq=0))
    first = await bus.read("g", "c", count=10, block_ms=0)
    assert [d.deliveries for d in first] == [1, 1]
    await bus.ack("g", [first[1].id])
    await asyncio.sleep(0.05)
    second = await bus.read("g", "other", count=10, block_ms=0)
    assert [(d.event.call_id, d.deliveries) for d in second] == [("a", 2)]
    await asyncio.sleep(0.05)
    assert await bus.read("g", "other", count=10, block_ms=0) == []
    assert bus.dead[0]["original_id"] == first[0].id and "delivered 3 times" in bus.dead[0]["reason"]
    await bus.close()


async def test_a_lingering_consumer_with_a_backlog_reads_on_without_waiting():
    """The archive lingers between batches so that they grow. It used to linger after every
    batch, so it could never take more than one batch (100 events) per linger (1 s): at 300
    calls churning it fell 45 s behind the stream. A full batch means a backlog: read on."""
    bus = MemoryBus()
    for i in range(500):
        await bus.publish(CallStarted(call_id=f"c{i}", seq=0))
    handled, flushed = [], []

    async def handle(event) -> None:
        handled.append(event.call_id)

    async def flush() -> None:
        flushed.append(len(handled))

    stop = asyncio.Event()
    consuming = asyncio.create_task(consume(bus, "archive", "a1", handle, stop=stop, flush=flush, linger_s=30.0,
                                            batch=100, block_ms=50))
    try:
        await until(lambda: len(handled) == 500, timeout=5)  # a linger after each batch: 100, then 30 s
        assert flushed == [100, 200, 300, 400, 500]  # still one flush per batch
        await bus.publish(CallStarted(call_id="late", seq=0))
        await until(lambda: len(handled) == 501, timeout=5)  # the backlog done: a partial batch ...
        await bus.publish(CallStarted(call_id="later", seq=0))
        await asyncio.sleep(0.5)
        assert "later" not in handled  # ... is followed by the linger, so the next batch can grow
    finally:
        stop.set()
        consuming.cancel()
        await asyncio.gather(consuming, return_exceptions=True)


async def test_memory_bus_read_waits_for_new_entries():
    bus = MemoryBus()
    waiter = asyncio.create_task(bus.read("g", "c", count=10, block_ms=5000))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    bus.emit(CallStarted(call_id="a", seq=0))
    delivery = (await waiter)[0]
    assert isinstance(delivery, Delivery) and delivery.event.call_id == "a" and delivery.deliveries == 1
    await bus.close()


async def test_trimming_keeps_what_a_stopped_group_has_not_acked_and_counts_forced_drops(redis_url):
    """Issue 11 §3: retention beyond maxlen never drops an entry a group still needs; only the
    memory bound (max_retained) does, and it counts them and dead-letters the pending ones."""
    stream = f"test:{uuid.uuid4().hex}"
    bus = RedisStreamBus(redis_client(redis_url), stream=stream, dead_letter_stream=f"{stream}:dead", maxlen=10,
                         max_retained=40, claim_idle_ms=60_000, owns_client=True)
    try:
        await bus.read("fast", "f1", block_ms=0)  # two groups exist before anything is published
        await bus.read("stopped", "s1", block_ms=0)
        for i in range(30):
            await bus.publish(CallStarted(call_id=f"c{i}", seq=0))
        fast = await bus.read("fast", "f1", count=100, block_ms=0)
        await bus.ack("fast", [d.id for d in fast])
        assert await bus.trim() == (0, 0, 0)  # "stopped" has read nothing: all 30 stay
        held = await bus.read("stopped", "s1", count=5, block_ms=0)  # read, not acked
        assert await bus.trim() == (0, 0, 0)
        await bus.ack("stopped", [d.id for d in held[:3]])
        assert await bus.trim() == (3, 0, 0)  # exactly the entries both groups acked
        rest = await bus.read("stopped", "s1", count=100, block_ms=0)
        assert [d.event.call_id for d in rest] == [f"c{i}" for i in range(5, 30)]
        await bus.ack("stopped", [d.id for d in held + rest])
        assert await bus.trim() == (17, 0, 0) and await bus.client.xlen(stream) == 10  # down to maxlen
        for i in range(30, 80):
            await bus.publish(CallStarted(call_id=f"c{i}", seq=0))
        # the 10 acked ones go first; of the 50 nobody read, the memory bound keeps 40
        assert await bus.trim() == (10, 10, 0)
        assert bus.stats()["trimmed_unconsumed"] == 10
        kept = await bus.read("fast", "f1", count=100, block_ms=0)
        assert [d.event.call_id for d in kept] == [f"c{i}" for i in range(40, 80)]
    finally:
        await bus.client.delete(stream, f"{stream}:dead")
        await bus.close()


async def test_acked_entries_and_dead_letters_older_than_the_retention_are_trimmed_below_maxlen(redis_url):
    """events.retention_hours: an idle deployment must not keep its callers' words for months
    because maxlen is never reached; entries a group still needs stay whatever their age."""
    from callray.events.bus import stream_fields

    stream = f"test:{uuid.uuid4().hex}"
    bus = RedisStreamBus(redis_client(redis_url), stream=stream, dead_letter_stream=f"{stream}:dead",
                         maxlen=1000, retention_s=3600, owns_client=True)
    try:
        await bus.read("g", "c", block_ms=0)
        old_ms = int((time.time() - 7200) * 1000)  # two hours ago: stream ids are times
        for i in range(6):
            await bus.client.xadd(stream, stream_fields(CallStarted(call_id=f"old{i}", seq=0)), id=f"{old_ms + i}-0")
        await bus.client.xadd(f"{stream}:dead", {"event": b"{}", "reason": "test"}, id=f"{old_ms}-0")
        for i in range(3):
            await bus.publish(CallStarted(call_id=f"new{i}", seq=0))
        taken = await bus.read("g", "c", count=4, block_ms=0)  # old0..old3 read; old4, old5 not yet
        await bus.ack("g", [d.id for d in taken])  # (an ack trims too, at most once a second)
        await bus.trim()
        counts = bus.stats()
        assert counts["trimmed"] == 4 and counts["dead_letters_expired"] == 1  # the acked old ones, the old letter
        assert counts["trimmed_unconsumed"] == counts["dead_letters_trimmed"] == 0  # no forced drop
        rest = await bus.read("g", "c", count=100, block_ms=0)
        assert [d.event.call_id for d in rest] == ["old4", "old5", "new0", "new1", "new2"]
        await bus.ack("g", [d.id for d in rest])
        await bus.trim()
        assert bus.stats()["trimmed"] == 6 and await bus.client.xlen(stream) == 3  # nothing recent goes
    finally:
        await bus.client.delete(stream, f"{stream}:dead")
        await bus.close()


async def test_a_quiet_stream_ages_out_with_no_event_to_trigger_a_trim(redis_url, monkeypatch):
    """Trims ride on reads and acks; when calls stop, the consumers' periodic trim still applies
    the age bound to what they acknowledged."""
    from callray.consumers import runner

    monkeypatch.setattr(runner, "STREAM_TRIM_INTERVAL_S", 0.1)
    stream = f"test:{uuid.uuid4().hex}"
    bus = RedisStreamBus(redis_client(redis_url), stream=stream, dead_letter_stream=f"{stream}:dead",
                         maxlen=1000, retention_s=1.0, owns_client=True)
    seen: list[str] = []

    class Recorder:  # a Consumer (callray.consumers)
        kind, linger_s = "analytics", 0.0

        async def handle(self, event) -> None:
            seen.append(event.call_id)

        async def flush(self) -> None:
            pass

        def periodic(self) -> tuple[()]:
            return ()

    stop = asyncio.Event()
    consuming = asyncio.create_task(runner.run_consumers(bus, {"analytics": Recorder()}, "quiet", stop))
    try:
        for i in range(5):
            await bus.publish(CallStarted(call_id=f"c{i}", seq=0))
        await until(lambda: len(seen) == 5)
        assert await bus.client.xlen(stream) == 5  # acked, but young
        await until(lambda: bus.stats()["trimmed"] == 5, timeout=5)
        assert await bus.client.xlen(stream) == 0
    finally:
        stop.set()
        await asyncio.wait_for(consuming, 5)
        await bus.client.delete(stream, f"{stream}:dead")
        await bus.close()


async def test_pending_entries_the_memory_bound_removed_are_dead_lettered_not_lost_silently(redis_url):
    stream = f"test:{uuid.uuid4().hex}"
    bus = RedisStreamBus(redis_client(redis_url), stream=stream, dead_letter_stream=f"{stream}:dead", maxlen=2,
                         max_retained=4, claim_idle_ms=100, owns_client=True)
    try:
        for i in range(6):
            await bus.publish(CallStarted(call_id=f"c{i}", seq=0))
        taken = await bus.read("g", "dead-consumer", count=6, block_ms=0)  # read, then the consumer dies
        assert len(taken) == 6
        assert (await bus.trim())[1] == 2  # c0, c1 were pending: forced out by max_retained
        await asyncio.sleep(0.15)
        again = await bus.read("g", "heir", count=10, block_ms=0)
        assert sorted(d.event.call_id for d in again) == ["c2", "c3", "c4", "c5"]
        dead = await bus.dead_letters()
        assert sorted(d["original_id"] for d in dead) == sorted(d.id for d in taken[:2])
        assert all("max_retained" in d["reason"] for d in dead)
    finally:
        await bus.client.delete(stream, f"{stream}:dead")
        await bus.close()


async def test_memory_bus_trims_only_acked_entries_beyond_maxlen():
    bus = MemoryBus(maxlen=2, max_retained=6)
    await bus.read("g", "c", block_ms=0)
    for i in range(5):
        await bus.publish(CallStarted(call_id=f"c{i}", seq=0))
    first = await bus.read("g", "c", count=2, block_ms=0)
    await bus.ack("g", [first[0].id])
    await bus.publish(CallStarted(call_id="c5", seq=0))
    assert bus.stats()["trimmed"] == 1  # only c0 was acked
    assert [d.event.call_id for d in await bus.read("g", "c", count=10, block_ms=0)] == ["c2", "c3", "c4", "c5"]
    for i in range(6, 12):
        await bus.publish(CallStarted(call_id=f"c{i}", seq=0))
    assert bus.stats()["trimmed_unconsumed"] == 5  # 11 held, bound 6
    await bus.close()


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_tail_after_recent_sees_every_later_event_once(backend, redis_bus):
    """The live view replays ``recent`` events, then follows from their position: no event
    published in between may be missed or seen twice."""
    bus = redis_bus if backend == "redis" else MemoryBus()
    for i in range(5):
        await bus.publish(CallStarted(call_id=f"old{i}", seq=1))
    history, position = await bus.recent(3)
    assert [e.call_id for e in history] == ["old2", "old3", "old4"]
    await bus.publish(CallStarted(call_id="between", seq=1))  # after recent, before the tail starts
    seen: list[str] = []

    async def follow() -> None:
        async for event in bus.tail(position):
            seen.append(event.call_id)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    await bus.publish(CallStarted(call_id="later", seq=1))
    await until(lambda: len(seen) >= 2, timeout=5)
    await asyncio.sleep(0.1)
    task.cancel()
    assert seen == ["between", "later"]
    empty = MemoryBus() if backend == "memory" else RedisStreamBus(bus.client, stream=f"empty:{uuid.uuid4().hex}")
    assert (await empty.recent(10))[0] == []
