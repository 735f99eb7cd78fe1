"""Redis backends for call state and the response cache (distributed and event-driven).

State is a hash per call (``v`` = version, ``s`` = the CallState JSON) written by one Lua
compare-and-set, so two hosts that both think they own a call can never both win. The cache is
a plain string per answer; it never raises, because a cache must never break a turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from callray.events import Event
from callray.stores.base import CallFencedError, CallState, Claim, StaleStateError, StoreUnavailableError
from callray.events.bus import stream_fields
from callray.stores.group_commit import GroupCommit
from callray.stores.redis_client import RedisBacked

log = logging.getLogger(__name__)
T = TypeVar("T")

# Failures that mean "Redis cannot serve this now" (refused, reset, timed out, loading...).
_DOWN = (RedisError, OSError, asyncio.TimeoutError)

# KEYS[1] call key, KEYS[2] the event stream (when events are carried); ARGV[1] expected
# version, ARGV[2] JSON, ARGV[3] TTL ms, ARGV[4] owner epoch, ARGV[5] the stream's hard length
# bound, then per event its seq and the two (field, value) pairs of its entry (bus.stream_fields).
# Returns {1, new_version} when written, {0, found_version} when stale (0 = no such call) and
# {-1, stored_epoch} when a newer activation holds the call (fenced).
# A replay of the exact write that already landed (a retry after a lost reply) succeeds again.
# The events are appended to the stream by the same script that writes the state, so a crash
# loses both or neither; ``q`` is the highest seq appended, and an event at or below it (sent
# again with a later save after an earlier one's reply was lost) is not appended twice.
_CAS_SAVE = """
local cur = redis.call('HMGET', KEYS[1], 'v', 's', 'e', 'q')
local epoch = tonumber(cur[3] or '0')
if epoch > tonumber(ARGV[4]) then
  return {-1, epoch}
end
local found = tonumber(cur[1] or '0')
local expected = tonumber(ARGV[1])
if found == expected + 1 and cur[2] == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, found}
end
if found ~= expected then
  return {0, found}
end
local appended = tonumber(cur[4] or '0')
for i = 6, #ARGV, 5 do
  local seq = tonumber(ARGV[i])
  if seq > appended then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
    appended = seq
  end
end
redis.call('HSET', KEYS[1], 'v', found + 1, 's', ARGV[2], 'e', ARGV[4], 'q', appended)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, found + 1}
"""

# KEYS[1] call key; ARGV[1] owner, ARGV[2] TTL ms, ARGV[3] '1' to claim only a call no other owner
# holds. Bumps the owner epoch, records the owner and returns {epoch, previous owner or false,
# version or false, JSON or false}; with ARGV[3] '1' and another owner recorded, changes nothing
# and returns {0, that owner}.
_CLAIM = """
local previous = redis.call('HGET', KEYS[1], 'o')
if ARGV[3] == '1' and previous and previous ~= ARGV[1] then
  return {0, previous}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'e', 1)
redis.call('HSET', KEYS[1], 'o', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local cur = redis.call('HMGET', KEYS[1], 'v', 's')
return {epoch, previous, cur[1], cur[2]}
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


async def _once_more_on_reconnect(command: Callable[[], Awaitable[T]]) -> T:
    """Run ``command``; on a dropped connection run it once more on a fresh one.

    After a Redis restart every pooled connection is dead and the first command on each fails
    with ConnectionError although Redis is up again. Timeouts are not retried: a slow Redis
    would only double the turn's wait. Commands here are idempotent (the save script accepts
    a replay of its own write).
    """
    try:
        return await command()
    except RedisConnectionError:
        return await command()


class RedisStateStore(RedisBacked):
    """Versioned call state in Redis with the same compare-and-set and epoch rules as
    MemoryStateStore: a hash per call with ``v`` (version), ``s`` (the CallState JSON), ``e``
    (owner epoch), ``o`` (owner) and ``q`` (the last event seq appended). Every save and claim
    refreshes the key's TTL, so a call expires ``ttl_s`` after its last activity.

    Saves go through a :class:`GroupCommit`: those asked for together share one round trip.

    With ``stream`` set, a save appends the call's events to that Redis Stream in the same
    script (the event-driven architecture's outbox); the bus's consumers read them from there and
    trim it. ``stream_max`` bounds the stream even when no consumer runs (the bus's
    ``max_retained``; approximate, as Redis trims whole nodes).
    """

    def __init__(self, client: aioredis.Redis, *, ttl_s: float = 3600.0, prefix: str = "callray:call:",
                 stream: str | None = None, stream_max: int = 1_000_000):
        self.client, self.ttl_s, self.prefix, self.stream = client, ttl_s, prefix, stream
        self.stream_max = stream_max
        self._save_script = client.register_script(_CAS_SAVE)
        self._saves = GroupCommit(client, self._save_script)
        self._claim_script = client.register_script(_CLAIM)

    @property
    def carries_events(self) -> bool:
        return self.stream is not None

    def key(self, call_id: str) -> str:
        return self.prefix + call_id

    @staticmethod
    def _decode(version: bytes | None, raw: bytes | None, epoch: int | bytes | None) -> CallState | None:
        if version is None or raw is None:
            return None
        state = CallState.model_validate_json(raw)
        state.version, state.epoch = int(version), int(epoch or 0)
        return state

    async def load(self, call_id: str) -> CallState | None:
        key = self.key(call_id)
        version, raw, epoch = await self._run("load", call_id, lambda: self.client.hmget(key, "v", "s", "e"))
        return self._decode(version, raw, epoch)

    async def claim(self, call_id: str, owner: str, *, unless_held: bool = False) -> Claim:
        key, args = self.key(call_id), [owner, _ms(self.ttl_s), int(unless_held)]
        reply = await self._run("claim", call_id, lambda: self._claim_script(keys=[key], args=args))
        if not reply[0]:  # held by another owner (unless_held): nothing claimed
            return Claim(None, 0, reply[1].decode())
        epoch, previous, version, raw = reply
        return Claim(self._decode(version, raw, epoch), int(epoch), previous.decode() if previous else None)

    async def owner(self, call_id: str) -> tuple[str, int] | None:
        key = self.key(call_id)
        owner, epoch = await self._run("owner lookup", call_id, lambda: self.client.hmget(key, "o", "e"))
        return (owner.decode(), int(epoch or 0)) if owner else None

    async def save(self, state: CallState, events: list[Event] | None = None) -> int:
        new_version, now = state.version + 1, time.time()
        payload = state.model_copy(update={"version": new_version, "updated_at": now}).model_dump_json()
        args: list[str | int] = [state.version, payload, _ms(self.ttl_s), state.epoch]
        keys = [self.key(state.call_id)]
        sent = list(events) if self.stream is not None and events else []
        if sent:
            keys.append(self.stream)
            args.append(self.stream_max)
            for event in sent:
                args.append(event.seq)
                for name, value in stream_fields(event).items():
                    args += [name, value]
        written, found = await self._run("save", state.call_id, lambda: self._saves.run(keys, args))
        if written == -1:
            raise CallFencedError(state.call_id, state.epoch, int(found))
        if not written:
            raise StaleStateError(state.call_id, state.version, int(found))
        if sent:
            events[:] = [event for event in events if event.seq > sent[-1].seq]  # more may have come meanwhile
        state.version, state.updated_at = new_version, now
        return new_version

    async def delete(self, call_id: str) -> None:
        key = self.key(call_id)
        await self._run("delete", call_id, lambda: self.client.delete(key))

    async def _run(self, what: str, call_id: str, command: Callable[[], Awaitable[T]]) -> T:
        try:
            return await _once_more_on_reconnect(command)
        except _DOWN as exc:
            raise StoreUnavailableError(f"Redis state store: {what} of call {call_id} failed: {exc}") from exc


class RedisResponseCache(RedisBacked):
    """Answers shared by every replica, keyed by agent, agent version and a hash of the key.

    The agent and version are both in the key name and in the hash, so one agent's answer is
    never served for another and a new agent version starts cold. Hits and misses are counted
    per process (``stats``), which Prometheus sums across the cluster.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_s: float = 3600.0,
        prefix: str = "callray:cache:",
    ):
        self.client, self.ttl_s, self.prefix = client, ttl_s, prefix
        self._stats: dict[str, dict[str, int]] = defaultdict(lambda: {"hits": 0, "misses": 0, "errors": 0})

    def key(self, agent: str, version: str, key: str) -> str:
        digest = hashlib.sha256(json.dumps([agent, version, key]).encode()).hexdigest()
        return f"{self.prefix}{agent}:{version}:{digest}"

    async def get(self, agent: str, version: str, key: str) -> list[str] | None:
        try:
            full = self.key(agent, version, key)
            raw = await _once_more_on_reconnect(lambda: self.client.get(full))
            phrases = json.loads(raw) if raw is not None else None
        except (*_DOWN, ValueError) as exc:
            log.warning("response cache: get for agent %r failed, counted as a miss: %s", agent, exc)
            self._count(agent, "errors")
            phrases = None
        self._count(agent, "hits" if phrases is not None else "misses")
        return phrases

    async def put(self, agent: str, version: str, key: str, phrases: list[str], call_id: str | None = None) -> None:
        """Store an answer; ``call_id``: the call that wrote it, remembered as long as the
        entry lives, so erasing the call removes it."""
        try:
            full, value, ttl_ms = self.key(agent, version, key), json.dumps(list(phrases)), _ms(self.ttl_s)

            async def write() -> None:
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.set(full, value, px=ttl_ms)
                    if call_id is not None:
                        pipe.sadd(self._written_by(call_id), full).pexpire(self._written_by(call_id), ttl_ms)
                    await pipe.execute()

            await _once_more_on_reconnect(write)
        except _DOWN as exc:
            log.warning("response cache: put for agent %r failed, dropped: %s", agent, exc)
            self._count(agent, "errors")

    async def erase_call(self, call_id: str) -> int:
        """Delete the answers this call wrote; how many were still there."""
        index = self._written_by(call_id)
        try:
            keys = await self.client.smembers(index)
            erased = int(await self.client.delete(*keys)) if keys else 0
            await self.client.delete(index)
        except _DOWN as exc:
            raise StoreUnavailableError(f"response cache: erasing call {call_id}: {exc}") from exc
        return erased

    def _written_by(self, call_id: str) -> str:
        return f"{self.prefix}written-by:{call_id}"

    async def put_many(self, agent: str, version: str, items: dict[str, list[str]]) -> int:
        """Pre-cache common answers in one round trip; returns how many were written."""
        if not items:
            return 0

        async def write_all() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, phrases in items.items():
                    pipe.set(self.key(agent, version, key), json.dumps(list(phrases)), px=_ms(self.ttl_s))
                await pipe.execute()

        try:
            await _once_more_on_reconnect(write_all)
        except _DOWN as exc:
            log.warning("response cache: pre-caching %d answers for %r failed: %s", len(items), agent, exc)
            self._count(agent, "errors")
            return 0
        return len(items)

    def stats(self) -> dict[str, dict[str, int]]:
        """``{agent: {"hits", "misses", "errors"}}`` counted by this process."""
        return {agent: dict(counts) for agent, counts in self._stats.items()}

    def _count(self, agent: str, kind: str) -> None:
        self._stats[agent][kind] += 1
