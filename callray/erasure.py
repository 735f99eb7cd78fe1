"""Erasure: one call's data, or one caller's, removed from everywhere callray keeps it.

A call leaves data in four places: its archived record (and turns), its state in the state
store (turns in clear, Retell's call object; it expires after ``state.ttl_s``), the answers its
turns wrote into the response cache, and its events in the Redis stream and dead letters (kept
up to ``events.maxlen``). ``erase`` removes all four, stream first so that no consumer writes the
record again, and logs what it removed without any of it. A call that is still live is refused
(its next checkpoint would write it again) unless ``force``: Retell's ``call_ended`` may never
have come. A caller's calls are found in the archive by their number (or, with
``privacy.redact``, its keyed hash: see ``callray/privacy.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from callray.settings import PrivacySettings
from callray.stores.base import ResponseCache, StateStore
from callray.events.redis_streams import RedisStreamBus
from callray.stores.factory import Stores

log = logging.getLogger("callray.erasure")


class CallLiveError(RuntimeError):
    """The call has not ended: erasing it now would be undone by its next checkpoint."""


class ArchivedCalls(Protocol):
    """The archive, wherever it runs (in this process or in the archive actor)."""

    async def calls_of(self, callers: list[str]) -> list[str]: ...

    async def erase_record(self, call_id: str) -> bool: ...


class Erasure:
    """Erases calls from the archive and from ``stores`` (state, response cache, stream); without
    stores (a gateway that reaches none) only from the archive."""

    def __init__(self, archive: ArchivedCalls, privacy: PrivacySettings, stores: Stores | None = None):
        self.archive, self.privacy = archive, privacy
        self.state: StateStore | None = stores.state if stores is not None else None
        self.cache: ResponseCache | None = stores.cache if stores is not None else None
        events = stores.events if stores is not None else None
        self.stream = events if isinstance(events, RedisStreamBus) else None  # a memory bus dies with its process

    async def call(self, call_id: str, *, force: bool = False) -> dict[str, Any]:
        """Erase one call; what was removed. Raises CallLiveError for a live call (without ``force``)."""
        state = await self.state.load(call_id) if self.state is not None else None
        if state is not None and not state.ended and not force:
            raise CallLiveError(f"call {call_id} has not ended; erase it after it ends (or with force)")
        erased = {
            "call_id": call_id,
            "events": await self.stream.erase(call_id) if self.stream is not None else 0,
            "record": await self.archive.erase_record(call_id),
            "state": state is not None,
            "cache_entries": await self.cache.erase_call(call_id) if self.cache is not None else 0,
        }
        if self.state is not None:
            await self.state.delete(call_id)
        log.info("erased call %s: record %s, state %s, %d cache entries, %d events", call_id, erased["record"],
                 erased["state"], erased["cache_entries"], erased["events"], extra={"call_id": call_id})
        return erased

    async def caller(self, number: str) -> dict[str, Any]:
        """Erase every archived call of the caller with this phone number (any format; raises
        ValueError for what is not one)."""
        call_ids = await self.archive.calls_of(self.privacy.caller(number))
        calls = [await self.call(call_id, force=True) for call_id in call_ids]
        log.info("erased the %d archived calls of one caller", len(calls))
        found: dict[str, Any] = {"calls": calls}
        if self.privacy.redact and self.privacy.caller_key is None:
            found["note"] = ("privacy.redact is on without privacy.caller_key (CALLRAY_PRIVACY_KEY): records "
                             "redacted meanwhile hold no number and cannot be found by it")
        return found
