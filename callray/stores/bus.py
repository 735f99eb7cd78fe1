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
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Any, Awaitable, Callable, Protocol, runtime_checkable

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from callray.events import Event, parse_event
from callray.stores.base import StoreUnavailableError
from callray.stores.redis_client import RECONNECT_BACKOFF, REDIS_SETTING, connect_redis

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

    def tail(self) -> AsyncIterator[Event]:
        """Every event published from now on, as it comes, outside any consumer group (a live
        view; nothing is acknowledged, nothing redelivered)."""


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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _check_retention(maxlen: int, max_retained: int | None) -> int:
    max_retained = max_retained or 10 * maxlen
    if maxlen < 1 or max_retained < maxlen:
        raise ValueError(f"maxlen ({maxlen}) must be >= 1 and max_retained ({max_retained}) >= maxlen")
    return max_retained


#: How often a producer trims the stream (seconds); between trims it grows by what was published.
TRIM_INTERVAL_S = 1.0

# Trim the stream to ARGV[1] entries, removing only entries every consumer group has acked
# (older than each group's oldest pending entry and last delivered one), and, with an age bound
# (ARGV[3]: the id of the oldest entry to keep, "0" for none), acked entries older than it; then,
# as the memory bound, to ARGV[2] entries whatever the groups, and the dead-letter stream KEYS[2]
# likewise (and by age). Atomic, so a group cannot move between the reading of its progress and
# the trim. Returns {trimmed, trimmed_unconsumed, dead_letters_trimmed, dead_letters_expired}.
_TRIM_SCRIPT = """
local keep, cap, oldest = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local function older(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if tonumber(ams) ~= tonumber(bms) then return tonumber(ams) < tonumber(bms) end
  return tonumber(aseq) < tonumber(bseq)
end
local dead_expired = 0
local function dead_trim()
  if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
  if oldest ~= '0' then dead_expired = redis.call('XTRIM', KEYS[2], 'MINID', oldest) end
  if redis.call('XLEN', KEYS[2]) > cap then return redis.call('XTRIM', KEYS[2], 'MAXLEN', cap) end
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, dead_trim(), dead_expired} end
local len = redis.call('XLEN', KEYS[1])
if len <= keep and oldest == '0' then return {0, 0, dead_trim(), dead_expired} end
local floor = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local need
  if tonumber(info['pending']) > 0 then
    need = redis.call('XPENDING', KEYS[1], info['name'])[2]
  else
    local ms, seq = string.match(info['last-delivered-id'], '^(%d+)-(%d+)$')
    need = ms .. '-' .. tostring(tonumber(seq) + 1)
  end
  if floor == nil or older(need, floor) then floor = need end
end
local trimmed = 0
if len > keep then
  if floor == nil then
    trimmed = redis.call('XTRIM', KEYS[1], 'MAXLEN', keep)
  else
    local done = redis.call('XRANGE', KEYS[1], '-', '(' .. floor, 'COUNT', len - keep)
    if #done > 0 then
      local ms, seq = string.match(done[#done][1], '^(%d+)-(%d+)$')
      trimmed = redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. tostring(tonumber(seq) + 1))
    end
  end
end
if oldest ~= '0' then
  local bound = oldest
  if floor ~= nil and older(floor, bound) then bound = floor end
  trimmed = trimmed + redis.call('XTRIM', KEYS[1], 'MINID', bound)
end
local forced = 0
if redis.call('XLEN', KEYS[1]) > cap then forced = redis.call('XTRIM', KEYS[1], 'MAXLEN', cap) end
local dead = dead_trim()
return {trimmed, forced, dead, dead_expired}
"""


class RedisStreamBus(_BufferedEmitter):
    """At-least-once events on one Redis Stream with a consumer group per consumer kind.

    Retention: at most ``maxlen`` acknowledged entries, none older than ``retention_s`` once
    acknowledged, and ``max_retained`` entries whatever the groups (see ``_TRIM_SCRIPT``)."""

    def __init__(
        self,
        client: aioredis.Redis,
        stream: str = "callray:events",
        maxlen: int = 100_000,
        dead_letter_stream: str = "callray:events:dead",
        max_deliveries: int = 5,
        claim_idle_ms: int = 30_000,
        *,
        max_retained: int | None = None,
        retention_s: float | None = None,
        buffer_size: int = 10_000,
        flush_batch: int = 500,
        group_start_id: str = "0",
        owns_client: bool = False,
    ):
        super().__init__(buffer_size, flush_batch)
        self.retention_s = retention_s
        if max_deliveries < 1 or claim_idle_ms < 1:
            raise ValueError(f"max_deliveries ({max_deliveries}) and claim_idle_ms ({claim_idle_ms}) must be >= 1")
        self.max_retained = _check_retention(maxlen, max_retained)
        self.client, self.stream, self.maxlen = client, stream, maxlen
        self._trim = client.register_script(_TRIM_SCRIPT)
        self._last_trim = 0.0
        self.dead_letter_stream, self.max_deliveries, self.claim_idle_ms = dead_letter_stream, max_deliveries, claim_idle_ms
        self.group_start_id, self._owns_client = group_start_id, owns_client
        self._groups: set[str] = set()
        self._pending_cursor: dict[tuple[str, str], str] = {}  # consumers still re-reading their own PEL
        self._claim_cursor: dict[str, str] = {}
        self._last_claim: dict[str, float] = {}
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._max_block_ms = max(0, int(timeout * 1000) - 200) if timeout else None

    @classmethod
    async def connect(cls, url: str, *, setting: str = REDIS_SETTING, **kwargs: Any) -> "RedisStreamBus":
        """Open a pooled client for ``url`` and fail at start (naming ``setting``) if Redis is down."""
        return cls(await connect_redis(url, setting), owns_client=True, **kwargs)

    # -- producing -------------------------------------------------------------------------
    async def _publish_many(self, events: list[Event]) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for event in events:
                    pipe.xadd(self.stream, stream_fields(event))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"event stream {self.stream!r}: {exc}") from exc
        if time.monotonic() - self._last_trim >= TRIM_INTERVAL_S:
            await self._trim_quietly()

    async def publish(self, event: Event) -> str:
        try:
            entry_id = await self.client.xadd(self.stream, stream_fields(event))
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"event stream {self.stream!r}: {exc}") from exc
        self._counts["published"] += 1
        return _text(entry_id)

    async def trim(self) -> tuple[int, int, int]:
        """Apply retention now: (trimmed, trimmed_unconsumed, dead_letters_trimmed); dead letters
        past the age bound are counted as ``dead_letters_expired``."""
        self._last_trim = time.monotonic()
        oldest = f"{int((time.time() - self.retention_s) * 1000)}-0" if self.retention_s else "0"
        trimmed, forced, dead, expired = (int(n) for n in await self._trim(
            keys=[self.stream, self.dead_letter_stream], args=[self.maxlen, self.max_retained, oldest]))
        self._counts["dead_letters_expired"] += expired
        self._counts["trimmed"] += trimmed
        self._counts["trimmed_unconsumed"] += forced
        self._counts["dead_letters_trimmed"] += dead
        if forced or dead:
            log.error("event stream %s over max_retained (%d): %d entries no consumer group had acknowledged "
                      "and %d dead letters dropped", self.stream, self.max_retained, forced, dead)
        return trimmed, forced, dead

    async def _trim_quietly(self) -> None:
        try:  # the batch is published: a failed trim must not make the flusher publish it again
            await self.trim()
        except (RedisError, OSError) as exc:
            log.warning("event stream %s: trim failed (retried on the next publish): %r", self.stream, exc)

    # -- consuming -------------------------------------------------------------------------
    async def _ensure_group(self, group: str) -> None:
        if group in self._groups:
            return
        try:
            await self.client.xgroup_create(self.stream, group, id=self.group_start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(group)

    async def read(self, group: str, consumer: str, count: int = 100, block_ms: int = 1000) -> list[Delivery]:
        try:
            return await self._read(group, consumer, count, block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise StoreUnavailableError(f"event stream {self.stream!r}: {exc}") from exc
            self._groups.discard(group)  # the stream or group vanished (e.g. Redis lost its data)
            return []
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"event stream {self.stream!r}: {exc}") from exc

    async def _read(self, group: str, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        await self._ensure_group(group)
        key = (group, consumer)
        cursor = self._pending_cursor.setdefault(key, "0")
        if cursor != "":
            reply = await self.client.xreadgroup(group, consumer, {self.stream: cursor}, count=count)
            entries = reply[0][1] if reply else []
            if entries:
                self._pending_cursor[key] = _text(entries[-1][0])
                return await self._deliver(group, consumer, entries, counted=False)
            self._pending_cursor[key] = ""  # own pending list exhausted: normal operation from now on
        claimed = await self._autoclaim(group, consumer, count)
        if claimed:
            return claimed
        block = block_ms if self._max_block_ms is None else min(block_ms, self._max_block_ms)
        reply = await self.client.xreadgroup(
            group, consumer, {self.stream: ">"}, count=count, block=block if block > 0 else None
        )
        entries = reply[0][1] if reply else []
        return await self._deliver(group, consumer, entries, counted=True)

    async def _autoclaim(self, group: str, consumer: str, count: int) -> list[Delivery]:
        """Take over entries idle longer than ``claim_idle_ms`` (dead consumers, failed handlers)."""
        now = time.monotonic()
        if now - self._last_claim.get(group, 0.0) < min(self.claim_idle_ms / 2000, 1.0):
            return []
        start = self._claim_cursor.get(group, "0-0")
        reply = await self.client.xautoclaim(
            self.stream, group, consumer, min_idle_time=self.claim_idle_ms, start_id=start, count=count
        )
        next_cursor, entries = _text(reply[0]), reply[1]
        self._claim_cursor[group] = next_cursor
        if next_cursor == "0-0":  # a full pass over the pending list: rest until the next interval
            self._last_claim[group] = now
        for entry_id in reply[2] if len(reply) > 2 else []:  # pending, but gone from the stream (max_retained)
            await self._dead_letter(group, _text(entry_id), None, "trimmed before it was acknowledged (max_retained)")
        return await self._deliver(group, consumer, entries, counted=False)

    async def _delivery_counts(self, group: str, consumer: str, ids: list[str]) -> list[int]:
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(self.stream, group, entry_id, entry_id, 1, consumername=consumer)
            replies = await pipe.execute()
        return [reply[0]["times_delivered"] if reply else 1 for reply in replies]

    async def _deliver(self, group: str, consumer: str, entries: list, *, counted: bool) -> list[Delivery]:
        """Decode entries; dead-letter poison and over-delivered ones; the rest become Deliveries."""
        if not entries:
            return []
        ids = [_text(entry_id) for entry_id, _ in entries]
        counts = [1] * len(ids) if counted else await self._delivery_counts(group, consumer, ids)
        out: list[Delivery] = []
        for entry_id, (_, fields), n in zip(ids, entries, counts):
            raw = (fields or {}).get(b"event")
            if n > self.max_deliveries:
                await self._dead_letter(group, entry_id, raw, f"delivered {n} times (max_deliveries={self.max_deliveries})")
                continue
            if raw is None:
                await self._dead_letter(group, entry_id, raw, "no 'event' field (trimmed by max_retained, or foreign)")
                continue
            try:
                event = parse_event(raw)
            except (ValidationError, ValueError) as exc:
                await self._dead_letter(group, entry_id, raw, f"undecodable: {str(exc)[:300]}")
                continue
            out.append(Delivery(entry_id, event, n))
        return out

    async def _pages(self, stream: str, batch: int) -> AsyncIterator[list]:
        """Every entry of ``stream``, oldest first, a page of ``batch`` at a time (one XRANGE
        each, so Redis is never blocked for long)."""
        start = "-"
        while True:
            try:
                entries = await self.client.xrange(stream, min=start, max="+", count=batch)
            except (RedisError, OSError) as exc:
                raise StoreUnavailableError(f"event stream {stream!r}: {exc}") from exc
            if entries:
                yield entries
            if len(entries) < batch:
                return
            start = "(" + _text(entries[-1][0])

    async def replay(self, batch: int = 1000) -> AsyncIterator[Event]:
        """Every retained event, oldest first (undecodable ones skipped): lets a consumer whose
        state is a projection of the stream, like analytics, rebuild it after a restart."""
        async for entries in self._pages(self.stream, batch):
            for entry_id, fields in entries:
                try:
                    yield parse_event((fields or {})[b"event"])
                except (KeyError, ValidationError, ValueError):
                    continue

    async def tail(self, block_ms: int = 1000) -> AsyncIterator[Event]:
        last = None
        while True:
            try:
                if last is None:  # from the current end: XREAD "$" anew each time would miss entries
                    newest = await self.client.xrevrange(self.stream, count=1)
                    last = _text(newest[0][0]) if newest else "0-0"
                block = block_ms if self._max_block_ms is None else min(block_ms, self._max_block_ms)
                reply = await self.client.xread({self.stream: last}, count=500, block=block)
            except (RedisError, OSError):
                await asyncio.sleep(1.0)  # Redis restarting: the view waits, nothing depends on it
                continue
            for entry_id, fields in (reply[0][1] if reply else []):
                last = _text(entry_id)
                try:
                    yield parse_event((fields or {})[b"event"])
                except (KeyError, ValidationError, ValueError):
                    continue

    async def _dead_letter(self, group: str, entry_id: str, raw: bytes | None, reason: str) -> None:
        """Move one entry to the dead-letter stream and ack it, atomically."""
        fields = {"event": raw or b"", "reason": reason, "original_id": entry_id, "group": group, "stream": self.stream}
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_letter_stream, fields)  # kept: only max_retained trims it, counted
            pipe.xack(self.stream, group, entry_id)
            await pipe.execute()
        self._counts["dead_lettered"] += 1
        log.warning("event %s (group %s) dead-lettered to %s: %s", entry_id, group, self.dead_letter_stream, reason)

    async def ack(self, group: str, ids: list[str]) -> int:
        if not ids:
            return 0
        try:
            acked = int(await self.client.xack(self.stream, group, *ids))
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"event stream {self.stream!r}: {exc}") from exc
        if time.monotonic() - self._last_trim >= TRIM_INTERVAL_S:  # calls' events come by their checkpoints,
            await self._trim_quietly()  # not through publish: consumers keep the stream trimmed too
        return acked

    async def erase(self, call_id: str, batch: int = 1000) -> int:
        """Delete every retained entry of one call from the stream and its dead letters, a page
        at a time; returns how many."""
        needle = b'"call_id":' + json.dumps(call_id).encode()  # as the event's JSON (model_dump_json) has it
        erased = 0
        for stream in (self.stream, self.dead_letter_stream):
            async for entries in self._pages(stream, batch):
                doomed = [entry_id for entry_id, fields in entries if needle in (fields or {}).get(b"event", b"")]
                if doomed:
                    try:
                        erased += int(await self.client.xdel(stream, *doomed))
                    except (RedisError, OSError) as exc:
                        raise StoreUnavailableError(f"event stream {stream!r}: {exc}") from exc
        return erased

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The oldest dead-lettered entries (for operators and tests)."""
        rows = await self.client.xrange(self.dead_letter_stream, count=count)
        return [{"id": _text(i), **{_text(k): _text(v) for k, v in f.items()}} for i, f in rows]

    async def close(self) -> None:
        await self._close_emitter()
        if self._owns_client:
            await self.client.aclose()


@dataclass
class _Pending:
    consumer: str
    deliveries: int
    delivered_at: float


@dataclass
class _Group:
    next_seq: int
    pending: dict[int, _Pending]


class MemoryBus(_BufferedEmitter):
    """The same bus in process memory: a bounded log, groups with cursors and pending lists.

    Unacked entries are redelivered after ``claim_idle_ms`` and dead-lettered after
    ``max_deliveries``, like the Redis backend; everything is lost with the process.
    """

    def __init__(
        self,
        maxlen: int = 100_000,
        max_deliveries: int = 5,
        claim_idle_ms: int = 30_000,
        *,
        max_retained: int | None = None,
        buffer_size: int = 10_000,
        flush_batch: int = 500,
    ):
        super().__init__(buffer_size, flush_batch)
        self.max_retained = _check_retention(maxlen, max_retained)
        self.maxlen, self.max_deliveries, self.claim_idle_ms = maxlen, max_deliveries, claim_idle_ms
        self._log: deque[Event] = deque()
        self._first_seq = 0  # sequence number of _log[0]
        self._groups: dict[str, _Group] = {}
        self._reading: set[tuple[str, str]] = set()
        self._new_entries: asyncio.Condition | None = None
        self.dead: list[dict[str, Any]] = []

    def _condition(self) -> asyncio.Condition:
        if self._new_entries is None:
            self._new_entries = asyncio.Condition()
        return self._new_entries

    async def _append(self, events: list[Event]) -> str:
        for event in events:
            self._log.append(event)
        self._apply_retention()
        cond = self._condition()
        async with cond:
            cond.notify_all()
        return f"{self._first_seq + len(self._log) - 1}-0"

    async def _publish_many(self, events: list[Event]) -> None:
        await self._append(events)

    async def publish(self, event: Event) -> str:
        entry_id = await self._append([event])
        self._counts["published"] += 1
        return entry_id

    async def tail(self) -> AsyncIterator[Event]:
        seq = self._first_seq + len(self._log)
        cond = self._condition()
        while True:
            seq = max(seq, self._first_seq)  # entries trimmed before being read are skipped
            while seq < self._first_seq + len(self._log):
                yield self._log[seq - self._first_seq]
                seq += 1
            async with cond:
                await cond.wait()

    def _apply_retention(self) -> None:
        """Beyond ``maxlen``, drop entries every group has acked; beyond ``max_retained``, any (counted)."""
        excess = len(self._log) - self.maxlen
        if excess <= 0:
            return
        needed = [min(g.pending, default=g.next_seq) for g in self._groups.values()]
        trimmable = excess if not needed else min(excess, max(0, min(needed) - self._first_seq))
        forced = max(0, len(self._log) - trimmable - self.max_retained)
        for _ in range(trimmable + forced):
            self._log.popleft()
        self._first_seq += trimmable + forced
        self._counts["trimmed"] += trimmable
        self._counts["trimmed_unconsumed"] += forced

    def _entry(self, seq: int) -> Event | None:
        index = seq - self._first_seq
        return self._log[index] if 0 <= index < len(self._log) else None

    async def read(self, group: str, consumer: str, count: int = 100, block_ms: int = 1000) -> list[Delivery]:
        state = self._groups.setdefault(group, _Group(next_seq=self._first_seq, pending={}))
        now = time.monotonic()
        first_read = (group, consumer) not in self._reading
        self._reading.add((group, consumer))
        idle_s = self.claim_idle_ms / 1000
        again = [
            seq for seq, p in sorted(state.pending.items())
            if (first_read and p.consumer == consumer) or now - p.delivered_at >= idle_s
        ][:count]
        out = self._redeliver(group, state, consumer, again, now)
        if out or again:
            return out
        if state.next_seq >= self._first_seq + len(self._log) and block_ms > 0:
            cond = self._condition()
            async with cond:
                try:
                    await asyncio.wait_for(cond.wait(), block_ms / 1000)
                except asyncio.TimeoutError:
                    pass
        state.next_seq = max(state.next_seq, self._first_seq)  # entries trimmed before being read are lost
        while state.next_seq < self._first_seq + len(self._log) and len(out) < count:
            seq = state.next_seq
            state.next_seq += 1
            state.pending[seq] = _Pending(consumer, 1, time.monotonic())
            out.append(Delivery(f"{seq}-0", self._log[seq - self._first_seq], 1))
        return out

    def _redeliver(self, group: str, state: _Group, consumer: str, seqs: list[int], now: float) -> list[Delivery]:
        out = []
        for seq in seqs:
            pending = state.pending[seq]
            event = self._entry(seq)
            pending.consumer, pending.deliveries, pending.delivered_at = consumer, pending.deliveries + 1, now
            if event is None or pending.deliveries > self.max_deliveries:
                del state.pending[seq]
                reason = "entry trimmed" if event is None else f"delivered {pending.deliveries} times"
                self.dead.append({"original_id": f"{seq}-0", "group": group, "reason": reason, "event": event})
                self._counts["dead_lettered"] += 1
                continue
            out.append(Delivery(f"{seq}-0", event, pending.deliveries))
        return out

    async def ack(self, group: str, ids: list[str]) -> int:
        state = self._groups.get(group)
        if state is None:
            return 0
        return sum(state.pending.pop(int(i.split("-")[0]), None) is not None for i in ids)

    async def close(self) -> None:
        await self._close_emitter()


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
