"""``RedisStreamBus``: the event bus on one Redis Stream (event-driven architecture).

At-least-once: one consumer group per consumer kind, unacked entries re-read after a restart or
taken over from dead consumers, entries that keep failing (or cannot be decoded) moved to a
dead-letter stream instead of blocking the group. Retention never drops an entry a group still
needs (see :mod:`callray.events.bus`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from callray.events import Event, parse_event
from callray.events.bus import Delivery, _BufferedEmitter, retention_bound, stream_fields
from callray.stores.base import StoreUnavailableError
from callray.stores.redis_client import RedisBacked

log = logging.getLogger(__name__)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decoded(fields: dict[bytes, bytes] | None) -> Event | None:
    """The event of a stream entry, or None when it cannot be decoded (a reader outside any
    group skips it; consumer groups dead-letter it instead)."""
    try:
        return parse_event((fields or {})[b"event"])
    except (KeyError, ValidationError, ValueError):
        return None


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


class RedisStreamBus(RedisBacked, _BufferedEmitter):
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
        self.max_retained = retention_bound(maxlen, max_retained)
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
            for _, fields in entries:
                if (event := _decoded(fields)) is not None:
                    yield event

    async def recent(self, count: int) -> tuple[list[Event], str]:
        try:
            entries = await self.client.xrevrange(self.stream, count=count)
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"event stream {self.stream!r}: {exc}") from exc
        events = [event for _, fields in reversed(entries) if (event := _decoded(fields)) is not None]
        return events, _text(entries[0][0]) if entries else "0-0"

    async def tail(self, after: str | None = None, block_ms: int = 1000) -> AsyncIterator[Event]:
        last = after
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
                if (event := _decoded(fields)) is not None:
                    yield event

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
        await super().close()
