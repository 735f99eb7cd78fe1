"""Live call analytics from the event stream: per agent and overall.

Counts are exact under at-least-once delivery: turn-level events are deduped on
their identity (call_id, epoch, seq) and call-level facts (started, ended, analyzed) are counted once per call,
whichever of the call's own events or Retell's webhooks reports them first. Latencies and
durations keep a sliding window of the latest samples for percentiles, and each new sample
goes to ``observe`` (an exporter's histograms).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from cachetools import LRUCache

from callray.consumers import PerEvent, SeenEvents
from callray.events import (
    CallAnalyzed,
    CallEnded,
    CallStarted,
    CallSuperseded,
    CallTurn,
    EscalationPerformed,
    EscalationRequested,
    Event,
)
from callray.stats import percentile

OVERALL = "_all"
QUANTILES = (0.5, 0.9, 0.99)
#: observe(histogram, agent, value): one new sample of one agent.
Observer = Callable[[str, str, float], None]


class Window:
    """The latest ``size`` samples, for percentiles."""

    def __init__(self, size: int):
        self.samples: deque[float] = deque(maxlen=size)
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        self.samples.append(value)
        self.count += 1
        self.total += value

    def quantile(self, q: float) -> float | None:
        if not self.samples:
            return None
        return percentile(sorted(self.samples), q)

    def summary(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {"count": self.count, "sum": round(self.total, 3)}
        for q in QUANTILES:
            value = self.quantile(q)
            out[f"p{round(q * 100)}"] = None if value is None else round(value, 3)
        return out


@dataclass
class _Stats:
    window: int
    agent: str
    counts: Counter[str] = field(default_factory=Counter)
    disconnections: Counter[str] = field(default_factory=Counter)
    sentiment: Counter[str] = field(default_factory=Counter)
    success: Counter[str] = field(default_factory=Counter)
    first_chunk_ms: Window = field(init=False)
    first_sentence_ms: Window = field(init=False)
    call_duration_s: Window = field(init=False)

    def __post_init__(self) -> None:
        self.first_chunk_ms = Window(self.window)
        self.first_sentence_ms = Window(self.window)
        self.call_duration_s = Window(self.window)

    def snapshot(self) -> dict[str, Any]:
        c = self.counts
        turns = c["turns"]
        return {
            "calls": {k: c[f"calls_{k}"] for k in ("active", "started", "ended", "reconnects")},
            "turns": turns,
            "reminders": c["reminders"],
            "cache_hits": c["cache_hits"],
            "cache_hit_rate": round(c["cache_hits"] / turns, 4) if turns else None,
            "budget_misses": c["budget_misses"],
            "fallbacks": c["fallbacks"],
            "agent_errors": c["agent_errors"],
            "llm_tokens": {"prompt": c["prompt_tokens"], "completion": c["completion_tokens"]},
            "superseded": c["superseded"],
            "supersede_rate": round(c["superseded"] / turns, 4) if turns else None,
            "tool_calls": c["tool_calls"],
            "escalations": {"requested": c["escalations_requested"], "performed": c["escalations_performed"]},
            "first_chunk_ms": self.first_chunk_ms.summary(),
            "first_sentence_ms": self.first_sentence_ms.summary(),
            "call_duration_s": self.call_duration_s.summary(),
            "disconnections": dict(self.disconnections),
            "sentiment": dict(self.sentiment),
            "success": dict(self.success),
        }


@dataclass
class _Call:
    agent: str = ""
    started_ts: float | None = None
    active: bool = False
    ended: bool = False
    analyzed: bool = False
    reason: str = ""
    reason_from_call: bool = False


def _call_duration_s(event: CallEnded, started_ts: float | None) -> float | None:
    call = event.call
    if isinstance(call.get("duration_ms"), (int, float)):
        return call["duration_ms"] / 1000
    start, end = call.get("start_timestamp"), call.get("end_timestamp")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and end >= start:
        return (end - start) / 1000
    return event.ts - started_ts if started_ts is not None and event.ts >= started_ts else None


class Analytics(PerEvent):
    """Consumes every event kind; ``snapshot()`` for the dashboard, ``prometheus_samples()`` and
    ``observe`` for a metrics exporter. ``observe`` is set after a replay, so an exporter's
    histograms never count a sample twice."""

    kind = "analytics"

    def __init__(self, window: int = 2048, max_calls: int = 50_000):
        self.window = window
        self.observe: Observer | None = None
        self._seen = SeenEvents(max_calls=max_calls)
        self._calls: LRUCache[str, _Call] = LRUCache(max_calls)
        self._stats: dict[str, _Stats] = {OVERALL: _Stats(window, OVERALL)}

    def _call(self, event: Event) -> _Call:
        call = self._calls.get(event.call_id)
        if call is None:
            call = self._calls[event.call_id] = _Call()
        if event.agent and not call.agent:
            call.agent = event.agent
        return call

    def _targets(self, call: _Call) -> tuple[_Stats, _Stats]:
        agent = call.agent or "unknown"
        if agent not in self._stats:
            self._stats[agent] = _Stats(self.window, agent)
        return self._stats[OVERALL], self._stats[agent]

    async def handle(self, event: Event) -> None:
        if self._seen.seen(event):
            return
        call = self._call(event)
        for stats in self._targets(call):
            self._count(stats, call, event)
        self._update_call(call, event)
        self._seen.mark(event)
        if call.ended and call.analyzed:
            self._calls.pop(event.call_id, None)
            self._seen.finalise(event.call_id)

    def _count(self, s: _Stats, call: _Call, event: Event) -> None:
        c = s.counts
        if isinstance(event, CallStarted):
            if event.reconnect or call.started_ts is not None:
                c["calls_reconnects"] += 1
            if call.started_ts is None:
                c["calls_started"] += 1
                if not call.ended:
                    c["calls_active"] += 1
        elif isinstance(event, CallTurn):
            c["turns"] += 1
            c["reminders"] += event.kind == "reminder"
            c["cache_hits"] += event.cache_hit
            c["budget_misses"] += event.budget_miss
            c["fallbacks"] += event.fallback
            c["agent_errors"] += event.agent_error is not None
            c["prompt_tokens"] += event.prompt_tokens
            c["completion_tokens"] += event.completion_tokens
            c["tool_calls"] += len(event.tools)
            if event.first_chunk_ms is not None:
                self._sample(s, s.first_chunk_ms, "first_chunk_ms", event.first_chunk_ms)
            if event.first_sentence_ms is not None:
                self._sample(s, s.first_sentence_ms, "first_sentence_ms", event.first_sentence_ms)
        elif isinstance(event, CallSuperseded):
            c["superseded"] += 1
        elif isinstance(event, EscalationRequested):
            c["escalations_requested"] += 1
        elif isinstance(event, EscalationPerformed):
            c["escalations_performed"] += 1
        elif isinstance(event, CallEnded):
            self._count_ended(s, call, event)
        elif isinstance(event, CallAnalyzed) and not call.analyzed:
            analysis = event.call.get("call_analysis") or {}
            s.sentiment[str(analysis.get("user_sentiment") or "Unknown")] += 1
            successful = analysis.get("call_successful")
            s.success["unknown" if successful is None else str(bool(successful)).lower()] += 1

    def _count_ended(self, s: _Stats, call: _Call, event: CallEnded) -> None:
        """Once per call; a later Retell webhook's disconnection_reason replaces our own guess."""
        from_call = event.call.get("disconnection_reason")
        if not call.ended:
            s.counts["calls_ended"] += 1
            if call.active:
                s.counts["calls_active"] -= 1
            duration = _call_duration_s(event, call.started_ts)
            if duration is not None:
                self._sample(s, s.call_duration_s, "call_duration_seconds", duration)
            s.disconnections[str(from_call or event.reason or "unknown")] += 1
        elif from_call and not call.reason_from_call:
            s.disconnections[call.reason] -= 1
            if s.disconnections[call.reason] <= 0:
                del s.disconnections[call.reason]
            s.disconnections[str(from_call)] += 1

    def _sample(self, s: _Stats, window: Window, histogram: str, value: float) -> None:
        """Into ``window``, and to ``observe`` as ``callray_analytics_<histogram>``."""
        window.add(value)
        if self.observe is not None and s.agent != OVERALL:  # the overall is the sum of the agents'
            self.observe(histogram, s.agent, value)

    def _update_call(self, call: _Call, event: Event) -> None:
        if isinstance(event, CallStarted) and call.started_ts is None:
            call.started_ts = event.ts
            call.active = not call.ended
        elif isinstance(event, CallEnded):
            from_call = event.call.get("disconnection_reason")
            if not call.ended or (from_call and not call.reason_from_call):
                call.reason = str(from_call or event.reason or "unknown")
                call.reason_from_call = bool(from_call)
            call.ended, call.active = True, False
        elif isinstance(event, CallAnalyzed):
            call.analyzed = True

    def snapshot(self) -> dict[str, Any]:
        """JSON-able: ``{"overall": {...}, "agents": {agent: {...}}}``."""
        return {
            "overall": self._stats[OVERALL].snapshot(),
            "agents": {name: s.snapshot() for name, s in sorted(self._stats.items()) if name != OVERALL},
        }

    def prometheus_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(metric, labels, value) triples of the counts; totals are cumulative and rebuilt by a
        replay after a restart (so export them as gauges: a counter would count the replay
        again). The overall series carries ``agent="_all"``. Latencies go to ``observe``."""
        out: list[tuple[str, dict[str, str], float]] = []
        for agent, s in sorted(self._stats.items()):
            base = {"agent": agent}
            c = s.counts
            for name in ("active", "started", "ended", "reconnects"):
                metric = "callray_calls_active" if name == "active" else f"callray_calls_{name}_total"
                out.append((metric, base, float(c[f"calls_{name}"])))
            for name in ("turns", "reminders", "cache_hits", "budget_misses", "fallbacks", "agent_errors", "superseded",
                         "tool_calls", "escalations_requested", "escalations_performed", "prompt_tokens",
                         "completion_tokens"):
                out.append((f"callray_{name}_total", base, float(c[name])))
            for label, counter, metric in (("reason", s.disconnections, "callray_disconnections_total"),
                                           ("sentiment", s.sentiment, "callray_sentiment_total"),
                                           ("successful", s.success, "callray_call_success_total")):
                for key, value in sorted(counter.items()):
                    out.append((metric, {**base, label: key}, float(value)))
        return out
