"""``MemoryBus``: the event bus in process memory (single and distributed architectures), with
the same API and semantics as the Redis one: groups with cursors and pending lists, redelivery
and dead letters; nothing survives the process.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Any

from callray.events import Event
from callray.events.bus import Delivery, _BufferedEmitter, retention_bound


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
        self.max_retained = retention_bound(maxlen, max_retained)
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

    async def recent(self, count: int) -> tuple[list[Event], str]:
        end = self._first_seq + len(self._log)
        return list(self._log)[max(0, len(self._log) - count):], str(end)

    async def tail(self, after: str | None = None) -> AsyncIterator[Event]:
        seq = self._first_seq + len(self._log) if after is None else int(after)
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
