"""The set of background consumers a deployment runs, built from its settings.

In the event-driven architecture each kind runs in its own Ray actor on Redis Streams; in the
others every call host runs them in-process on its memory bus (best effort, per host).
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

from callray.bus import EventBus, consume
from callray.consumers.analytics import Analytics
from callray.consumers.archive import TranscriptArchive
from callray.consumers.escalation import Command, Emit, Escalation
from callray.settings import EventsSettings

KINDS = ("analytics", "archive", "escalation")


def build_consumers(events: EventsSettings, kinds: Iterable[str] = KINDS, *, command: Command | None = None,
                    emit: Emit | None = None, redis: Any = None) -> dict[str, Any]:
    """The enabled consumers among ``kinds``, by kind (archive and escalation are optional)."""
    out: dict[str, Any] = {}
    for kind in kinds:
        if kind == "analytics":
            out[kind] = Analytics()
        elif kind == "archive" and events.archive_dir:
            out[kind] = TranscriptArchive(events.archive_dir)
        elif kind == "escalation" and events.escalation is not None:
            out[kind] = Escalation(events.escalation, command, emit=emit, redis=redis)
        elif kind not in KINDS:
            raise ValueError(f"unknown consumer kind {kind!r}; expected one of {KINDS}")
    return out


async def run_consumers(bus: EventBus, consumers: dict[str, Any], name: str, stop: asyncio.Event) -> None:
    """One consume loop per consumer: group = its kind, consumer = ``name`` (stable across
    restarts, so a restarted consumer first re-reads its own pending events)."""
    await asyncio.gather(*(consume(bus, kind, name, handler.handle, stop=stop) for kind, handler in consumers.items()))
