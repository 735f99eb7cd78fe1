"""In-memory stores: the single-server architecture, and the tests' default.

State lives in the process that holds it, so it is lost when that process dies; that is the
trade the single architecture makes (the Redis backends remove it).
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict
from dataclasses import dataclass

from cachetools import TTLCache

from callray.events import Event
from callray.stores.base import CallFencedError, CallState, Claim, StaleStateError


@dataclass
class _Stored:
    expires: float
    epoch: int = 0
    owner: str | None = None
    state: str | None = None  # the CallState JSON, None until the first save
    version: int = 0  # the stored state's version, kept apart so a save need not parse it


#: An ended call's state is kept this long at most (a late webhook may still merge into it).
ENDED_TTL_S = 300.0


class MemoryStateStore:
    """Versioned call state in a dict, with the same compare-and-set and epoch rules as Redis.

    Bounded: entries expire ``ttl_s`` after their last write (an ended call after at most
    ``ENDED_TTL_S``), ``sweep`` removes expired ones, and past ``max_calls`` entries the ones
    closest to expiry are dropped. Events go to the in-process bus, not with the state.
    """

    carries_events = False

    def __init__(self, ttl_s: float = 3600.0, max_calls: int = 100_000):
        self.ttl_s, self.max_calls = ttl_s, max_calls
        self._data: dict[str, _Stored] = {}

    def _get(self, call_id: str) -> _Stored | None:
        item = self._data.get(call_id)
        if item is not None and item.expires < time.monotonic():
            del self._data[call_id]
            return None
        return item

    def _state(self, item: _Stored | None) -> CallState | None:
        if item is None or item.state is None:
            return None
        state = CallState.model_validate_json(item.state)
        state.epoch = item.epoch
        return state

    async def load(self, call_id: str) -> CallState | None:
        return self._state(self._get(call_id))

    def sweep(self, now: float | None = None) -> int:
        """Drop expired entries; returns how many."""
        now = time.monotonic() if now is None else now
        expired = [call_id for call_id, item in self._data.items() if item.expires < now]
        for call_id in expired:
            del self._data[call_id]
        return len(expired)

    def _make_room(self) -> None:
        if len(self._data) < self.max_calls:
            return
        self.sweep()
        excess = len(self._data) - self.max_calls + 1
        if excess > 0:
            for call_id, _ in heapq.nsmallest(excess, self._data.items(), key=lambda kv: kv[1].expires):
                del self._data[call_id]

    async def claim(self, call_id: str, owner: str, *, unless_held: bool = False) -> Claim:
        item = self._get(call_id)
        if unless_held and item is not None and item.owner not in (None, owner):
            return Claim(None, 0, item.owner)
        if item is None:
            self._make_room()
            item = self._data[call_id] = _Stored(time.monotonic() + self.ttl_s)
        previous, item.owner, item.epoch = item.owner, owner, item.epoch + 1
        item.expires = time.monotonic() + self.ttl_s
        return Claim(self._state(item), item.epoch, previous)

    async def owner(self, call_id: str) -> tuple[str, int] | None:
        item = self._get(call_id)
        return (item.owner, item.epoch) if item is not None and item.owner is not None else None

    async def save(self, state: CallState, events: list[Event] | None = None) -> int:
        item = self._get(state.call_id)
        if item is not None and item.epoch > state.epoch:
            raise CallFencedError(state.call_id, state.epoch, item.epoch)
        found = item.version if item is not None else 0
        if found != state.version:
            raise StaleStateError(state.call_id, state.version, found)
        state.version = found + 1
        state.updated_at = time.time()
        if item is None:
            self._make_room()
            item = self._data[state.call_id] = _Stored(0.0, epoch=state.epoch)
        ttl = min(self.ttl_s, ENDED_TTL_S) if state.ended else self.ttl_s
        item.expires, item.state, item.version = time.monotonic() + ttl, state.model_dump_json(), state.version
        return state.version

    async def delete(self, call_id: str) -> None:
        self._data.pop(call_id, None)

    async def close(self) -> None:
        self._data.clear()


class MemoryResponseCache:
    """An LRU of answers with a TTL, keyed by (agent, version, key); which call wrote which
    entry is kept as long, so erasing a call removes the answers it wrote."""

    def __init__(self, ttl_s: float = 3600.0, max_entries: int = 10_000):
        self._entries: TTLCache[tuple[str, str, str], list[str]] = TTLCache(max_entries, ttl_s, timer=time.monotonic)
        self._by_call: TTLCache[str, set[tuple[str, str, str]]] = TTLCache(max_entries, ttl_s, timer=time.monotonic)
        self._stats: dict[str, dict[str, int]] = defaultdict(lambda: {"hits": 0, "misses": 0})

    async def get(self, agent: str, version: str, key: str) -> list[str] | None:
        full = (agent, version, key)
        phrases = self._entries.get(full)
        self._stats[agent]["hits" if phrases is not None else "misses"] += 1
        return list(phrases) if phrases is not None else None

    async def put(self, agent: str, version: str, key: str, phrases: list[str], call_id: str | None = None) -> None:
        self._entries[(agent, version, key)] = list(phrases)
        if call_id is not None:
            self._by_call[call_id] = self._by_call.get(call_id, set()) | {(agent, version, key)}

    async def erase_call(self, call_id: str) -> int:
        return sum(self._entries.pop(full, None) is not None for full in self._by_call.pop(call_id, ()))

    def stats(self) -> dict[str, dict[str, int]]:
        return {agent: dict(counts) for agent, counts in self._stats.items()}

    async def close(self) -> None:
        self._entries.clear()
