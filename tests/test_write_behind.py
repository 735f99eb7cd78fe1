"""WriteBehindStore: calls keep talking while Redis is down, and nothing newer is overwritten."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from callray.stores.base import CallState, StaleStateError, StateStore, StoreUnavailableError, TurnRecord
from callray.stores.memory import MemoryStateStore
from callray.stores.redis import RedisStateStore
from callray.stores.write_behind import WriteBehindStore


def new_call() -> CallState:
    return CallState(call_id=f"test-wb-{uuid.uuid4().hex}", agent="support")


def add_turn(state: CallState, n: int) -> None:
    state.latest_response_id = n
    state.turns.append(TurnRecord(response_id=n, user=f"question {n}", agent=f"answer {n}"))


class FlakyStore(MemoryStateStore):
    """A backend whose failures the test switches: down, or writes that land but lose the reply."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.lose_replies = False
        self.closed = False

    async def load(self, call_id: str) -> CallState | None:
        if self.down:
            raise StoreUnavailableError("flaky store is down")
        return await super().load(call_id)

    async def save(self, state: CallState, events=None) -> int:
        if self.down:
            raise StoreUnavailableError("flaky store is down")
        version = await super().save(state, events)
        if self.lose_replies:
            raise StoreUnavailableError("flaky store: the write landed but the reply was lost")
        return version

    async def close(self) -> None:
        self.closed = True  # keep the data: tests read it after closing the wrapper


@pytest.fixture
def running_redis(redis_server):
    """The session's redis-server, guaranteed to be running again after the test."""
    try:
        yield redis_server
    finally:
        if redis_server.proc is None:
            redis_server.start()


async def test_is_a_state_store():
    assert isinstance(WriteBehindStore(MemoryStateStore()), StateStore)


async def test_saves_pass_through_while_the_store_is_up():
    inner = MemoryStateStore()
    store = WriteBehindStore(inner)
    state = new_call()
    assert [await store.save(state) for _ in range(3)] == [1, 2, 3]
    assert (await inner.load(state.call_id)).version == 3
    assert store.stats() == {"pending": 0, "deferred": 0, "write_retries": 0, "written_late": 0, "write_failures": 0}
    stale = state.model_copy(update={"version": 1})
    with pytest.raises(StaleStateError):
        await store.save(stale)


async def test_redis_outage_keeps_calls_talking_then_writes_the_latest(running_redis, redis_url):
    store = WriteBehindStore(await RedisStateStore.connect(redis_url), base_delay_s=0.02, max_delay_s=0.2)
    state = new_call()
    add_turn(state, 1)
    assert await store.save(state) == 1
    running_redis.stop()
    for n in (2, 3, 4):
        add_turn(state, n)
        assert await store.save(state) == n  # answered from memory, versions keep counting
    assert state.version == 4
    stats = store.stats()
    assert (stats["pending"], stats["deferred"]) == (1, 3)
    assert stats["write_retries"] >= 1
    assert await store.flush(timeout=0.3) is False  # Redis is still down
    assert (await store.load(state.call_id)).latest_response_id == 4  # the dirty copy

    running_redis.start()
    assert await store.flush(timeout=10) is True
    assert store.stats()["pending"] == 0 and store.written_late == 1
    fresh = await RedisStateStore.connect(redis_url)
    try:
        stored = await fresh.load(state.call_id)
        assert [t.response_id for t in stored.turns] == [1, 2, 3, 4]
        assert stored.version == 2  # one delayed write on top of version 1

        # the owner continues with the version it holds; the wrapper maps it onto the store's
        assert (await store.load(state.call_id)).version == 4
        add_turn(state, 5)
        assert await store.save(state) == 3
        stored = await fresh.load(state.call_id)
        assert (stored.version, stored.latest_response_id) == (3, 5)
        assert await store.save(state) == 4
    finally:
        await fresh.close()
        await store.close()


async def test_delayed_write_never_overwrites_a_newer_owner(running_redis, redis_url):
    old_host = WriteBehindStore(await RedisStateStore.connect(redis_url), base_delay_s=60, max_delay_s=60)
    state = new_call()
    add_turn(state, 1)
    await old_host.save(state)
    running_redis.stop()
    add_turn(state, 2)
    assert await old_host.save(state) == 2  # deferred
    async with asyncio.timeout(10):
        while old_host.write_retries < 2:  # the background attempt failed too: it sleeps a minute
            await asyncio.sleep(0.01)
    running_redis.start()

    new_host = await RedisStateStore.connect(redis_url)
    try:
        taken = await new_host.load(state.call_id)
        assert taken.version == 1
        taken.latest_response_id = 99
        assert await new_host.save(taken) == 2

        assert await old_host.flush(timeout=10) is True  # the delayed write is attempted and loses
        assert old_host.write_failures == 1 and old_host.pending == 0
        stored = await new_host.load(state.call_id)
        assert (stored.version, stored.latest_response_id) == (2, 99)
        add_turn(state, 3)
        with pytest.raises(StaleStateError):
            await old_host.save(state)  # the old host learns it lost the call
        stored = await new_host.load(state.call_id)
        assert stored.latest_response_id == 99
    finally:
        await new_host.close()
        await old_host.close()


async def test_latest_state_replaces_older_dirty_ones():
    inner = FlakyStore()
    store = WriteBehindStore(inner, base_delay_s=0.01, max_delay_s=0.05)
    state = new_call()
    await store.save(state)
    inner.down = True
    for n in range(1, 6):
        add_turn(state, n)
        await store.save(state)
    assert store.pending == 1 and store.deferred == 5
    inner.down = False
    assert await store.flush(timeout=5)
    stored = await inner.load(state.call_id)
    assert (stored.version, stored.latest_response_id, len(stored.turns)) == (2, 5, 5)
    assert store.written_late == 1


async def test_a_write_that_landed_despite_an_error_is_recognised():
    inner = FlakyStore()
    store = WriteBehindStore(inner, base_delay_s=60, max_delay_s=60)
    state = new_call()
    add_turn(state, 1)
    inner.lose_replies = True
    assert await store.save(state) == 1  # it did land as version 1, but the reply was lost
    add_turn(state, 2)
    assert await store.save(state) == 2  # newer state, deferred
    inner.lose_replies = False
    assert await store.flush(timeout=5)
    assert store.write_failures == 0
    stored = await inner.load(state.call_id)
    assert (stored.version, stored.latest_response_id) == (2, 2)
    assert await store.save(state) == 3  # the owner's version matches the store's again


async def test_delete_drops_the_pending_write():
    inner = FlakyStore()
    store = WriteBehindStore(inner, base_delay_s=0.01, max_delay_s=0.05)
    state = new_call()
    await store.save(state)
    inner.down = True
    add_turn(state, 1)
    await store.save(state)
    inner.down = False
    await store.delete(state.call_id)
    assert store.pending == 0
    assert await store.flush(timeout=1)
    assert await inner.load(state.call_id) is None
    assert await store.load(state.call_id) is None


def test_works_across_event_loops():
    """Built outside any loop; the retry task starts in whichever loop saves."""
    inner = FlakyStore()
    store = WriteBehindStore(inner, base_delay_s=0.01, max_delay_s=0.05)
    state = new_call()

    async def save_while_down() -> None:
        inner.down = True
        add_turn(state, 1)
        await store.save(state)
        await asyncio.sleep(0.05)

    async def recover() -> bool:
        inner.down = False
        return await store.flush(timeout=5)

    asyncio.run(save_while_down())
    assert store.pending == 1
    assert asyncio.run(recover()) is True
    assert asyncio.run(inner.load(state.call_id)).latest_response_id == 1


async def test_close_flushes_what_it_can():
    inner = FlakyStore()
    store = WriteBehindStore(inner, base_delay_s=0.01, max_delay_s=0.05)
    state = new_call()
    inner.down = True
    add_turn(state, 1)
    await store.save(state)
    inner.down = False
    await store.close()
    assert inner.closed and store.pending == 0 and store.written_late == 1
    assert (await inner.load(state.call_id)).latest_response_id == 1
