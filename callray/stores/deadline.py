"""A response cache that never holds a turn up.

A cache lookup runs before the agent starts and before the latency budget's timer, so a
stalled Redis would add its whole timeout to every turn (a frozen Redis: first frames at
1 s instead of 5 ms, the holding phrase arriving with the answer). ``DeadlineCache`` gives
the lookup ``lookup_deadline_ms``; past it the turn goes on as a miss, the lookup finishes
(or times out) in the background, and the cache is skipped for ``cooldown_s``. It waits with
``asyncio.wait`` rather than cancelling, because redis-py's async client can swallow a cancel
while a command is in flight (redis/redis-py#2028): a deadline that relied on the cancel would
not hold. Writes are skipped while the cache is cooling down.
"""

from __future__ import annotations

import asyncio
import logging
import time

from callray.stores.base import ResponseCache

log = logging.getLogger("callray.cache")


class DeadlineCache:
    """Wraps a ``ResponseCache`` (see the module docstring)."""

    def __init__(self, inner: ResponseCache, *, lookup_deadline_s: float, cooldown_s: float):
        self.inner, self.lookup_deadline_s, self.cooldown_s = inner, lookup_deadline_s, cooldown_s
        self.skipped = 0  # lookups answered as misses without asking (cooling down)
        self._cool_until = 0.0
        self._late: set[asyncio.Task] = set()

    @property
    def cooling(self) -> bool:
        return time.monotonic() < self._cool_until

    async def get(self, agent: str, version: str, key: str) -> list[str] | None:
        if self.cooling:
            self.skipped += 1
            return None
        lookup = asyncio.ensure_future(self.inner.get(agent, version, key))
        done, _ = await asyncio.wait({lookup}, timeout=self.lookup_deadline_s)
        if lookup in done:
            return lookup.result()
        self._cool_until = time.monotonic() + self.cooldown_s
        log.warning("response cache: no answer within %.0f ms; skipping it for %.0f s",
                    self.lookup_deadline_s * 1000, self.cooldown_s)
        self._late.add(lookup)  # finishes (or times out) on its own; kept referenced until then
        lookup.add_done_callback(self._late.discard)
        return None

    async def put(self, agent: str, version: str, key: str, phrases: list[str], call_id: str | None = None) -> None:
        if not self.cooling:
            await self.inner.put(agent, version, key, phrases, call_id)

    async def erase_call(self, call_id: str) -> int:
        return await self.inner.erase_call(call_id)

    def stats(self) -> dict[str, dict[str, int]]:
        return self.inner.stats()

    async def close(self) -> None:
        for task in list(self._late):
            task.cancel()
        await self.inner.close()
