"""The set of background consumers a deployment runs, built from its settings.

In the event-driven architecture each kind runs in its own Ray actor on Redis Streams; in the
others every call host runs them in-process on its memory bus (best effort, per host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Iterable

from callray.stores.bus import EventBus, consume
from callray.consumers.analytics import Analytics
from callray.consumers.archive import build_archive
from callray.consumers.escalation import Command, Emit, Escalation
from callray.settings import CallraySettings

log = logging.getLogger(__name__)

KINDS = ("analytics", "archive", "escalation")


def build_consumers(settings: CallraySettings, kinds: Iterable[str] = KINDS, *, command: Command | None = None,
                    emit: Emit | None = None, redis: Any = None) -> dict[str, Any]:
    """The enabled consumers among ``kinds``, by kind (archive and escalation are optional)."""
    out: dict[str, Any] = {}
    for kind in kinds:
        if kind == "analytics":
            out[kind] = Analytics()
        elif kind == "archive" and (archive := build_archive(settings.archive)) is not None:
            out[kind] = archive
        elif kind == "escalation" and settings.events.escalation is not None:
            out[kind] = Escalation(settings.events.escalation, command, emit=emit, redis=redis)
        elif kind not in KINDS:
            raise ValueError(f"unknown consumer kind {kind!r}; expected one of {KINDS}")
    return out


ARCHIVE_FINALISE_INTERVAL_S = 60.0
ARCHIVE_PURGE_INTERVAL_S = 3600.0
#: The archive writes each changed record once per batch; lingering this long between batches
#: turns a file write per event into at most one per call per second.
ARCHIVE_LINGER_S = 1.0


async def run_consumers(bus: EventBus, consumers: dict[str, Any], name: str, stop: asyncio.Event) -> None:
    """One consume loop per consumer: group = its kind, consumer = ``name`` (stable across
    restarts, so a restarted consumer first re-reads its own pending events). The archive also
    gets a periodic pass that finalises records of calls ended but never analyzed."""
    loops = [consume(bus, kind, name, handler.handle, stop=stop, flush=getattr(handler, "flush", None),
                     linger_s=ARCHIVE_LINGER_S if kind == "archive" else 0.0)
             for kind, handler in consumers.items()]
    if "archive" in consumers:
        loops.append(_finalise_periodically(consumers["archive"], stop))
    await asyncio.gather(*loops)


async def _finalise_periodically(archive: Any, stop: asyncio.Event) -> None:
    """Finalise stale records every ``ARCHIVE_FINALISE_INTERVAL_S`` and purge expired ones every
    ``ARCHIVE_PURGE_INTERVAL_S``; a database that does not answer is tried again next time."""
    last_purge = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ARCHIVE_FINALISE_INTERVAL_S):
                await stop.wait()
        try:
            await archive.finalise_stale()
            if time.monotonic() - last_purge >= ARCHIVE_PURGE_INTERVAL_S:
                last_purge = time.monotonic()
                if purged := await archive.purge():
                    log.info("archive: purged %d records past their retention", purged)
        except Exception as exc:
            log.warning("archive: finalising or purging failed (retried next time): %r", exc)
