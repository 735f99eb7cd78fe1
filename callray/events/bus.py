"""The event bus: calls emit events, background consumers read them in groups.

Two backends behind one interface. ``RedisStreamBus`` (event-driven architecture) is
at-least-once: one Redis Stream, one consumer group per consumer kind, unacked entries are
re-read after a restart or taken over from dead consumers, and entries that keep failing (or
cannot be decoded) move to a dead-letter stream instead of blocking the group.
``MemoryBus`` (single and distributed architectures) has the same API in process memory.

``emit`` only appends to a bounded local buffer (never blocks, never raises, counts drops) and
a background task publishes the buffer. With Redis state a live call's events do not take this
path: the script that writes the call's checkpoint appends them to the stream (the outbox, in
``stores/redis.py``); webhooks, escalations and the memory bus do.

Retention never drops an entry a consumer group still needs: the oldest entries beyond
``maxlen`` (kept so analytics can rebuild after a restart) are trimmed only once every group
has acknowledged them. Only ``max_retained``, the memory bound, drops unacknowledged entries,
and each such entry is counted (``trimmed_unconsumed``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Any, Callable, Protocol, runtime_checkable

from callray.events import Event
from callray.stores.redis_client import RECONNECT_BACKOFF

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One entry handed to a consumer: ack ``id`` once ``event`` is handled."""

    id: str
    event: Event
    deliveries: int


@runtime_checkable
class EventBus(Protocol):
    def emit(self, event: Event) -> None:
        """Buffer an event for publishing. Never blocks, never raises; drops (counted) when full.
        Call it from the event loop's thread; outside a running loop it only buffers."""

    async def publish(self, event: Event) -> str:
        """Publish now (bypassing the buffer); returns the entry id."""

    async def flush(self) -> None:
        """Publish everything buffered so far (raises StoreUnavailableError if that fails)."""

    async def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    async def read(self, group: str, consumer: str, count: int = 100, block_ms: int = 1000) -> list[Delivery]:
        """Entries for ``consumer`` in ``group``: its own unacked ones first after a (re)start,
        then ones taken over from dead consumers, then new ones (waiting up to ``block_ms``)."""

    async def ack(self, group: str, ids: list[str]) -> int: ...

    async def recent(self, count: int) -> tuple[list[Event], str]:
        """The last ``count`` events, oldest first, and the position after them for ``tail``."""

    def tail(self, after: str | None = None) -> AsyncIterator[Event]:
        """Every event published after ``after`` (a position from ``recent``; default: from now),
        as it comes, outside any consumer group (a live view; nothing is acknowledged, nothing
        redelivered)."""


class TappedSink:
    """An event sink that shows each event to ``observe`` (metrics) on its way to ``inner``."""

    def __init__(self, inner: Any | None, observe: Callable[[Event], None]):
        self.inner, self.observe = inner, observe

    def emit(self, event: Event) -> None:
        try:
            self.observe(event)
        finally:
            if self.inner is not None:
                self.inner.emit(event)

    def observer(self) -> TappedSink:
        """A sink that only observes: for events that reach the bus another way (with the
        call's checkpoint, when the state store carries them)."""
        return TappedSink(None, self.observe)


class _BufferedEmitter:
    """The shared producer side: bounded buffer + lazily started background flusher."""

    def __init__(self, buffer_size: int, flush_batch: int):
        if buffer_size < 1 or flush_batch < 1:
            raise ValueError(f"buffer_size ({buffer_size}) and flush_batch ({flush_batch}) must be >= 1")
        self.buffer_size, self.flush_batch = buffer_size, flush_batch
        self._buffer: deque[Event] = deque()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._counts = {"emitted": 0, "dropped": 0, "published": 0, "publish_errors": 0, "dead_lettered": 0,
                        "trimmed": 0, "trimmed_unconsumed": 0, "dead_letters_trimmed": 0,
                        "dead_letters_expired": 0}
        self._last_error = ""

    async def _publish_many(self, events: list[Event]) -> None:
        raise NotImplementedError

    def emit(self, event: Event) -> None:
        try:
            if self._closed or len(self._buffer) >= self.buffer_size:
                self._counts["dropped"] += 1
                return
            self._buffer.append(event)
            self._counts["emitted"] += 1
            self._start_flusher()
        except Exception as exc:  # emit must never raise into a live turn
            self._counts["dropped"] += 1
            self._last_error = repr(exc)

    def _start_flusher(self) -> None:
        """Start (or restart, e.g. in a new loop) the flusher; without a running loop, just buffer."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._lock = asyncio.Lock()
            self._task = loop.create_task(self._run_flusher(), name=f"{type(self).__name__}-flusher")
        assert self._wake is not None
        self._wake.set()

    async def _run_flusher(self) -> None:
        failures = 0
        wake = self._wake
        assert wake is not None
        while True:
            if not self._buffer:
                wake.clear()
                await wake.wait()
                continue
            try:
                await self._drain_once()
                failures = 0
            except Exception:
                await asyncio.sleep(RECONNECT_BACKOFF.compute(failures))
                failures += 1

    async def _drain_once(self) -> bool:
        """Publish one batch under the lock; on failure put it back (oldest first) and raise."""
        async with self._lock:
            if not self._buffer:
                return False
            batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), self.flush_batch))]
            try:
                await self._publish_many(batch)
            except Exception as exc:
                self._buffer.extendleft(reversed(batch))
                self._counts["publish_errors"] += 1
                self._last_error = repr(exc)
                raise
            self._counts["published"] += len(batch)
            return True

    async def flush(self) -> None:
        while await self._drain_once():
            pass

    async def _close_emitter(self) -> None:
        self._closed = True
        try:
            await self.flush()
        except Exception as exc:
            log.warning("event bus closed with %d events unpublished: %r", len(self._buffer), exc)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, RuntimeError):
                pass
        self._task = None

    def stats(self) -> dict[str, Any]:
        return {**self._counts, "buffered": len(self._buffer), "last_error": self._last_error}


def stream_fields(event: Event) -> dict[str, str]:
    """A stream entry's two fields for ``event``: its type (readable at a glance with XRANGE) and
    its JSON. The bus's producers and the state store's save script (the outbox) both write these."""
    return {"type": event.type, "event": event.model_dump_json()}


def retention_bound(maxlen: int, max_retained: int | None) -> int:
    max_retained = max_retained or 10 * maxlen
    if maxlen < 1 or max_retained < maxlen:
        raise ValueError(f"maxlen ({maxlen}) must be >= 1 and max_retained ({max_retained}) >= maxlen")
    return max_retained
