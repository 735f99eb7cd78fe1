"""Build the state store, response cache and event sink a settings object asks for."""

from __future__ import annotations

from dataclasses import dataclass

from callray.settings import CallraySettings
from callray.stores.base import EventSink, ResponseCache, StateStore
from callray.stores.memory import MemoryEventSink, MemoryResponseCache, MemoryStateStore


@dataclass
class Stores:
    state: StateStore
    cache: ResponseCache | None
    events: EventSink

    async def close(self) -> None:
        await self.state.close()
        if self.cache is not None:
            await self.cache.close()
        close = getattr(self.events, "close", None)
        if close is not None:
            await close()


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
    events: EventSink
    if settings.events.backend == "redis_streams":
        from callray.bus import RedisStreamBus

        events = await RedisStreamBus.connect(settings.state.redis_url, buffer_size=settings.events.buffer)
    else:
        events = MemoryEventSink(max_events=settings.events.buffer)
    return Stores(state, cache, events)
