"""Build the state store, response cache and event sink a settings object asks for."""

from __future__ import annotations

from dataclasses import dataclass

from callray.settings import CallraySettings
from callray.stores.base import ResponseCache, StateStore
from callray.bus import EventBus, MemoryBus
from callray.stores.memory import MemoryResponseCache, MemoryStateStore


@dataclass
class Stores:
    state: StateStore
    cache: ResponseCache | None
    events: EventBus

    async def close(self) -> None:
        await self.state.close()
        if self.cache is not None:
            await self.cache.close()
        await self.events.close()


async def build_stores(settings: CallraySettings) -> Stores:
    """Connect what the settings name; a Redis that does not answer fails here, naming its URL."""
    state: StateStore
    if settings.state.backend == "redis":
        from callray.stores.redis import RedisStateStore
        from callray.stores.write_behind import WriteBehindStore

        state = WriteBehindStore(await RedisStateStore.connect(settings.state.redis_url, ttl_s=settings.state.ttl_s))
    else:
        state = MemoryStateStore(ttl_s=settings.state.ttl_s)
    cache: ResponseCache | None = None
    if settings.cache.enabled:
        if settings.cache.backend == "redis":
            from callray.stores.redis import RedisResponseCache

            cache = await RedisResponseCache.connect(settings.state.redis_url, ttl_s=settings.cache.ttl_s)
        else:
            cache = MemoryResponseCache(ttl_s=settings.cache.ttl_s, max_entries=settings.cache.max_entries)
    return Stores(state, cache, await build_bus(settings))


async def build_bus(settings: CallraySettings) -> EventBus:
    """The event bus: Redis Streams (durable, shared) or a per-process memory bus."""
    events = settings.events
    if events.backend == "redis_streams":
        from callray.bus import RedisStreamBus

        return await RedisStreamBus.connect(
            settings.state.redis_url, stream=events.stream, maxlen=events.maxlen,
            dead_letter_stream=f"{events.stream}:dead", max_deliveries=events.max_deliveries,
            claim_idle_ms=events.claim_idle_ms, buffer_size=events.buffer)
    return MemoryBus(max_deliveries=events.max_deliveries, claim_idle_ms=events.claim_idle_ms,
                     buffer_size=events.buffer)
