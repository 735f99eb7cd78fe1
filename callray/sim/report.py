"""The simulator's results: raw samples, counts and the percentile summary.

Kept apart from the simulator so results from several processes (or saved JSON files) can be
merged and summarised without running anything.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable

from pydantic import BaseModel, Field

from callray.stats import percentile

#: Latency metrics in the summary, in display order.
METRICS = ("setup_ms", "holding_ms", "first_chunk_ms", "first_sentence_ms", "complete_ms", "reconnect_ms")

#: Counters every result carries (zero when nothing happened), in display order.
COUNT_KEYS = (
    "calls",
    "calls_completed",
    "dropped_calls",
    "turns_sent",
    "turns_answered",
    "requests_sent",
    "superseded",
    "reminders",
    "reconnects",
    "update_only_sent",
    "pings_sent",
    "pings_answered",
    "end_calls",
    "transfers",
    "agent_interrupts",
    "tool_calls",
    "holding_phrases",
    "frames_received",
)


def describe(values: Iterable[float]) -> dict[str, float | int | None]:
    """n, p50, p90, p99 and max of some samples (None for the statistics when there are none)."""
    data = sorted(values)
    if not data:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "n": len(data),
        "p50": round(percentile(data, 0.50), 2),
        "p90": round(percentile(data, 0.90), 2),
        "p99": round(percentile(data, 0.99), 2),
        "max": round(data[-1], 2),
    }


class TurnSample(BaseModel):
    """One answered turn: latencies from sending its (final) request id."""

    call: int = Field(description="Index of the call in the run.")
    turn: int = Field(description="Turn number within the call, from 0.")
    response_id: int = Field(description="The id whose answer was measured (the superseding one).")
    kind: str = Field(description="response_required or reminder_required.")
    t_s: float = Field(description="Seconds from the start of the run to sending the request.")
    holding_ms: float | None = Field(default=None, description="To a holding phrase said before the answer "
                                                               "(None: none was).")
    first_chunk_ms: float | None = Field(description="To the first content of the answer, holding phrases aside "
                                                     "(None: no content).")
    first_sentence_ms: float = Field(description="To the answer's first sentence end (. ! ?) or completion.")
    complete_ms: float = Field(description="To content_complete: true.")


class CallSample(BaseModel):
    """One call, from opening its socket to its end."""

    call: int = Field(description="Index of the call in the run.")
    call_id: str
    t_s: float = Field(description="Seconds from the start of the run to opening the socket.")
    setup_ms: float | None = Field(description="Open to response 0 complete (None: never completed).")
    turns_answered: int
    reconnects: int
    ended: str = Field(description="completed, end_call, or dropped:<reason>.")


class SimResult(BaseModel):
    """Everything one simulation measured. ``summary()`` is the human-sized view."""

    config: dict[str, Any] = Field(description="The SimConfig the run used.")
    started_at: float = Field(description="Unix time the run started.")
    duration_s: float
    calls: list[CallSample] = Field(default_factory=list)
    turns: list[TurnSample] = Field(default_factory=list)
    reconnect_ms: list[float] = Field(default_factory=list, description="New socket open to its first frame.")
    counts: dict[str, int] = Field(default_factory=dict)
    violations: dict[str, int] = Field(default_factory=dict, description="Protocol violations by kind.")
    warnings: dict[str, int] = Field(default_factory=dict, description="Suspicious but legal behaviour by kind.")
    examples: dict[str, list[str]] = Field(default_factory=dict, description="First few details per kind.")
    dropped: dict[str, int] = Field(default_factory=dict, description="Dropped calls by reason.")
    loop_lag_ms: list[float] = Field(default_factory=list, description="Simulator event-loop sleep overshoot.")
    lag_threshold_ms: float = 20.0

    @property
    def ok(self) -> bool:
        """No protocol violation and no dropped call."""
        return not self.violations and not self.dropped

    @property
    def simulator_bottleneck(self) -> bool:
        """True when the simulator's own event loop lagged, so latencies are partly its own."""
        lag = sorted(self.loop_lag_ms)
        return bool(lag) and percentile(lag, 0.99) > self.lag_threshold_ms

    def samples(self) -> dict[str, list[float]]:
        """Raw samples per metric (milliseconds)."""
        return {
            "setup_ms": [c.setup_ms for c in self.calls if c.setup_ms is not None],
            "holding_ms": [t.holding_ms for t in self.turns if t.holding_ms is not None],
            "first_chunk_ms": [t.first_chunk_ms for t in self.turns if t.first_chunk_ms is not None],
            "first_sentence_ms": [t.first_sentence_ms for t in self.turns],
            "complete_ms": [t.complete_ms for t in self.turns],
            "reconnect_ms": list(self.reconnect_ms),
        }

    def summary(self) -> dict[str, Any]:
        """Counts, p50/p90/p99/max per metric, violations, drops and the simulator's own health."""
        counts = {k: self.counts.get(k, 0) for k in COUNT_KEYS}
        counts.update({k: v for k, v in self.counts.items() if k not in counts})
        notes = []
        if self.simulator_bottleneck:
            notes.append(
                f"the simulator itself is the bottleneck: its event loop lagged p99 "
                f"{describe(self.loop_lag_ms)['p99']} ms (> {self.lag_threshold_ms} ms); "
                "use --processes or fewer calls"
            )
        return {
            "ok": self.ok,
            "duration_s": round(self.duration_s, 3),
            "turns_per_s": round(counts["turns_answered"] / self.duration_s, 2) if self.duration_s else None,
            "counts": counts,
            "latency_ms": {m: describe(v) for m, v in self.samples().items()},
            "violations": dict(sorted(self.violations.items())),
            "warnings": dict(sorted(self.warnings.items())),
            "dropped": dict(sorted(self.dropped.items())),
            "examples": self.examples,
            "loop_lag_ms": describe(self.loop_lag_ms),
            "simulator_bottleneck": self.simulator_bottleneck,
            "notes": notes,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Summary plus every raw sample, for plots and later merging."""
        return json.dumps({"summary": self.summary(), **self.model_dump(mode="json")}, indent=indent)

    @classmethod
    def merge(cls, parts: list["SimResult"], duration_s: float | None = None) -> "SimResult":
        """One result from several (e.g. one per process); calls keep their global indices."""
        if not parts:
            raise ValueError("nothing to merge")

        def add(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
            total: Counter[str] = Counter()
            for d in dicts:
                total.update(d)
            return dict(total)

        examples: dict[str, list[str]] = {}
        for p in parts:
            for kind, ex in p.examples.items():
                examples.setdefault(kind, []).extend(ex)
        return cls(
            config=parts[0].config,
            started_at=min(p.started_at for p in parts),
            duration_s=duration_s if duration_s is not None else max(p.duration_s for p in parts),
            calls=sorted((c for p in parts for c in p.calls), key=lambda c: c.call),
            turns=sorted((t for p in parts for t in p.turns), key=lambda t: (t.call, t.turn)),
            reconnect_ms=[x for p in parts for x in p.reconnect_ms],
            counts=add(p.counts for p in parts),
            violations=add(p.violations for p in parts),
            warnings=add(p.warnings for p in parts),
            examples={k: v[:5] for k, v in examples.items()},
            dropped=add(p.dropped for p in parts),
            loop_lag_ms=[x for p in parts for x in p.loop_lag_ms],
            lag_threshold_ms=parts[0].lag_threshold_ms,
        )
