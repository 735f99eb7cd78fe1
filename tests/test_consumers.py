"""The three consumers' logic: exact analytics under duplicates, one order-independent archive
record per call, and escalations that fire once per call with a signed notification."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from callray.consumers import SeenEvents
from callray.consumers.analytics import Analytics
from callray.consumers.archive import TranscriptArchive
from callray.consumers.archive_files import FileRecords
from callray.commands import CallCommand, TransferCall
from callray.consumers.escalation import Escalation, EscalationConfigError, EscalationUndelivered
from callray.settings import PROJECT_DIR, EscalationRules
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
from callray.stores.redis_client import redis_client
from callray.webhook import WEBHOOK_SEQ, verify_signature

RETELL_ENDED = {"call_id": "c1", "call_status": "ended", "start_timestamp": 1_000_000, "end_timestamp": 1_090_000,
                "duration_ms": 90_000, "disconnection_reason": "user_hangup", "transcript": "..."}
RETELL_ANALYZED = {**RETELL_ENDED, "call_analysis": {"user_sentiment": "Positive", "call_successful": True}}


def call_events(call_id: str = "c1", agent: str = "demo") -> list[Event]:
    return [
        CallStarted(call_id=call_id, seq=0, agent=agent, ts=100.0),
        CallTurn(call_id=call_id, seq=1, agent=agent, ts=101.0, response_id=1, caller_text="hi", agent_text="hello",
                 first_chunk_ms=100.0, first_sentence_ms=200.0, cache_hit=True),
        CallSuperseded(call_id=call_id, seq=2, agent=agent, ts=102.0, response_id=2, by_response_id=3),
        CallTurn(call_id=call_id, seq=3, agent=agent, ts=103.0, response_id=3, caller_text="book a table",
                 agent_text="done", first_chunk_ms=300.0, first_sentence_ms=400.0, tools=["book"], budget_miss=True,
                 prompt_tokens=120, completion_tokens=15),
        CallTurn(call_id=call_id, seq=4, agent=agent, ts=104.0, response_id=4, caller_text="bye", agent_text="bye",
                 first_chunk_ms=500.0, first_sentence_ms=600.0, fallback=True, action="end_call",
                 agent_error="RuntimeError"),
        CallEnded(call_id=call_id, seq=5, agent=agent, ts=105.0, reason="agent closed"),
        CallEnded(call_id=call_id, seq=WEBHOOK_SEQ["call_ended"], reason="user_hangup",
                  call={**RETELL_ENDED, "call_id": call_id}),
        CallAnalyzed(call_id=call_id, seq=WEBHOOK_SEQ["call_analyzed"], call={**RETELL_ANALYZED, "call_id": call_id}),
    ]


# -- SeenEvents -------------------------------------------------------------------------------

def test_seen_events_is_bounded_and_remembers_finalised_calls():
    seen = SeenEvents(per_call=2, max_calls=2)
    e = [CallStarted(call_id="a", seq=i) for i in range(3)]
    for event in e:
        seen.mark(event)
    assert not seen.seen(e[0]) and seen.seen(e[2])  # oldest seq forgotten
    seen.finalise("a")
    assert seen.seen(CallStarted(call_id="a", seq=99)) and seen.is_finalised("a")


# -- Analytics --------------------------------------------------------------------------------

async def test_analytics_counts_are_exact_under_duplicates_and_reordering():
    events = call_events("c1") + call_events("c2", agent="other")
    deliveries = events + random.Random(7).sample(events, len(events))  # every event twice, shuffled
    analytics = Analytics()
    for event in deliveries:
        await analytics.handle(event)
    snap = analytics.snapshot()
    json.dumps(snap)
    overall, demo = snap["overall"], snap["agents"]["demo"]
    assert overall["calls"] == {"active": 0, "started": 2, "ended": 2, "reconnects": 0}
    assert demo["turns"] == 3 and demo["cache_hits"] == 1 and demo["cache_hit_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert demo["budget_misses"] == 1 and demo["fallbacks"] == 1 and demo["tool_calls"] == 1
    assert demo["agent_errors"] == 1 and demo["llm_tokens"] == {"prompt": 120, "completion": 15}
    assert demo["superseded"] == 1 and demo["supersede_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert demo["first_chunk_ms"] == {"count": 3, "sum": 900.0, "p50": 300.0, "p90": 460.0, "p99": 496.0}  # interpolated (callray.stats)
    assert demo["first_sentence_ms"]["p50"] == 400.0
    assert demo["call_duration_s"]["count"] == 1
    assert overall["disconnections"] == {"user_hangup": 2}  # Retell's reason replaced our own guess
    assert overall["sentiment"] == {"Positive": 2} and overall["success"] == {"true": 2}
    assert set(snap["agents"]) == {"demo", "other"}


async def test_analytics_in_order_call_is_active_until_ended():
    analytics = Analytics()
    events = call_events()
    for event in events[:3]:
        await analytics.handle(event)
    assert analytics.snapshot()["agents"]["demo"]["calls"]["active"] == 1
    await analytics.handle(CallStarted(call_id="c1", seq=10, agent="demo", reconnect=True))
    for event in events[3:]:
        await analytics.handle(event)
    snap = analytics.snapshot()["agents"]["demo"]
    assert snap["calls"] == {"active": 0, "started": 1, "ended": 1, "reconnects": 1}
    assert snap["call_duration_s"] == {"count": 1, "sum": 5.0, "p50": 5.0, "p90": 5.0, "p99": 5.0}  # first ended wins
    for event in events:  # the call is finalised: late duplicates change nothing
        await analytics.handle(event)
    assert analytics.snapshot()["agents"]["demo"] == snap


async def test_analytics_escalations_and_prometheus_samples():
    analytics = Analytics()
    for event in call_events():
        await analytics.handle(event)
    await analytics.handle(EscalationRequested(call_id="c9", seq=7, agent="demo", rule="keywords"))
    await analytics.handle(EscalationRequested(call_id="c9", seq=7, agent="demo", rule="keywords"))
    samples = analytics.prometheus_samples()
    as_dict = {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples}
    assert as_dict[("callray_escalations_requested_total", (("agent", "demo"),))] == 1.0
    assert as_dict[("callray_turns_total", (("agent", "_all"),))] == 3.0
    assert as_dict[("callray_disconnections_total", (("agent", "demo"), ("reason", "user_hangup")))] == 1.0
    assert all(isinstance(v, float) and isinstance(n, str) for n, _, v in samples)
    assert not any("quantile" in labels or "_ms" in name for name, labels, _ in samples)  # latencies: histograms


async def test_each_new_latency_sample_is_observed_once_per_agent_for_histograms():
    analytics, observed = Analytics(), []
    await analytics.handle(call_events(call_id="before", agent="demo")[1])  # e.g. replayed before observe was set
    analytics.observe = lambda histogram, agent, value: observed.append((histogram, agent, value))
    for _ in range(2):  # at-least-once: duplicates are not observed again
        for event in call_events():
            await analytics.handle(event)
    assert observed == [("first_chunk_ms", "demo", 100.0), ("first_sentence_ms", "demo", 200.0),
                        ("first_chunk_ms", "demo", 300.0), ("first_sentence_ms", "demo", 400.0),
                        ("first_chunk_ms", "demo", 500.0), ("first_sentence_ms", "demo", 600.0),
                        ("call_duration_seconds", "demo", 5.0)]
    assert analytics.snapshot()["overall"]["first_chunk_ms"]["count"] == 4  # the windows keep every sample


# -- TranscriptArchive ----------------------------------------------------------------------------

async def test_archive_record_is_independent_of_order_and_duplicates(tmp_path: Path):
    events = call_events()
    in_order = TranscriptArchive(FileRecords(tmp_path / "a"))
    for event in events:
        await in_order.handle(event)
    await in_order.flush()
    shuffled = TranscriptArchive(FileRecords(tmp_path / "b"))
    rng = random.Random(3)
    deliveries = events + events[:4]
    for _ in range(5):
        rng.shuffle(deliveries)
        for i, event in enumerate(deliveries):
            await shuffled.handle(event)
            if i % 3 == 0:
                await shuffled.flush()
    await shuffled.flush()
    a, b = (tmp_path / "a" / "c1.json").read_bytes(), (tmp_path / "b" / "c1.json").read_bytes()
    assert a == b
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["c1.json"]  # one record, no temp files left
    record = await shuffled.get("c1")
    assert [t["response_id"] for t in record["turns"]] == [1, 3, 4] and record["superseded"] == [2]
    assert record["final"] and record["ended"] and record["analyzed"] and record["end_reason"] == "user_hangup"
    assert record["call"]["call_analysis"]["user_sentiment"] == "Positive" and record["tools"] == ["book"]
    assert record["turns"][1]["timings"]["first_sentence_ms"] == 400.0
    assert record["started_at"] == 100.0 and record["ended_at"] == 105.0  # the earliest report of the end


async def test_archive_analyzed_before_ended_still_completes(tmp_path: Path):
    archive = TranscriptArchive(FileRecords(tmp_path))
    analyzed = {"call_id": "c1", "call_analysis": {"call_summary": "ok"}, "call_status": "ended", "transcript": "full"}
    await archive.handle(CallAnalyzed(call_id="c1", seq=WEBHOOK_SEQ["call_analyzed"], call=analyzed))
    await archive.flush()
    assert not (await archive.get("c1"))["final"]
    ended = {"call_id": "c1", "call_status": "ongoing", "transcript": "partial", "end_timestamp": 5000,
             "disconnection_reason": "agent_hangup"}
    await archive.handle(CallEnded(call_id="c1", seq=WEBHOOK_SEQ["call_ended"], call=ended))
    await archive.flush()
    record = await archive.get("c1")
    assert record["final"] and record["end_reason"] == "agent_hangup"
    assert record["call"]["transcript"] == "full" and record["call"]["call_status"] == "ended"  # analyzed wins
    assert record["call"]["end_timestamp"] == 5000  # and ended fills the rest


async def test_archive_turn_for_same_response_id_replaces_and_survives_restart(tmp_path: Path):
    archive = TranscriptArchive(FileRecords(tmp_path))
    await archive.handle(CallTurn(call_id="c1", seq=3, response_id=2, agent_text="second try"))
    await archive.handle(CallTurn(call_id="c1", seq=2, response_id=2, agent_text="first try"))  # older, late
    await archive.handle(CallTurn(call_id="c1", seq=1, response_id=1, agent_text="one"))
    await archive.flush()
    restarted = TranscriptArchive(FileRecords(tmp_path))
    await restarted.handle(CallEnded(call_id="c1", seq=9, reason="done"))
    await restarted.flush()
    record = await restarted.get("c1")
    assert [(t["response_id"], t["agent"]) for t in record["turns"]] == [(1, "one"), (2, "second try")]
    assert record["ended"] and not record["final"]
    restarted.grace_s = 0
    assert await restarted.finalise_stale() == ["c1"]
    assert (await TranscriptArchive(FileRecords(tmp_path)).get("c1"))["final"]
    assert await restarted.get("never") is None


async def test_archive_unsafe_call_ids_stay_inside_the_directory(tmp_path: Path):
    archive = TranscriptArchive(FileRecords(tmp_path / "arch"))
    await archive.handle(CallStarted(call_id="../../etc/passwd", seq=0))
    await archive.handle(CallStarted(call_id=".hidden", seq=0))
    await archive.flush()
    files = sorted(p.name for p in (tmp_path / "arch").iterdir())
    assert len(files) == 2 and all(p.parent == tmp_path / "arch" for p in (tmp_path / "arch").iterdir())
    assert (await archive.get("../../etc/passwd"))["call_id"] == "../../etc/passwd"


async def test_archive_writes_each_changed_record_once_per_batch_and_a_failed_write_loses_nothing(tmp_path):
    """The archive acks a batch only after its flush: one file write per changed call. A failed
    write is the disk's failure, not the events': the consumer retries it before reading more
    (the batch unacked meanwhile), applied again from what is on disk."""
    from callray.events.consume import consume
    from callray.events.memory import MemoryBus

    class Disk(FileRecords):
        writes: list[str] = []
        broken = False

        def _write(self, call_id: str, text: str) -> None:
            if self.broken:
                raise OSError("disk full")
            self.writes.append(call_id)
            super()._write(call_id, text)

    disk = Disk(tmp_path)
    archive = TranscriptArchive(disk)
    bus = MemoryBus(claim_idle_ms=50)
    for call_id in ("a", "b"):
        for event in call_events(call_id)[:5]:
            await bus.publish(event)
    stop = asyncio.Event()
    loop = asyncio.create_task(consume(bus, "archive", "t", archive.handle, stop=stop, flush=archive.flush, block_ms=20))
    try:
        for _ in range(100):
            if sorted(disk.writes) == ["a", "b"]:
                break
            await asyncio.sleep(0.02)
        assert sorted(disk.writes) == ["a", "b"]  # ten events, two writes
        disk.broken = True
        await bus.publish(CallEnded(call_id="a", seq=5, reason="user_hangup"))
        await asyncio.sleep(0.2)  # handled, its flush failed and is being retried, nothing acked
        assert not (await TranscriptArchive(FileRecords(tmp_path)).get("a"))["ended"]
        assert not (await archive.get("a"))["ended"]  # nor does its cache: the record folded in place was dropped
        assert bus.stats()["dead_lettered"] == 0
        disk.broken = False
        for _ in range(100):
            if (await TranscriptArchive(FileRecords(tmp_path)).get("a"))["ended"]:
                break
            await asyncio.sleep(0.02)
        assert (await TranscriptArchive(FileRecords(tmp_path)).get("a"))["ended"]
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


async def test_archive_rewrites_no_record_that_redelivered_events_leave_unchanged(tmp_path):
    """Records are folded in place and compared by the digest of the text on disk (no copy)."""
    written: list[str] = []

    class Disk(FileRecords):
        def _write(self, call_id: str, text: str) -> None:
            written.append(call_id)
            super()._write(call_id, text)

    events = call_events("a")[:5]
    disk = Disk(tmp_path)
    await disk.update({"a": events})
    await disk.update({"a": events[2:4]})  # at-least-once: the same events again
    assert written == ["a"]
    fresh = Disk(tmp_path)  # the digest of a record read back from disk
    await fresh.update({"a": events[:1]})
    assert written == ["a"]
    await fresh.update({"a": [CallEnded(call_id="a", seq=5, reason="user_hangup")]})
    assert written == ["a", "a"] and (await FileRecords(tmp_path).get("a"))["ended"]


# -- Escalation -----------------------------------------------------------------------------------

class Receiver:
    """A minimal HTTP server on 127.0.0.1 that records POST bodies and headers."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/escalations"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.requests.append((headers, body))
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def receiver():
    r = Receiver()
    url = await r.start()
    yield r, url
    await r.stop()


class Commands:
    def __init__(self, fail: int = 0, undelivered: int = 0) -> None:
        self.sent: list[tuple[str, CallCommand]] = []
        self.fail, self.undelivered = fail, undelivered

    async def __call__(self, call_id: str, command: CallCommand) -> bool:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("call host unreachable")
        if self.undelivered:
            self.undelivered -= 1
            return False
        self.sent.append((call_id, command))
        return True


def transfer(number: str, line: str) -> CallCommand:
    return TransferCall(number=number, line=line)


def turn(call_id: str, seq: int, text: str = "", **kw) -> CallTurn:
    return CallTurn(call_id=call_id, seq=seq, response_id=seq, caller_text=text, agent="demo", **kw)


RULE_CASES = {
    "human_phrases": ["what are your hours", "Can I speak to a HUMAN, please?"],
    "keywords": ["I want my money back", "I will call my Lawyer"],
    "negative_phrases": ["hello", "You're useless."],
    "max_fallback_turns": [("a", True), ("b", True)],
    "repeated_question": ["where is my order", "Where is my order?", "where is my order"],
}


@pytest.mark.parametrize("rule", list(RULE_CASES))
async def test_each_rule_escalates_once_with_signed_notification(rule, receiver, monkeypatch):
    http, url = receiver
    monkeypatch.setenv("TEST_ESC_SECRET", "s3cret")
    rules = EscalationRules(keywords=["lawyer"], transfer_number="+15550100", notify_url=url,
                            notify_secret_env="TEST_ESC_SECRET")
    commands, emitted = Commands(), []
    escalation = Escalation(rules, commands, emit=emitted.append)
    turns = []
    for i, item in enumerate(RULE_CASES[rule], start=1):
        text, fallback = item if isinstance(item, tuple) else (item, False)
        turns.append(turn("c1", i, text, fallback=fallback))
    for event in turns[:-1]:
        await escalation.handle(event)
    assert commands.sent == []  # not yet
    for event in turns[-1:] + turns + [turn("c1", 50, "speak to a human")]:  # duplicates and a second hit
        await escalation.handle(event)
    assert commands.sent == [("c1", transfer("+15550100", rules.handoff_line))]
    assert [type(e) for e in emitted] == [EscalationRequested, EscalationPerformed]
    assert emitted[0].rule == rule and emitted[1].transfer_number == "+15550100"
    assert len(http.requests) == 1
    headers, body = http.requests[0]
    verify_signature(body, headers["x-callray-signature"], "s3cret")
    summary = json.loads(body)
    assert summary["call_id"] == "c1" and summary["rule"] == rule and summary["reason"]
    assert summary["caller_lines"][-1] == turns[-1].caller_text
    await escalation.close()


async def test_no_escalation_for_ordinary_calls_and_reminders():
    commands = Commands()
    escalation = Escalation(EscalationRules(transfer_number="+1"), commands)
    for i in range(1, 6):  # a reminder repeats the caller's last line: not a repeated question
        await escalation.handle(turn("c1", i, "where is my order", kind="reminder"))
    await escalation.handle(turn("c1", 6, "(unintelligible audio)"))
    await escalation.handle(turn("c1", 7, "thanks", fallback=True))
    await escalation.handle(turn("c1", 8, "ok"))
    await escalation.handle(turn("c1", 9, "bye", fallback=True))
    assert commands.sent == []


async def test_once_per_call_across_restarts_via_redis(redis_url):
    client = redis_client(redis_url)
    call_id = f"c-{uuid.uuid4().hex}"
    rules = EscalationRules(transfer_number="+1")
    first, second = Commands(), Commands()
    await Escalation(rules, first, redis=client).handle(turn(call_id, 1, "real person please"))
    restarted = Escalation(rules, second, redis=client)  # fresh memory: only Redis knows
    await restarted.handle(turn(call_id, 1, "real person please"))
    await restarted.handle(turn(call_id, 2, "a real person!"))
    assert len(first.sent) == 1 and second.sent == []
    assert await client.exists(f"callray:escalated:{call_id}") == 1
    await client.delete(f"callray:escalated:{call_id}")
    await client.aclose()


async def test_failed_command_releases_the_claim_and_redelivery_retries(redis_url):
    client = redis_client(redis_url)
    call_id = f"c-{uuid.uuid4().hex}"
    commands = Commands(fail=1)
    escalation = Escalation(EscalationRules(transfer_number="+1"), commands, redis=client)
    event = turn(call_id, 1, "operator")
    with pytest.raises(ConnectionError):
        await escalation.handle(event)
    assert await client.exists(f"callray:escalated:{call_id}") == 0
    await escalation.handle(event)  # the bus redelivers the unacked turn
    assert len(commands.sent) == 1 and escalation.counts["command_failed"] == 1
    await client.delete(f"callray:escalated:{call_id}")
    await client.aclose()


async def test_a_transfer_no_live_socket_took_is_not_reported_performed_and_is_retried(redis_url):
    """The command returned False (no live socket): no escalation.performed, claim released, retried."""
    client = redis_client(redis_url)
    call_id = f"c-{uuid.uuid4().hex}"
    commands, emitted = Commands(undelivered=1), []
    escalation = Escalation(EscalationRules(transfer_number="+1"), commands, emit=emitted.append, redis=client)
    event = turn(call_id, 1, "operator")
    with pytest.raises(EscalationUndelivered):
        await escalation.handle(event)
    assert [type(e) for e in emitted] == [EscalationRequested] and escalation.counts["command_undelivered"] == 1
    assert await client.exists(f"callray:escalated:{call_id}") == 0
    await escalation.handle(event)  # the bus redelivers the unacked turn; the socket is back
    assert len(commands.sent) == 1 and [type(e) for e in emitted][-1] is EscalationPerformed
    await client.delete(f"callray:escalated:{call_id}")
    await client.aclose()


async def test_ended_call_is_not_escalated_and_notify_failure_is_not_fatal(monkeypatch):
    monkeypatch.delenv("NO_SUCH_SECRET_ENV", raising=False)
    with pytest.raises(EscalationConfigError, match="NO_SUCH_SECRET_ENV"):
        Escalation(EscalationRules(notify_url="http://127.0.0.1:9/x", notify_secret_env="NO_SUCH_SECRET_ENV"))
    commands = Commands()
    unsigned = EscalationRules(transfer_number="+1", notify_url="http://127.0.0.1:1/x", notify_secret_env=None)
    escalation = Escalation(unsigned, commands)
    await escalation.handle(CallEnded(call_id="done", seq=5))
    await escalation.handle(turn("done", 4, "operator"))  # late turn of an ended call
    await escalation.handle(turn("live", 1, "operator"))  # notification target is down
    assert commands.sent == [("live", transfer("+1", unsigned.handoff_line))]
    assert escalation.counts["notify_failed"] == 1
    await escalation.close()


def test_rules_describe_every_field():
    assert all(f.description for f in EscalationRules.model_fields.values())


async def test_run_consumers_finalises_ended_but_never_analyzed_records(tmp_path, monkeypatch):
    from callray.events.memory import MemoryBus
    from callray.consumers import archive as archive_module, runner

    monkeypatch.setattr(archive_module, "FINALISE_INTERVAL_S", 0.05)
    bus, stop = MemoryBus(), asyncio.Event()
    archive = TranscriptArchive(FileRecords(tmp_path), grace_s=0.0)
    task = asyncio.create_task(runner.run_consumers(bus, {"archive": archive}, "t", stop))
    try:
        await bus.publish(CallEnded(call_id="never-analyzed", seq=1, reason="user_hangup"))
        for _ in range(100):
            record = await archive.get("never-analyzed")
            if record is not None and record["final"]:
                break
            await asyncio.sleep(0.05)
        assert record is not None and record["final"] is True
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_an_escalation_cut_off_mid_transfer_happens_on_redelivery(redis_url):
    """The consumer died while its transfer command was in flight. Before, a Redis claim taken
    ahead of the command outlived it (7 days), and the redelivered turn was never escalated."""
    import asyncio

    client = redis_client(redis_url)
    call_id = f"c-{uuid.uuid4().hex}"
    rules = EscalationRules(transfer_number="+1")

    class DiesMidCommand(Commands):
        async def __call__(self, call_id: str, command: CallCommand) -> bool:
            raise asyncio.CancelledError  # the actor is being torn down

    with pytest.raises(asyncio.CancelledError):
        await Escalation(rules, DiesMidCommand(), redis=client).handle(turn(call_id, 1, "operator"))
    commands = Commands()
    restarted = Escalation(rules, commands, redis=client)  # its successor gets the unacked turn again
    await restarted.handle(turn(call_id, 1, "operator"))
    assert commands.sent == [(call_id, transfer("+1", rules.handoff_line))]
    assert await client.exists(f"callray:escalated:{call_id}") == 1  # recorded after the transfer
    await client.delete(f"callray:escalated:{call_id}")
    await client.aclose()


async def test_a_redelivered_turn_is_not_counted_twice():
    commands = Commands(undelivered=1)
    escalation = Escalation(EscalationRules(repeated_question=2, transfer_number="+1"), commands)
    await escalation.handle(turn("c1", 1, "where is my refund"))
    second = turn("c1", 2, "where is my refund")
    with pytest.raises(EscalationUndelivered):
        await escalation.handle(second)
    await escalation.handle(second)  # redelivered: escalates now, counted once
    assert len(commands.sent) == 1
    assert escalation._calls["c1"].repeats["where is my refund"] == 2


@pytest.mark.parametrize("kind, policy", [("archive", "SCHED_IDLE"), ("analytics", "SCHED_IDLE"),
                                          ("escalation", "SCHED_OTHER")])
def test_consumers_run_behind_the_calls_and_escalation_ahead_of_the_other_consumers(kind: str, policy: str) -> None:
    """Niceness 19 left a consumer 15/36 of a replica's share of a busy core (Ray starts workers
    at 15): figures and records take only the CPU no one else wants; escalation, which acts on
    live calls, stays at 19. Every thread: one started before (as Ray's are) and one after."""
    script = textwrap.dedent(f"""
        import json, os, threading, time
        from actors.consumers import run_behind_calls
        threading.Thread(target=time.sleep, args=(2,)).start()
        run_behind_calls({kind!r})
        threading.Thread(target=time.sleep, args=(2,)).start()
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        print(json.dumps([len(tids), sorted({{os.sched_getscheduler(t) for t in tids}}),
                          sorted({{os.getpriority(os.PRIO_PROCESS, t) for t in tids}})]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    threads, policies, niceness = json.loads(done.stdout.splitlines()[-1])
    assert threads >= 3 and policies == [getattr(os, policy)] and niceness == [19]
