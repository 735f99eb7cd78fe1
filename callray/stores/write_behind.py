"""Keep calls talking while the state store is down: save in memory now, write it later.

A turn must not fail because Redis restarts. ``WriteBehindStore`` wraps any StateStore: when a
save finds the backend unavailable it keeps the call's latest state in memory, answers with the
next version at once, and a background task writes the latest state when the backend is back.

Versions stay safe: the delayed write is a compare-and-set against the version the store held
when the first unsaved change happened (``stored``), so if another host took the call over in
the meantime, the delayed write loses and this host's next save raises StaleStateError. While a
call's store version lags behind the version its owner holds (``local``), the wrapper translates
between the two; the owner never sees the difference.

A call's events (for a store that ``carries_events``) wait with its unwritten state: the owner's
list of them is kept with the entry and handed to the write that lands, which empties it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from redis.backoff import ExponentialBackoff

from callray.events import Event
from callray.stores.base import CallFencedError, CallState, Claim, StaleStateError, StateStore, StoreUnavailableError

log = logging.getLogger(__name__)

_UNKNOWN_OUTCOMES = 32  # timed-out writes remembered per call (only one of them can have landed)


def _fingerprint(state: CallState) -> str:
    """The content of a state, without the store-managed fields: did this write land?"""
    return hashlib.sha256(state.model_dump_json(exclude={"version", "epoch", "updated_at"}).encode()).hexdigest()


@dataclass
class _Entry:
    """One call whose store version lags behind its owner's, or that has an unwritten state."""

    stored: int  # the version the store holds: the delayed write compares against it
    local: int  # the version the owner holds (the last one returned by save)
    dirty: CallState | None = None  # the latest state not yet written
    events: list[Event] = field(default_factory=list)  # the owner's unwritten events (see save)
    unknown: deque[str] = field(default_factory=lambda: deque(maxlen=_UNKNOWN_OUTCOMES))
    lost_to: int | None = None  # another writer won: the store version (or owner epoch) it holds
    fenced: bool = False  # ... and it won because a newer activation claimed the call


class WriteBehindStore:
    """A StateStore that defers saves while ``inner`` raises StoreUnavailableError."""

    def __init__(self, inner: StateStore, *, base_delay_s: float = 0.05, max_delay_s: float = 2.0):
        self.inner = inner
        self._backoff = ExponentialBackoff(cap=max_delay_s, base=base_delay_s)
        self._failures = 0  # consecutive drains that found the store down
        self.deferred = 0  # saves answered from memory because the store was down
        self.write_retries = 0  # writes to the store that failed and will be retried
        self.written_late = 0  # deferred states that reached the store
        self.write_failures = 0  # deferred states dropped: another writer won, or an error
        self._entries: dict[str, _Entry] = {}
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Future | None = None

    @property
    def carries_events(self) -> bool:
        return self.inner.carries_events

    @property
    def pending(self) -> int:
        """Calls whose latest state is not in the store yet."""
        return sum(1 for entry in self._entries.values() if entry.dirty is not None)

    def stats(self) -> dict[str, int]:
        return {
            "pending": self.pending,
            "deferred": self.deferred,
            "write_retries": self.write_retries,
            "written_late": self.written_late,
            "write_failures": self.write_failures,
        }

    async def load(self, call_id: str) -> CallState | None:
        """The unwritten state if there is one, else the store's (in the owner's versions)."""
        entry = self._entries.get(call_id)
        if entry is not None and entry.dirty is not None:
            return entry.dirty.model_copy(deep=True)
        state = await self.inner.load(call_id)
        if entry is not None:
            if entry.lost_to is None and state is not None and state.version == entry.stored:
                state.version = entry.local
            else:  # the store moved on (or the call is gone): the caller adopts the store's view
                del self._entries[call_id]
        return state

    async def claim(self, call_id: str, owner: str, *, unless_held: bool = False) -> Claim:
        """Claim in the store (this needs the backend); an unwritten state stays the call's
        state, and its delayed write moves to the new epoch."""
        claim = await self.inner.claim(call_id, owner, unless_held=unless_held)
        if not claim.epoch:
            return claim
        entry = self._entries.get(call_id)
        if entry is None or entry.lost_to is not None:
            self._entries.pop(call_id, None)
            return claim
        if entry.dirty is not None:
            entry.dirty.epoch = claim.epoch
            return Claim(entry.dirty.model_copy(deep=True), claim.epoch, claim.previous_owner)
        state = claim.state
        if state is not None and state.version == entry.stored:
            state.version = entry.local
        return claim

    async def owner(self, call_id: str) -> tuple[str, int] | None:
        return await self.inner.owner(call_id)

    async def save(self, state: CallState, events: list[Event] | None = None) -> int:
        call_id = state.call_id
        entry = self._entries.get(call_id)
        if entry is not None:
            if entry.lost_to is not None:
                del self._entries[call_id]
                if entry.fenced:
                    raise CallFencedError(call_id, state.epoch, entry.lost_to)
                raise StaleStateError(call_id, state.version, entry.lost_to)
            if state.version != entry.local:
                raise StaleStateError(call_id, state.version, entry.local)
            if entry.dirty is not None:  # a write is queued: replace it with this newer state
                return self._defer(entry, state, events)
        attempt = state.model_copy(update={"version": entry.stored if entry else state.version})
        try:
            version = await self.inner.save(attempt, events)
        except StoreUnavailableError:
            self.write_retries += 1
            if entry is None:
                entry = self._entries[call_id] = _Entry(stored=state.version, local=state.version)
            entry.unknown.append(_fingerprint(state))
            return self._defer(entry, state, events)
        except CallFencedError:
            self._entries.pop(call_id, None)
            raise
        except StaleStateError as exc:
            self._entries.pop(call_id, None)
            raise StaleStateError(call_id, state.version, exc.found) from exc
        self._entries.pop(call_id, None)
        state.version, state.updated_at = version, attempt.updated_at
        return version

    async def delete(self, call_id: str) -> None:
        self._entries.pop(call_id, None)
        await self.inner.delete(call_id)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Write everything pending now; True when done, False if ``timeout`` ran out first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending:
            self._ensure_task()
            self._failures = 0
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(asyncio.shield(self._task), remaining)
            except TimeoutError:
                return False
        return True

    async def close(self, timeout: float = 1.0) -> None:
        """Flush briefly, stop the retry task, close the inner store."""
        if not await self.flush(timeout):
            log.warning("write-behind: closing with %d call states not written to the store", self.pending)
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.inner.close()

    def _defer(self, entry: _Entry, state: CallState, events: list[Event] | None) -> int:
        if events is not None:
            entry.events = events
        entry.local += 1
        state.version, state.updated_at = entry.local, time.time()
        entry.dirty = state.model_copy(deep=True)
        self.deferred += 1
        self._ensure_task()
        return entry.local

    def _ensure_task(self) -> None:
        """Start the retry task lazily, in whichever loop is running now."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._drain(), name="callray-write-behind")

    async def _drain(self) -> None:
        """Write every pending call; back off exponentially while the store is down."""
        self._failures = 0
        while True:
            call_ids = [call_id for call_id, entry in self._entries.items() if entry.dirty is not None]
            if not call_ids:
                return
            down = False
            for call_id in call_ids:
                try:
                    down = await self._write(call_id) or down
                except Exception:  # a bug in the backend must not kill the retry task
                    log.exception("write-behind: dropping the unwritten state of call %s", call_id)
                    self.write_failures += 1
                    if (entry := self._entries.get(call_id)) is not None:
                        entry.dirty = None
            if down:
                await self._sleep(self._backoff.compute(self._failures))
                self._failures += 1
            else:
                self._failures = 0

    async def _write(self, call_id: str) -> bool:
        """Try one pending call once; True when the store was unavailable."""
        entry = self._entries.get(call_id)
        if entry is None or entry.dirty is None:
            return False
        latest = entry.dirty
        try:
            version = await self.inner.save(latest.model_copy(update={"version": entry.stored}), entry.events)
        except StoreUnavailableError:
            self.write_retries += 1
            entry.unknown.append(_fingerprint(latest))
            return True
        except CallFencedError as exc:
            log.warning("write-behind: call %s was claimed by a newer activation (epoch %s); "
                        "dropping this host's unwritten state", call_id, exc.found)
            self.write_failures += 1
            entry.dirty, entry.lost_to, entry.fenced = None, exc.found, True
            return False
        except StaleStateError as exc:
            return await self._resolve_stale(call_id, entry, exc.found)
        if self._entries.get(call_id) is not entry:  # deleted while the write was in flight
            with contextlib.suppress(StoreUnavailableError):
                await self.inner.delete(call_id)
            return False
        self._landed(call_id, entry, version, latest)
        return False

    async def _resolve_stale(self, call_id: str, entry: _Entry, found: int | None) -> bool:
        """A stale write is either ours (an earlier attempt timed out but landed) or a takeover."""
        if entry.unknown and found == entry.stored + 1:
            try:
                current = await self.inner.load(call_id)
            except StoreUnavailableError:
                self.write_retries += 1
                return True
            if current is not None and _fingerprint(current) in entry.unknown:
                self._landed(call_id, entry, current.version, current)
                return False
        log.warning("write-behind: call %s was saved by another writer (version %s); "
                    "dropping this host's unwritten state", call_id, found)
        self.write_failures += 1
        entry.dirty, entry.lost_to = None, found if found is not None else 0
        return False

    def _landed(self, call_id: str, entry: _Entry, version: int, written: CallState) -> None:
        """``written`` is in the store as ``version``; done unless a newer state came since."""
        entry.stored = version
        entry.unknown.clear()
        if entry.dirty is not None and _fingerprint(entry.dirty) == _fingerprint(written):
            entry.dirty = None
            self.written_late += 1
        if entry.dirty is None and entry.local == entry.stored:
            del self._entries[call_id]

    async def _sleep(self, delay: float) -> None:
        """Back off, but wake early when ``flush`` asks for a write now."""
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._wake, delay)
        except TimeoutError:
            pass
        finally:
            self._wake = None
