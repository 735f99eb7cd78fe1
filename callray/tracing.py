"""Optional OpenTelemetry tracing: one span per answered turn.

Off by default (``logging.tracing``). When on, spans go to whatever tracer provider the process
has (configure one with the standard ``OTEL_*`` environment or the OpenTelemetry SDK); without
one they cost nothing. The library never requires OpenTelemetry to be installed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

_tracer: Any = None


def enable(enabled: bool = True) -> None:
    """Turn turn-spans on (or off) in this process."""
    global _tracer
    if not enabled:
        _tracer = None
        return
    from opentelemetry import trace

    _tracer = trace.get_tracer("callray")


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span when tracing is on, else nothing (``None``)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current
