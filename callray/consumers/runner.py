"""The set of background consumers a deployment runs, built from its settings.

In the event-driven architecture each kind runs in its own Ray actor on Redis Streams; in the
others every call host runs them in-process on its memory bus (best effort, per host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Iterable

from callray.consumers import Consumer
from callray.events.bus import EventBus
from callray.events.consume import consume
from callray.consumers.analytics import Analytics
from callray.consumers.archive import build_archive
from callray.consumers.escalation import Command, Emit, Escalation
from callray.settings import CallraySettings

log = logging.getLogger(__name__)

KINDS = ("analytics", "archive", "escalation")


def build_consumers(settings: CallraySettings, kinds: Iterable[str] = KINDS, *, command: Command | None = None,
                    emit: Emit | None = None, redis: Any = None) -> dict[str, Consumer]:
    """The enabled consumers among ``kinds``, by kind (archive and escalation are optional)."""
    out: dict[str, Consumer] = {}
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


#: How often a stream with an age bound is trimmed when no event comes (busy ones are trimmed as they are read).
STREAM_TRIM_INTERVAL_S = 60.0


async def run_consumers(bus: EventBus, consumers: dict[str, Consumer], name: str, stop: asyncio.Event) -> None:
    """One consume loop per consumer: group = its kind, consumer = ``name`` (stable across
    restarts, so a restarted consumer first re-reads its own pending events), and each
    consumer's work on a clock; a stream with an age bound is also trimmed periodically."""
    loops = [consume(bus, c.kind, name, c.handle, stop=stop, flush=c.flush, linger_s=c.linger_s)
             for c in consumers.values()]
    loops += [_periodically(job.interval_s, stop, f"{c.kind}: {job.what}", job.run)
              for c in consumers.values() for job in c.periodic()]
    if getattr(bus, "retention_s", None):  # an idle stream, with no reads to trim it, still ages out
        loops.append(_periodically(STREAM_TRIM_INTERVAL_S, stop, "event stream: trimming by age", bus.trim))
    await asyncio.gather(*loops)


async def close_consumers(consumers: dict[str, Consumer]) -> None:
    """Close every consumer (a failure to close one is logged, the others still close)."""
    for consumer, result in zip(consumers.values(),
                                await asyncio.gather(*(c.close() for c in consumers.values()), return_exceptions=True)):
        if isinstance(result, Exception):
            log.warning("%s consumer: closing failed: %r", consumer.kind, result)


async def _periodically(interval_s: float, stop: asyncio.Event, what: str, action: Any) -> None:
    """``action()`` every ``interval_s`` until ``stop``; a failure (a database or Redis that does
    not answer) is logged and tried again next time."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()
        try:
            await action()
        except Exception as exc:
            log.warning("%s failed (retried next time): %r", what, exc)
