"""Transcript archive: one complete JSON record per call, ``<directory>/<call_id>.json``.

The record is a function of the *set* of events seen, not of their order or count, so
duplicates and out-of-order webhooks (``call_analyzed`` before ``call_ended``) produce the same
file: turns are keyed by ``response_id`` (the latest activation's, then the highest seq, wins), Retell's call object is
``{**ended.call, **analyzed.call}``, times are minima. Every update is written atomically
(temp file + ``os.replace``) before the event is acked, so a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from cachetools import LRUCache

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

_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,150}")


def record_filename(call_id: str) -> str:
    """A file name for any call id: itself when safe, else a sanitised form plus a hash."""
    if _SAFE.fullmatch(call_id):
        return f"{call_id}.json"
    digest = hashlib.sha256(call_id.encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', call_id)[:100]}-{digest}.json"


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _new_record(call_id: str) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "agent": "",
        "started_at": None,
        "reconnected": False,
        "ended_at": None,
        "end_reason": "",
        "ended": False,
        "analyzed": False,
        "final": False,
        "turns": [],
        "superseded": [],
        "tools": [],
        "escalation": None,
        "call": {},
        "call_key_rank": {},
    }


def _merge_call(r: dict[str, Any], call: dict[str, Any], rank: int) -> None:
    """Merge a call object key by key; a key keeps the value from its highest-ranked source
    (analyzed 3 > Retell's ended 2 > our own 1), so arrival order does not matter."""
    ranks = r["call_key_rank"]
    for key, value in call.items():
        if ranks.get(key, 0) <= rank:
            r["call"][key], ranks[key] = value, rank


class TranscriptArchive:
    """Consumer that keeps each call's record on disk; ``get(call_id)`` reads it back.

    A record is ``final`` once both ``call.ended`` and ``call.analyzed`` arrived, or
    ``grace_s`` after ``call.ended`` when ``finalise_stale()`` runs (analysis is optional
    in Retell). Updates after that are still merged.
    """

    def __init__(self, directory: str | os.PathLike[str], *, grace_s: float = 900.0, cache_size: int = 1000):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.grace_s = grace_s
        self._cache: LRUCache[str, dict[str, Any]] = LRUCache(cache_size)
        # Records changed since the last flush: call_id -> (the record as on disk, None if no file yet; the record)
        self._dirty: dict[str, tuple[str | None, dict[str, Any]]] = {}
        self._ended_at_mono: dict[str, float] = {}

    def path(self, call_id: str) -> Path:
        return self.directory / record_filename(call_id)

    def _load(self, call_id: str) -> dict[str, Any] | None:
        record = self._cache.get(call_id)
        if record is None:
            try:
                record = json.loads(self.path(call_id).read_text(encoding="utf-8"))
            except FileNotFoundError:
                return None
            self._cache[call_id] = record
        return record

    async def get(self, call_id: str) -> dict[str, Any] | None:
        record = await asyncio.to_thread(self._load, call_id)
        return json.loads(json.dumps(record)) if record is not None else None

    async def handle(self, event: Event) -> None:
        """Apply one event to its call's record in memory; :meth:`flush` writes it."""
        pending = self._dirty.get(event.call_id)
        record = pending[1] if pending else self._cache.get(event.call_id)
        if record is None:
            record = await asyncio.to_thread(self._load, event.call_id)
        if pending is None:  # a cached or loaded record is what the disk holds; a new one is not there yet
            self._dirty[event.call_id] = (None, _new_record(event.call_id)) if record is None else (_serialise(record), record)
            record = self._dirty[event.call_id][1]
        self._apply(record, event)
        self._cache[event.call_id] = record
        if record["ended"] and not record["final"]:
            self._ended_at_mono.setdefault(event.call_id, time.monotonic())
        else:
            self._ended_at_mono.pop(event.call_id, None)

    async def flush(self) -> None:
        """Write every record changed since the last flush, in one hop to a thread: the
        consumer acks its batch only after this, so what was acked is on disk."""
        dirty, self._dirty = self._dirty, {}
        writes = {}
        for call_id, (before, record) in dirty.items():
            after = _serialise(record)
            if after != before:
                writes[call_id] = after
        if not writes:
            return
        try:
            await asyncio.to_thread(self._write_all, writes)
        except OSError:
            for call_id in writes:
                self._cache.pop(call_id, None)  # disk is the truth: the redelivery re-applies
            raise

    def _write_all(self, writes: dict[str, str]) -> None:
        for call_id, text in writes.items():
            self._write(call_id, text)

    def _apply(self, r: dict[str, Any], event: Event) -> None:
        if event.agent and not r["agent"]:
            r["agent"] = event.agent
        if isinstance(event, CallStarted):
            r["started_at"] = _min(r["started_at"], event.ts)
            r["reconnected"] = r["reconnected"] or event.reconnect
        elif isinstance(event, CallTurn):
            self._apply_turn(r, event)
        elif isinstance(event, CallSuperseded):
            r["superseded"] = sorted(set(r["superseded"]) | {event.response_id})
        elif isinstance(event, (EscalationRequested, EscalationPerformed)):
            escalation = r["escalation"] or {"rule": event.rule}
            if isinstance(event, EscalationRequested):
                escalation.update(rule=event.rule, reason=event.reason, requested_at=_min(escalation.get("requested_at"), event.ts))
            else:
                escalation.update(performed=True, transfer_number=event.transfer_number)
            r["escalation"] = escalation
        elif isinstance(event, CallEnded):
            r["ended"] = True
            end_ms = event.call.get("end_timestamp")
            ended_at = end_ms / 1000 if isinstance(end_ms, (int, float)) else event.ts
            r["ended_at"] = _min(r["ended_at"], ended_at)
            r["end_reason"] = str(event.call.get("disconnection_reason") or r["end_reason"] or event.reason)
            _merge_call(r, event.call, 2 if "end_timestamp" in event.call or "disconnection_reason" in event.call else 1)
        elif isinstance(event, CallAnalyzed):
            r["analyzed"] = True
            _merge_call(r, event.call, 3)
            if event.call.get("disconnection_reason"):
                r["end_reason"] = str(event.call["disconnection_reason"])
        r["final"] = r["final"] or (r["ended"] and r["analyzed"])

    def _apply_turn(self, r: dict[str, Any], event: CallTurn) -> None:
        turn = {
            "response_id": event.response_id,
            "seq": event.seq,
            "epoch": event.epoch,
            "kind": event.kind,
            "at": event.ts,
            "caller": event.caller_text,
            "agent": event.agent_text,
            "timings": {
                "first_chunk_ms": event.first_chunk_ms,
                "first_sentence_ms": event.first_sentence_ms,
                "complete_ms": event.complete_ms,
            },
            "cache_hit": event.cache_hit,
            "budget_miss": event.budget_miss,
            "fallback": event.fallback,
            "tools": list(event.tools),
            "action": event.action,
        }
        turns = {t["response_id"]: t for t in r["turns"]}
        current = turns.get(event.response_id)
        if current is None or (current.get("epoch", 0), current["seq"]) <= event.key:
            turns[event.response_id] = turn
        r["turns"] = [turns[k] for k in sorted(turns)]
        r["tools"] = sorted({tool for t in r["turns"] for tool in t["tools"]})

    def _write(self, call_id: str, text: str) -> None:
        target = self.path(call_id)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)

    async def finalise_stale(self) -> list[str]:
        """Mark records ended more than ``grace_s`` ago (and never analyzed) final."""
        now = time.monotonic()
        done = [cid for cid, at in self._ended_at_mono.items() if now - at >= self.grace_s]
        for call_id in done:
            del self._ended_at_mono[call_id]
            record = await asyncio.to_thread(self._load, call_id)
            if record is not None and not record["final"]:
                record["final"] = True
                await asyncio.to_thread(self._write, call_id, _serialise(record))
        return done


def _serialise(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"
