"""Build the state store, response cache and event bus a settings object asks for, on one
Redis client when any of them uses Redis (the directory and the webhook dedupe share it)."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from callray.events.bus import EventBus
from callray.events.memory import MemoryBus
from callray.events.redis_streams import RedisStreamBus
from callray.settings import CallraySettings, RedisSettings
from callray.stores.base import ResponseCache, StateStore
from callray.stores.memory import MemoryResponseCache, MemoryStateStore


@dataclass
class Stores:
    state: StateStore
    cache: ResponseCache | None
    events: EventBus
    redis: aioredis.Redis | None = None

    async def close(self) -> None:
        await self.state.close()
        if self.cache is not None:
            await self.cache.close()
        await self.events.close()
        if self.redis is not None:
            await self.redis.aclose()


async def open_redis(settings: RedisSettings) -> aioredis.Redis:
    """The client of the ``redis`` section; a Redis that does not answer fails here, naming it."""
    from callray.stores.redis_client import connect_redis

    return await connect_redis(settings.url, timeout_s=settings.timeout_s, max_connections=settings.max_connections)


async def build_stores(settings: CallraySettings) -> Stores:
    """Connect what the settings name, on one Redis client when any of them uses Redis."""
    client = await open_redis(settings.redis) if settings.uses_redis else None
    events = build_bus(settings, client)
    state: StateStore
    if settings.state.backend == "redis":
        from callray.stores.redis import RedisStateStore
        from callray.stores.write_behind import WriteBehindStore

        # the outbox: with a Redis Stream bus, a call's events are written with its checkpoint
        stream = {"stream": events.stream, "stream_max": events.max_retained} if isinstance(events, RedisStreamBus) else {}
        state = WriteBehindStore(RedisStateStore(client, ttl_s=settings.state.ttl_s, **stream))
    else:
        state = MemoryStateStore(ttl_s=settings.state.ttl_s)
    cache: ResponseCache | None = None
    if settings.cache.enabled:
        if settings.cache.backend == "redis":
            from callray.stores.deadline import DeadlineCache
            from callray.stores.redis import RedisResponseCache

            cache = DeadlineCache(RedisResponseCache(client, ttl_s=settings.cache.ttl_s),
                                  lookup_deadline_s=settings.cache.lookup_deadline_ms / 1000,
                                  cooldown_s=settings.cache.cooldown_s)
        else:
            cache = MemoryResponseCache(ttl_s=settings.cache.ttl_s, max_entries=settings.cache.max_entries)
    return Stores(state, cache, events, client)


def build_bus(settings: CallraySettings, client: aioredis.Redis | None) -> EventBus:
    """The event bus: Redis Streams (durable, shared; needs ``client``) or a per-process memory bus."""
    events = settings.events
    if events.backend == "redis_streams":
        if client is None:
            raise ValueError("events.backend redis_streams needs a Redis client")
        return RedisStreamBus(
            client, stream=events.stream, maxlen=events.maxlen, dead_letter_stream=f"{events.stream}:dead",
            max_deliveries=events.max_deliveries, claim_idle_ms=events.claim_idle_ms,
            max_retained=events.max_retained, buffer_size=events.buffer,
            retention_s=events.retention_hours * 3600 if events.retention_hours else None)
    return MemoryBus(maxlen=events.maxlen, max_deliveries=events.max_deliveries, claim_idle_ms=events.claim_idle_ms,
                     max_retained=events.max_retained, buffer_size=events.buffer)
