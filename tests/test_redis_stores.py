"""Redis state store and response cache against a real redis-server (the conftest fixture)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from callray.sim.local import free_port
from callray.stores.base import (
    CallFencedError, CallState, ResponseCache, StaleStateError, StateStore, StoreUnavailableError, TurnRecord,
)
from callray.stores.memory import MemoryStateStore
from callray.stores.redis import RedisResponseCache, RedisStateStore
from callray.stores.redis_client import RedisConfigError, redis_client


def new_call(**fields) -> CallState:
    return CallState(call_id=f"test-{uuid.uuid4().hex}", agent="support", **fields)


@pytest.fixture
async def store(redis_url):
    store = await RedisStateStore.connect(redis_url, ttl_s=60)
    yield store
    await store.close()


@pytest.fixture
async def cache(redis_url):
    cache = await RedisResponseCache.connect(redis_url, ttl_s=60, prefix=f"test-cache-{uuid.uuid4().hex}:")
    yield cache
    await cache.close()


async def test_backends_satisfy_the_protocols(store, cache):
    assert isinstance(store, StateStore)
    assert isinstance(cache, ResponseCache)


async def test_save_load_round_trip(store):
    state = new_call(greeted=True, latest_response_id=2, agent_state={"node": "billing", "n": [1, 2]})
    state.turns.append(TurnRecord(response_id=1, user="hi", agent="Hello! How can I help?"))
    assert await store.save(state) == 1
    assert state.version == 1
    loaded = await store.load(state.call_id)
    assert loaded == state
    assert await store.load(f"missing-{uuid.uuid4().hex}") is None


async def test_versions_increment_on_every_save(store):
    state = new_call()
    versions = []
    for i in range(3):
        state.latest_response_id = i
        versions.append(await store.save(state))
    assert versions == [1, 2, 3]
    loaded = await store.load(state.call_id)
    assert (loaded.version, loaded.latest_response_id) == (3, 2)


async def test_stale_save_from_an_old_host_is_refused(store, redis_url):
    state = new_call()
    await store.save(state)
    other = await RedisStateStore.connect(redis_url)
    try:
        old_host = await store.load(state.call_id)
        new_host = await other.load(state.call_id)
        new_host.latest_response_id = 7
        assert await other.save(new_host) == 2
        old_host.latest_response_id = 3
        with pytest.raises(StaleStateError) as err:
            await store.save(old_host)
        assert (err.value.expected, err.value.found) == (1, 2)
        assert old_host.version == 1
        fresh = CallState(call_id=state.call_id)  # a host that never loaded it
        with pytest.raises(StaleStateError):
            await store.save(fresh)
        stored = await store.load(state.call_id)
        assert (stored.version, stored.latest_response_id) == (2, 7)
    finally:
        await other.close()


async def test_saves_asked_for_together_go_in_one_pipeline_and_each_gets_its_own_reply(store):
    """Group commit: saves asked for together go in one pipeline; a stale one among them fails
    alone."""
    calls = [new_call() for _ in range(30)]
    for state in calls:
        await store.save(state)
    stale = calls[7].model_copy(update={"version": 0})
    for i, state in enumerate(calls):
        state.latest_response_id = i
    before = (store._saves.round_trips, store._saves.runs)
    replies = await asyncio.gather(*(store.save(state) for state in calls), store.save(stale), return_exceptions=True)
    assert replies[:30] == [2] * 30
    assert isinstance(replies[30], StaleStateError) and (replies[30].expected, replies[30].found) == (0, 2)
    round_trips, runs = store._saves.round_trips - before[0], store._saves.runs - before[1]
    assert (runs, round_trips) == (31, 1)  # asked for in one loop iteration: one pipeline
    for i, state in enumerate(calls):
        loaded = await store.load(state.call_id)
        assert (loaded.version, loaded.latest_response_id) == (2, i)


async def test_a_batch_after_redis_forgot_the_save_script_still_lands(store, redis_url):
    calls = [new_call(latest_response_id=i) for i in range(10)]
    admin = redis_client(redis_url)
    try:
        await admin.script_flush()
    finally:
        await admin.aclose()
    assert await asyncio.gather(*(store.save(state) for state in calls)) == [1] * 10
    assert [(await store.load(state.call_id)).latest_response_id for state in calls] == list(range(10))


async def test_a_save_cancelled_while_it_waits_for_its_batch_is_not_sent(store):
    calls = [new_call() for _ in range(5)]
    saves = [asyncio.ensure_future(store.save(state)) for state in calls]
    await asyncio.sleep(0)  # the first is in flight, the others wait
    saves[3].cancel()
    replies = await asyncio.gather(*saves, return_exceptions=True)
    assert isinstance(replies[3], asyncio.CancelledError)
    assert [r for i, r in enumerate(replies) if i != 3] == [1] * 4
    assert await store.load(calls[3].call_id) is None
    assert [(await store.load(state.call_id)).version for i, state in enumerate(calls) if i != 3] == [1] * 4


async def test_saves_waiting_on_an_unreachable_redis_all_fail_as_unavailable():
    store = RedisStateStore(redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2))
    try:
        replies = await asyncio.wait_for(asyncio.gather(*(store.save(new_call()) for _ in range(8)),
                                                        return_exceptions=True), timeout=10)
        assert all(isinstance(r, StoreUnavailableError) for r in replies), replies
    finally:
        await store.client.aclose()


async def test_ttl_is_set_refreshed_and_expires(redis_url):
    store = await RedisStateStore.connect(redis_url, ttl_s=30)
    try:
        state = new_call()
        await store.save(state)
        key = store.key(state.call_id)
        assert 0 < await store.client.pttl(key) <= 30_000
        await store.client.pexpire(key, 2_000)
        await store.claim(state.call_id, "replica-a")
        assert await store.client.pttl(key) > 2_000
        await store.client.pexpire(key, 2_000)
        state.epoch = 1
        await store.save(state)
        assert await store.client.pttl(key) > 2_000
    finally:
        await store.close()

    short = await RedisStateStore.connect(redis_url, ttl_s=0.2)
    try:
        state = new_call()
        await short.save(state)
        await asyncio.sleep(0.5)
        assert await short.load(state.call_id) is None
        state.version = 0  # expired: the call starts again from version 0
        assert await short.save(state) == 1
    finally:
        await short.close()


async def test_delete(store):
    state = new_call()
    await store.save(state)
    await store.delete(state.call_id)
    assert await store.load(state.call_id) is None
    assert await store.owner(state.call_id) is None


async def test_wrong_url_fails_at_start_naming_it():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisConfigError, match="REDIS_URL") as err:
        await RedisStateStore.connect(url)
    assert url in str(err.value)
    with pytest.raises(RedisConfigError, match="CACHE_URL") as err:
        await RedisResponseCache.connect(url, setting="CACHE_URL")
    assert url in str(err.value)
    with pytest.raises(RedisConfigError, match="not a valid Redis URL"):
        await RedisStateStore.connect("http://nope")


async def test_redis_errors_never_show_the_password():
    secret = "hunter2-s3cret"
    for url in (f"redis://:{secret}@127.0.0.1:{free_port()}/0", f"http://user:{secret}@nope"):
        with pytest.raises(RedisConfigError) as err:
            await RedisStateStore.connect(url)
        message = str(err.value)
        assert "redis.url" in message and url.split("@")[1] in message, message  # names the setting and the host
        assert secret not in message, message


async def test_state_survives_a_redis_restart(store, redis_server):
    state = new_call(latest_response_id=4)
    await store.save(state)
    try:
        redis_server.restart()
    finally:
        if redis_server.proc is None:
            redis_server.start()
    loaded = await store.load(state.call_id)  # same client: the pool reconnects by itself
    assert (loaded.version, loaded.latest_response_id) == (1, 4)
    loaded.latest_response_id = 5
    assert await store.save(loaded) == 2  # the Lua script is reloaded after the restart


async def test_cache_hit_miss_and_stats(cache):
    assert await cache.get("support", "v1", "what are your hours") is None
    await cache.put("support", "v1", "what are your hours", ["We're open nine to five.", "Anything else?"])
    assert await cache.get("support", "v1", "what are your hours") == ["We're open nine to five.", "Anything else?"]
    assert await cache.get("support", "v1", "what are your hours") is not None
    assert cache.stats() == {"support": {"hits": 2, "misses": 1, "errors": 0}}


async def test_cache_entries_expire(redis_url):
    cache = RedisResponseCache(redis_client(redis_url), ttl_s=0.2, prefix=f"test-cache-{uuid.uuid4().hex}:")
    try:
        await cache.put("support", "v1", "hello", ["Hi!"])
        assert await cache.get("support", "v1", "hello") == ["Hi!"]
        await asyncio.sleep(0.5)
        assert await cache.get("support", "v1", "hello") is None
    finally:
        await cache.close()
        await cache.client.aclose()


async def test_cache_isolates_agents_and_versions(cache):
    await cache.put("support", "v1", "hello", ["Support here."])
    await cache.put("sales", "v1", "hello", ["Sales here."])
    assert await cache.get("support", "v1", "hello") == ["Support here."]
    assert await cache.get("sales", "v1", "hello") == ["Sales here."]
    assert await cache.get("support", "v2", "hello") is None
    assert await cache.get("billing", "v1", "hello") is None
    # separators inside names cannot make two different (agent, version) pairs collide
    await cache.put("a:b", "c", "k", ["one"])
    assert await cache.get("a", "b:c", "k") is None
    assert cache.stats()["support"] == {"hits": 1, "misses": 1, "errors": 0}
    assert cache.stats()["billing"] == {"hits": 0, "misses": 1, "errors": 0}


async def test_put_many_precaches(cache):
    items = {f"question {i}": [f"answer {i}", "anything else?"] for i in range(20)}
    assert await cache.put_many("support", "v3", items) == 20
    for key, phrases in items.items():
        assert await cache.get("support", "v3", key) == phrases
    assert await cache.put_many("support", "v3", {}) == 0
    assert cache.stats()["support"]["hits"] == 20


async def test_cache_never_raises_when_redis_is_unreachable():
    cache = RedisResponseCache(redis_client(f"redis://127.0.0.1:{free_port()}/0"))
    try:
        assert await cache.get("support", "v1", "hello") is None
        await cache.put("support", "v1", "hello", ["Hi!"])
        assert await cache.put_many("support", "v1", {"a": ["b"]}) == 0
        assert cache.stats() == {"support": {"hits": 0, "misses": 1, "errors": 3}}
    finally:
        await cache.close()
        await cache.client.aclose()


async def test_save_script_accepts_a_replay_of_its_own_write_only(store):
    """A retry after a lost reply must not report the save as stale; another write still is."""
    state = new_call()
    key, payload = store.key(state.call_id), state.model_copy(update={"version": 1}).model_dump_json()
    assert await store._save_script(keys=[key], args=[0, payload, 60_000, 0]) == [1, 1]
    assert await store._save_script(keys=[key], args=[0, payload, 60_000, 0]) == [1, 1]
    other = state.model_copy(update={"version": 1, "latest_response_id": 9}).model_dump_json()
    assert await store._save_script(keys=[key], args=[0, other, 60_000, 0]) == [0, 1]
    assert (await store.load(state.call_id)).version == 1


@pytest.fixture(params=["memory", "redis"])
async def either_store(request, redis_url):
    if request.param == "memory":
        yield MemoryStateStore()
        return
    store = await RedisStateStore.connect(redis_url, ttl_s=60)
    yield store
    await store.close()


async def test_a_claim_unless_held_leaves_a_call_another_owner_holds(either_store):
    """A reconnect first asks the holder to let go; a call nobody else holds (a new call, or this
    owner's own) is claimed in the same round trip."""
    store = either_store
    call_id = new_call().call_id
    first = await store.claim(call_id, "replica-a", unless_held=True)  # new: claimed at once
    assert first.epoch == 1 and first.previous_owner is None
    again = await store.claim(call_id, "replica-a", unless_held=True)  # its own: claimed again
    assert again.epoch == 2 and again.previous_owner == "replica-a"
    held = await store.claim(call_id, "replica-b", unless_held=True)
    assert (held.epoch, held.previous_owner, held.state) == (0, "replica-a", None)
    assert await store.owner(call_id) == ("replica-a", 2)  # nothing changed: replica a can still save
    await store.save(CallState(call_id=call_id, epoch=2))
    taken = await store.claim(call_id, "replica-b")  # after replica a let go
    assert taken.epoch == 3 and taken.previous_owner == "replica-a" and taken.state.version == 1


async def test_a_claim_bumps_the_epoch_and_fences_the_older_activation(either_store):
    """Newest socket wins across replicas: a save under the epoch a newer claim replaced is refused."""
    store = either_store
    call_id = new_call().call_id
    first = await store.claim(call_id, "replica-a")
    assert first.state is None and first.previous_owner is None and await store.owner(call_id) == ("replica-a", 1)
    state = CallState(call_id=call_id, epoch=first.epoch)
    await store.save(state)
    second = await store.claim(call_id, "replica-b")
    assert second.epoch == first.epoch + 1 and second.previous_owner == "replica-a"
    assert second.state is not None and second.state.version == 1 and second.state.epoch == second.epoch
    with pytest.raises(CallFencedError) as err:
        await store.save(state)  # replica a still thinks it owns the call
    assert err.value.found == second.epoch
    assert (await store.load(call_id)).version == 1  # nothing of the fenced writer landed
    newer = second.state
    newer.turns.append(TurnRecord(response_id=1, user="hi", agent="hello"))
    assert await store.save(newer) == 2
    assert await store.owner(call_id) == ("replica-b", second.epoch)
