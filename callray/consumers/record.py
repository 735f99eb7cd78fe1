"""A call's archived record, as a function of the *set* of its events.

Not of their order or count: duplicates and out-of-order webhooks (``call_analyzed`` before
``call_ended``) give the same record. Turns are keyed by ``response_id`` (the latest
activation's, then the highest seq, wins), Retell's call object is merged key by key by source
rank, times are minima. The archive's backends (``archive_files``, ``archive_postgres``) keep
records; this module only says what a record is.
"""

from __future__ import annotations

import json
from typing import Any

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


def new_record(call_id: str) -> dict[str, Any]:
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


def apply(r: dict[str, Any], event: Event) -> None:
    """Fold one event into record ``r``. ``r["turns"]`` may hold only some of the call's turns
    (a database backend loads those the events touch): a turn event merges into its own."""
    if event.agent and not r["agent"]:
        r["agent"] = event.agent
    if isinstance(event, CallStarted):
        r["started_at"] = _min(r["started_at"], event.ts)
        r["reconnected"] = r["reconnected"] or event.reconnect
    elif isinstance(event, CallTurn):
        _apply_turn(r, event)
    elif isinstance(event, CallSuperseded):
        r["superseded"] = sorted(set(r["superseded"]) | {event.response_id})
    elif isinstance(event, (EscalationRequested, EscalationPerformed)):
        escalation = r["escalation"] or {"rule": event.rule}
        if isinstance(event, EscalationRequested):
            escalation.update(rule=event.rule, reason=event.reason,
                              requested_at=_min(escalation.get("requested_at"), event.ts))
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


def caller_of(record: dict[str, Any]) -> str | None:
    """What erasure by phone number finds this call by: the keyed hash of the caller's number
    a redacted call object carries (``caller_key``), else the number itself (unredacted)."""
    call = record["call"]
    key, number = call.get("caller_key"), call.get("from_number")
    if isinstance(key, str) and key:
        return key
    return number if isinstance(number, str) and number.startswith("+") else None


def in_export(record: dict[str, Any], since: float | None) -> bool:
    """Whether an export from ``since`` (unix seconds; None: all) includes this record: it
    ended, or (never ended) started, at or after ``since``."""
    if since is None:
        return True
    at = record.get("ended_at") or record.get("started_at")
    return at is not None and at >= since


def serialise(record: dict[str, Any]) -> str:
    """The record as stable JSON (sorted keys): equal records give equal text."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _merge_call(r: dict[str, Any], call: dict[str, Any], rank: int) -> None:
    """Merge a call object key by key; a key keeps the value from its highest-ranked source
    (analyzed 3 > Retell's ended 2 > our own 1), so arrival order does not matter."""
    ranks = r["call_key_rank"]
    for key, value in call.items():
        if ranks.get(key, 0) <= rank:
            r["call"][key], ranks[key] = value, rank


def _apply_turn(r: dict[str, Any], event: CallTurn) -> None:
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
    r["tools"] = sorted(set(r["tools"]) | set(event.tools))  # every tool the call used
