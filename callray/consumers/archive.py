"""The transcript archive consumer: every call's record, kept by a backend.

Events are gathered per call as they are handled and folded into the stored records once per
batch (``flush``), before the batch is acknowledged: what was acked is stored. The record is a
function of the set of events (``record.py``), so redelivery and reordering change nothing.
Backends: ``FileRecords`` (one JSON file per call on this node: a laptop) and
``PostgresRecords`` (a database every node shares: a cluster).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from callray.consumers import Periodic
from callray.events import Event
from callray.settings import ArchiveSettings

log = logging.getLogger(__name__)

#: The archive writes each changed record once per batch; lingering this long between batches
#: turns a file write per event into at most one per call per second.
LINGER_S = 1.0
#: Records ended but never analyzed are finalised this often (and purged every PURGE_INTERVAL_S).
FINALISE_INTERVAL_S = 60.0
PURGE_INTERVAL_S = 3600.0


class ArchiveRecords(Protocol):
    async def update(self, events: dict[str, list[Event]]) -> list[dict[str, Any]]:
        """Fold each call's events into its stored record (atomically per call); returns the
        updated records."""

    async def get(self, call_id: str) -> dict[str, Any] | None: ...

    async def finalise(self, call_ids: list[str]) -> None:
        """Mark these records final."""

    async def purge(self, ended_before: float) -> int:
        """Delete records of calls ended (or last written) before this unix time; how many."""

    async def page(self, since: float | None, after: str, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` records with a call id after ``after``, in call id order, of calls
        that ended (or, never ended, started) at or after ``since`` (unix seconds)."""

    async def count(self, since: float | None) -> int:
        """How many records ``page`` would return from ``since``, in all."""

    async def calls_of(self, callers: list[str]) -> list[str]:
        """The ids of the calls whose caller is one of these (E.164 numbers or caller keys)."""

    async def erase(self, call_id: str) -> bool:
        """Delete a call's record and turns; whether there was one."""

    async def close(self) -> None: ...


class TranscriptArchive:
    """Consumer that keeps each call's record in ``records``; ``get(call_id)`` reads it back.

    A record is ``final`` once both ``call.ended`` and ``call.analyzed`` arrived, or
    ``grace_s`` after ``call.ended`` when ``finalise_stale()`` runs (analysis is optional in
    Retell). With ``retention_s``, ``purge()`` deletes records of calls ended longer ago.
    """

    kind = "archive"
    linger_s = LINGER_S

    def __init__(self, records: ArchiveRecords, *, grace_s: float = 900.0, retention_s: float | None = None):
        self.records, self.grace_s, self.retention_s = records, grace_s, retention_s
        self._last_purge = time.monotonic()
        self._pending: dict[str, list[Event]] = {}
        self._ended_at_mono: dict[str, float] = {}
        self.counts = {"flushes": 0, "events": 0, "finalised": 0, "purged": 0, "erased": 0}

    async def handle(self, event: Event) -> None:
        """Gather one event; :meth:`flush` stores it."""
        self._pending.setdefault(event.call_id, []).append(event)

    async def flush(self) -> None:
        """Store every event gathered since the last flush. On failure they stay gathered, for
        the next flush (the consumer retries it before reading more)."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            records = await self.records.update(pending)
        except BaseException:
            for call_id, events in pending.items():
                self._pending[call_id] = events + self._pending.get(call_id, [])
            raise
        self.counts["flushes"] += 1
        self.counts["events"] += sum(len(events) for events in pending.values())
        for record in records:
            if record["ended"] and not record["final"]:
                self._ended_at_mono.setdefault(record["call_id"], time.monotonic())
            else:
                self._ended_at_mono.pop(record["call_id"], None)

    def periodic(self) -> list[Periodic]:
        return [Periodic(FINALISE_INTERVAL_S, "finalising or purging", self._housekeeping)]

    async def _housekeeping(self) -> None:
        """Finalise stale records (each time) and purge expired ones (every ``PURGE_INTERVAL_S``)."""
        await self.finalise_stale()
        if time.monotonic() - self._last_purge >= PURGE_INTERVAL_S:
            self._last_purge = time.monotonic()
            if purged := await self.purge():
                log.info("archive: purged %d records past their retention", purged)

    async def get(self, call_id: str) -> dict[str, Any] | None:
        return await self.records.get(call_id)

    async def export(self, since: float | None, after: str = "", limit: int = 100) -> dict[str, Any]:
        """One page of an export: ``records``, ``next`` (the ``after`` of the next page, None at
        the end) and, on the first page, ``total``."""
        records = await self.records.page(since, after, limit)
        page: dict[str, Any] = {"records": records, "next": records[-1]["call_id"] if len(records) == limit else None}
        if not after:
            page["total"] = await self.records.count(since)
        return page

    async def calls_of(self, callers: list[str]) -> list[str]:
        return await self.records.calls_of(callers)

    async def erase(self, call_id: str) -> bool:
        """Delete the call's record. Events of the call still pending in this consumer would
        write it again: erase after the call ended and its events were archived."""
        self._pending.pop(call_id, None)
        self._ended_at_mono.pop(call_id, None)
        erased = await self.records.erase(call_id)
        self.counts["erased"] += erased
        return erased

    async def finalise_stale(self) -> list[str]:
        """Mark records ended more than ``grace_s`` ago (and never analyzed) final."""
        now = time.monotonic()
        done = [cid for cid, at in self._ended_at_mono.items() if now - at >= self.grace_s]
        if done:
            await self.records.finalise(done)
            for call_id in done:
                del self._ended_at_mono[call_id]
            self.counts["finalised"] += len(done)
        return done

    async def purge(self) -> int:
        """Apply retention now: delete the records of calls ended more than ``retention_s`` ago."""
        if self.retention_s is None:
            return 0
        purged = await self.records.purge(time.time() - self.retention_s)
        self.counts["purged"] += purged
        return purged

    def prometheus_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """``callray_archive_<count>`` (flushes, events, finalised, purged, erased) as metric samples."""
        return [(f"callray_archive_{name}", {}, float(value)) for name, value in self.counts.items()]

    async def close(self) -> None:
        await self.records.close()


def build_archive(settings: ArchiveSettings) -> TranscriptArchive | None:
    """The archive the settings ask for (None: ``backend: none``)."""
    records: ArchiveRecords
    if settings.backend == "none":
        return None
    if settings.backend == "postgres":
        from callray.consumers.archive_postgres import PostgresRecords

        records = PostgresRecords(settings.database_url, pool_size=settings.pool_size, timeout_s=settings.timeout_s)
    else:
        from callray.consumers.archive_files import FileRecords

        records = FileRecords(settings.dir)
    retention = settings.retention_days * 86400 if settings.retention_days is not None else None
    return TranscriptArchive(records, retention_s=retention)
