"""In-memory stores: the single-server architecture, and the tests' default.

State lives in the process that holds it, so it is lost when that process dies; that is the
trade the single architecture makes (the Redis backends remove it).
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict

from callray.stores.base import CallState, StaleStateError


class MemoryStateStore:
    """Versioned call state in a dict, with the same compare-and-set rule as Redis."""

    def __init__(self, ttl_s: float = 3600.0):
        self.ttl_s = ttl_s
        self._data: dict[str, tuple[float, str]] = {}

    async def load(self, call_id: str) -> CallState | None:
        item = self._data.get(call_id)
        if item is None or item[0] < time.monotonic():
            self._data.pop(call_id, None)
            return None
        return CallState.model_validate_json(item[1])

    async def save(self, state: CallState) -> int:
        current = await self.load(state.call_id)
        found = current.version if current else 0
        if found != state.version:
            raise StaleStateError(state.call_id, state.version, found)
        state.version = found + 1
        state.updated_at = time.time()
        self._data[state.call_id] = (time.monotonic() + self.ttl_s, state.model_dump_json())
        return state.version

    async def delete(self, call_id: str) -> None:
        self._data.pop(call_id, None)

    async def close(self) -> None:
        self._data.clear()


class MemoryResponseCache:
    """An LRU of answers with a TTL, keyed by (agent, version, key)."""

    def __init__(self, ttl_s: float = 3600.0, max_entries: int = 10_000):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._entries: OrderedDict[tuple[str, str, str], tuple[float, list[str]]] = OrderedDict()
        self._stats: dict[str, dict[str, int]] = defaultdict(lambda: {"hits": 0, "misses": 0})

    async def get(self, agent: str, version: str, key: str) -> list[str] | None:
        full = (agent, version, key)
        item = self._entries.get(full)
        if item is None or item[0] < time.monotonic():
            self._entries.pop(full, None)
            self._stats[agent]["misses"] += 1
            return None
        self._entries.move_to_end(full)
        self._stats[agent]["hits"] += 1
        return list(item[1])

    async def put(self, agent: str, version: str, key: str, phrases: list[str]) -> None:
        full = (agent, version, key)
        self._entries[full] = (time.monotonic() + self.ttl_s, list(phrases))
        self._entries.move_to_end(full)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def stats(self) -> dict[str, dict[str, int]]:
        return {agent: dict(counts) for agent, counts in self._stats.items()}

    async def close(self) -> None:
        self._entries.clear()
