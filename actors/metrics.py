"""Prometheus metrics of the calls a process hosts, through Ray's metrics API (``ray_callray_*``).

Calls emit events on every turn; :meth:`HostMetrics.observe` only notes them in plain Python
(no Ray call on the turn path), and :meth:`HostMetrics.export`, run every few seconds by the
process's housekeeping, hands the accumulated counts and latencies to Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from typing import Any

from ray.util import metrics

from callray.events import CallStarted, CallTurn, Event
from callray.runtime import CallsRuntime

log = logging.getLogger("callray.actors.metrics")

#: Seconds between two exports.
EXPORT_INTERVAL_S = 5.0

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 200, 300, 500, 800, 1200, 2000, 5000]
#: Latencies noted between two exports, at most (older ones are dropped, never the process's memory).
MAX_PENDING_SAMPLES = 20_000


class HostMetrics:
    """The figures one process exports; tagged with its host (replica or actor) name and the architecture."""

    def __init__(self, host: str, architecture: str):
        self.tags = {"host": host, "architecture": architecture}
        keys = ("host", "architecture")
        self.active_calls = metrics.Gauge("callray_active_calls", "Calls in memory on this host.", tag_keys=keys)
        self.connected_calls = metrics.Gauge("callray_connected_calls", "Calls with a live socket.", tag_keys=keys)
        self.first_chunk = metrics.Histogram("callray_turn_first_chunk_ms", "Server time to the first chunk of a turn.",
                                             boundaries=LATENCY_BOUNDARIES_MS, tag_keys=keys)
        self.first_sentence = metrics.Histogram("callray_turn_first_sentence_ms",
                                                "Server time to the first sentence of a turn.",
                                                boundaries=LATENCY_BOUNDARIES_MS, tag_keys=keys)
        self.counters = {
            "turns": metrics.Counter("callray_turns", "Answered requests.", tag_keys=keys),
            "cache_hits": metrics.Counter("callray_cache_hits", "Turns served from the response cache.", tag_keys=keys),
            "cache_misses": metrics.Counter("callray_cache_misses", "Cacheable turns not in the cache.", tag_keys=keys),
            "budget_misses": metrics.Counter("callray_budget_misses", "Turns that needed a holding phrase.",
                                             tag_keys=keys),
            "reconnects": metrics.Counter("callray_reconnects", "Sockets that re-joined a known call.", tag_keys=keys),
            "agent_errors": metrics.Counter("callray_agent_errors", "Turns whose agent raised, hung or yielded "
                                            "something unusable (the caller heard the fallback line).", tag_keys=keys),
            "prompt_tokens": metrics.Counter("callray_llm_prompt_tokens", "LLM prompt tokens, as providers counted them.",
                                             tag_keys=keys),
            "completion_tokens": metrics.Counter("callray_llm_completion_tokens",
                                                 "LLM completion tokens, as providers counted them.", tag_keys=keys),
            "events_dropped": metrics.Counter("callray_events_dropped", "Events dropped by a full local buffer.",
                                              tag_keys=keys),
            "events_trimmed_unconsumed": metrics.Counter(
                "callray_events_trimmed_unconsumed",
                "Events trimmed from the stream by events.max_retained before every consumer group acknowledged them.",
                tag_keys=keys),
        }
        self._counts: Counter[str] = Counter()
        self._first_chunk: deque[float] = deque(maxlen=MAX_PENDING_SAMPLES)
        self._first_sentence: deque[float] = deque(maxlen=MAX_PENDING_SAMPLES)
        self._reported: dict[str, float] = {}

    def observe(self, event: Event) -> None:
        """Note one event (cheap: runs on the turn path)."""
        if isinstance(event, CallTurn):
            self._counts["turns"] += 1
            self._counts["cache_hits"] += event.cache_hit
            self._counts["budget_misses"] += event.budget_miss
            self._counts["agent_errors"] += event.agent_error is not None
            self._counts["prompt_tokens"] += event.prompt_tokens
            self._counts["completion_tokens"] += event.completion_tokens
            if event.first_chunk_ms is not None:
                self._first_chunk.append(event.first_chunk_ms)
            if event.first_sentence_ms is not None:
                self._first_sentence.append(event.first_sentence_ms)
        elif isinstance(event, CallStarted) and event.reconnect:
            self._counts["reconnects"] += 1

    def export(self, stats: dict[str, Any], bus_stats: dict[str, Any]) -> None:
        """Hand everything noted since the last export to Ray, and refresh the gauges."""
        counts, self._counts = self._counts, Counter()
        for name, n in counts.items():
            if n:
                self.counters[name].inc(n, self.tags)
        for histogram, samples in ((self.first_chunk, self._first_chunk), (self.first_sentence, self._first_sentence)):
            while samples:
                histogram.observe(samples.popleft(), self.tags)
        self.active_calls.set(stats["active_calls"], self.tags)
        self.connected_calls.set(stats["connected_calls"], self.tags)
        self._advance("cache_misses", sum(agent.get("misses", 0) for agent in stats.get("cache", {}).values()))
        self._advance("events_dropped", bus_stats.get("dropped", 0))
        self._advance("events_trimmed_unconsumed", bus_stats.get("trimmed_unconsumed", 0))

    def _advance(self, key: str, total: float) -> None:
        """Bring a counter up to a cumulative total counted elsewhere."""
        delta = total - self._reported.get(key, 0)
        if delta > 0:
            self.counters[key].inc(delta, self.tags)
            self._reported[key] = total

    async def export_forever(self, runtime: CallsRuntime) -> None:
        """Export ``runtime``'s figures every EXPORT_INTERVAL_S; a failure is logged, never fatal."""
        while True:
            await asyncio.sleep(EXPORT_INTERVAL_S)
            try:
                self.export(runtime.host.stats(), runtime.stores.events.stats())
            except Exception:  # metrics must never stop a process
                log.exception("%s: exporting metrics failed", runtime.name)
