"""``callray export``: the archive's records, streamed page by page for analysis.

It reads ``GET /calls`` of a running callray (the read token's route), so it works whatever the
archive's backend and wherever it runs, and writes JSON lines (one record per line, as
``GET /calls/{id}`` returns it) or CSV (one row per turn, the call's fields repeated: what a
spreadsheet or pandas wants).
"""

from __future__ import annotations

import csv
import json
import re
import time
from datetime import UTC, datetime
from typing import Any, Callable, Iterator, TextIO

import httpx

CSV_COLUMNS = ("call_id", "agent", "started_at", "ended_at", "end_reason", "response_id", "kind", "at", "caller",
               "agent_text", "first_chunk_ms", "first_sentence_ms", "complete_ms", "cache_hit", "budget_miss",
               "fallback", "tools", "action")

_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds from ``7d`` / ``12h`` / ``30m`` (that long ago), an ISO 8601 date or time
    (UTC unless it says otherwise), or unix seconds; ValueError naming the forms otherwise."""
    text = text.strip()
    if m := _AGO.fullmatch(text):
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration ago (7d, 12h, 30m), an ISO date or time "
                         "(2026-12-01, 2026-12-01T09:00:00+01:00) or unix seconds") from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def pages(client: httpx.Client, since: float | None, limit: int = 200) -> Iterator[dict[str, Any]]:
    """The pages of ``GET /calls`` until the last; raises RuntimeError with the server's reason."""
    after = ""
    while True:
        params: dict[str, Any] = {"after": after, "limit": limit}
        if since is not None:
            params["since"] = since
        reply = client.get("/calls", params=params)
        if reply.status_code != 200:
            raise RuntimeError(f"GET /calls answered {reply.status_code}: {detail(reply)}")
        page = reply.json()
        yield page
        if not page.get("next"):
            return
        after = page["next"]


def turn_rows(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A record's CSV rows: one per turn (a call without turns still gets one row)."""
    call = {k: record.get(k) for k in ("call_id", "agent", "started_at", "ended_at", "end_reason")}
    turns = record.get("turns") or [{}]
    for turn in turns:
        timings = turn.get("timings") or {}
        yield {**call, "response_id": turn.get("response_id"), "kind": turn.get("kind"), "at": turn.get("at"),
               "caller": turn.get("caller"), "agent_text": turn.get("agent"),
               **{k: timings.get(k) for k in ("first_chunk_ms", "first_sentence_ms", "complete_ms")},
               "cache_hit": turn.get("cache_hit"), "budget_miss": turn.get("budget_miss"),
               "fallback": turn.get("fallback"), "tools": " ".join(turn.get("tools") or []),
               "action": turn.get("action")}


def write_export(client: httpx.Client, out: TextIO, *, since: float | None, fmt: str,
                 progress: Callable[[int, int | None], None] | None = None) -> int:
    """Write every record from ``since`` to ``out`` as ``jsonl`` or ``csv``; returns how many.
    ``progress(done, total)`` after each page."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"--format {fmt!r}: expected jsonl or csv")
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS) if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    done, total = 0, None
    for page in pages(client, since):
        total = page.get("total", total)
        for record in page["records"]:
            if writer is not None:
                writer.writerows(turn_rows(record))
            else:
                out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            done += 1
        if progress is not None:
            progress(done, total)
    return done


def detail(reply: httpx.Response) -> str:
    try:
        return str(reply.json().get("detail", reply.text))
    except ValueError:
        return reply.text[:200]
