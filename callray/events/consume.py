"""``consume``: one consumer's loop over a bus (read, handle, flush, ack), for either backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable

from callray.events import Event
from callray.events.bus import EventBus
from callray.stores.redis_client import RECONNECT_BACKOFF

log = logging.getLogger(__name__)


Handler = Callable[[Event], Awaitable[Any]]


async def consume(
    bus: EventBus,
    group: str,
    consumer: str,
    handler: Handler,
    *,
    stop: asyncio.Event,
    flush: Callable[[], Awaitable[Any]] | None = None,
    linger_s: float = 0.0,
    batch: int = 100,
    block_ms: int = 1000,
    error_backoff_s: float = 0.5,
) -> None:
    """Read, handle and ack until ``stop`` is set. A handler that raises leaves its entry
    unacked: it is redelivered after ``claim_idle_ms`` and dead-lettered after
    ``max_deliveries``. Handlers must be idempotent on the event's identity.

    ``flush`` (optional) makes a batch's effects durable before it is acked. A flush that fails
    is the sink's failure (a database down, a disk full), not the events': it is retried with
    backoff before anything more is read, so the events wait in the stream instead of being
    redelivered towards the dead-letter stream; on ``stop`` they stay unacked and come back.
    ``linger_s`` waits after a batch that was not full so that the next one grows, for a consumer
    whose cost is per batch rather than per event; after a full batch (a backlog) it reads on at
    once, or it could never consume more than ``batch`` events per ``linger_s``."""
    while not stop.is_set():
        try:
            deliveries = await bus.read(group, consumer, batch, block_ms)
        except Exception as exc:
            log.warning("consumer %s/%s: read failed (%r); retrying", group, consumer, exc)
            try:
                await asyncio.wait_for(stop.wait(), error_backoff_s)
            except asyncio.TimeoutError:
                pass
            continue
        done: list[str] = []
        for delivery in deliveries:
            try:
                await handler(delivery.event)
                done.append(delivery.id)
            except Exception:
                log.exception(
                    "consumer %s/%s: handler failed on %s (%s, delivery %d)",
                    group, consumer, delivery.id, delivery.event.type, delivery.deliveries,
                )
        failures = 0
        while done and flush is not None:
            try:
                await flush()
                break
            except Exception as exc:
                log.warning("consumer %s/%s: storing %d events failed (%r); retrying before reading more",
                            group, consumer, len(done), exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECONNECT_BACKOFF.compute(failures)):
                        await stop.wait()
                failures += 1
                if stop.is_set():
                    done = []  # unacked: they come back to this consumer after a restart
        if done:
            try:
                await bus.ack(group, done)
            except Exception as exc:  # unacked entries come back; handlers are idempotent
                log.warning("consumer %s/%s: ack of %d entries failed: %r", group, consumer, len(done), exc)
        if linger_s and 0 < len(deliveries) < batch:  # a full batch means a backlog: read on at once
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(linger_s):
                    await stop.wait()
