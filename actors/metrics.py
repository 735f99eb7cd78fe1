"""Prometheus metrics of the call hosts, through Ray's metrics API (exported as ``ray_callray_*``).

``MeteredSink`` sits between the conversations and the event bus: every event a call emits
is counted here on its way, so metrics need no second code path in the call logic.
"""

from __future__ import annotations

from typing import Any

from ray.util import metrics

from callray.events import CallStarted, CallTurn, Event

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 200, 300, 500, 800, 1200, 2000, 5000]


class HostMetrics:
    """The figures one host exports; tagged with the host name and the architecture."""

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
        self.turns = metrics.Counter("callray_turns", "Answered requests.", tag_keys=keys)
        self.cache_hits = metrics.Counter("callray_cache_hits", "Turns served from the response cache.", tag_keys=keys)
        self.cache_misses = metrics.Counter("callray_cache_misses", "Cacheable turns not in the cache.", tag_keys=keys)
        self.budget_misses = metrics.Counter("callray_budget_misses", "Turns that needed a holding phrase.",
                                             tag_keys=keys)
        self.reconnects = metrics.Counter("callray_reconnects", "Sockets that re-joined a known call.", tag_keys=keys)
        self.events_dropped = metrics.Counter("callray_events_dropped", "Events dropped by a full local buffer.",
                                              tag_keys=keys)
        self._reported: dict[str, float] = {}

    def observe(self, event: Event) -> None:
        if isinstance(event, CallTurn):
            self.turns.inc(1, self.tags)
            if event.first_chunk_ms is not None:
                self.first_chunk.observe(event.first_chunk_ms, self.tags)
            if event.first_sentence_ms is not None:
                self.first_sentence.observe(event.first_sentence_ms, self.tags)
            if event.cache_hit:
                self.cache_hits.inc(1, self.tags)
            if event.budget_miss:
                self.budget_misses.inc(1, self.tags)
        elif isinstance(event, CallStarted) and event.reconnect:
            self.reconnects.inc(1, self.tags)

    def update(self, stats: dict[str, Any], bus_stats: dict[str, Any]) -> None:
        """Periodic gauges from the host's and the bus's own counters."""
        self.active_calls.set(stats["active_calls"], self.tags)
        self.connected_calls.set(stats["connected_calls"], self.tags)
        self._advance(self.cache_misses, "cache_misses",
                      sum(agent.get("misses", 0) for agent in stats.get("cache", {}).values()))
        self._advance(self.events_dropped, "events_dropped", bus_stats.get("dropped", 0))

    def _advance(self, counter: metrics.Counter, key: str, total: float) -> None:
        """Bring a counter up to a cumulative total counted elsewhere."""
        delta = total - self._reported.get(key, 0)
        if delta > 0:
            counter.inc(delta, self.tags)
            self._reported[key] = total


class MeteredSink:
    """An event sink that counts each event for the metrics, then hands it to the bus."""

    def __init__(self, inner: Any, host_metrics: HostMetrics):
        self.inner, self.metrics = inner, host_metrics

    def emit(self, event: Event) -> None:
        try:
            self.metrics.observe(event)
        finally:
            self.inner.emit(event)
