"""The Retell simulator judged against a conformant server (the baseline) and broken ones.

Every broken server here is a few lines of raw ``websockets`` that breaks exactly one rule;
the simulator must count exactly that kind of violation, and nothing for the baseline.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest
import uvicorn
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from callray.cli import main
from callray.sim.client import RetellClient, call_url, validate_frame
from callray.sim.local import free_port
from callray.sim.report import SimResult, describe
from callray.sim.simulator import PROGRESS_INTERVAL_S, Recorder, SimConfig, SimObserver, caller_token, run_simulation
from harness.baseline_server import create_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def baseline_url() -> Iterator[str]:
    """The hand-written baseline server in --echo mode, served by uvicorn in a thread."""
    port = free_port()
    app = create_app(echo=True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "baseline server did not start"
        time.sleep(0.02)
    yield f"ws://127.0.0.1:{port}/llm-websocket"
    server.should_exit = True
    thread.join(timeout=10)


# ------------------------------------------------------------------ tiny broken servers

OnRequest = Callable[[ServerConnection, dict[str, Any]], Awaitable[None]]


def _resp(rid: int, content: str, complete: Any, **extra: Any) -> str:
    return json.dumps({"response_type": "response", "response_id": rid, "content": content,
                       "content_complete": complete, **extra})


@asynccontextmanager
async def retell_server(on_request: OnRequest, config: bool = True, pong: bool = True,
                        greeting: str = "") -> AsyncIterator[str]:
    """A server that greets and pings correctly and answers requests with ``on_request``."""

    async def handler(ws: ServerConnection) -> None:
        if config:
            await ws.send(json.dumps({"response_type": "config",
                                      "config": {"auto_reconnect": True, "call_details": True}}))
        await ws.send(_resp(0, greeting, True))
        try:
            async for raw in ws:
                msg = json.loads(raw)
                kind = msg["interaction_type"]
                if kind == "ping_pong" and pong:
                    await ws.send(json.dumps({"response_type": "ping_pong", "timestamp": msg["timestamp"]}))
                elif kind in ("response_required", "reminder_required"):
                    await on_request(ws, msg)
        except ConnectionClosed:
            pass

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/llm-websocket"


def fast(url: str, **overrides: Any) -> SimConfig:
    values = dict(url=url, calls=2, turns=2, think_s=0.01, ping_interval_s=0, turn_timeout_s=0.5, seed=7,
                  connect_attempts=1, connect_retry_s=0)
    values.update(overrides)
    return SimConfig(**values)


# ------------------------------------------------------------------ the baseline passes


async def test_baseline_echo_server_passes_full_scenario(baseline_url: str) -> None:
    config = SimConfig(url=baseline_url, calls=10, turns=3, think_s=0.02, supersede_rate=0.5, supersede_gap_s=0.02,
                       reminder_rate=0.3, reconnect_rate=0.5, ping_interval_s=0.05, expect_echo=True, seed=11)
    seen: list[tuple[int, int]] = []
    result = await run_simulation(config, progress=lambda calls, turns: seen.append((calls, turns)))
    c = result.counts
    assert result.violations == {} and result.warnings == {} and result.dropped == {}
    assert result.ok
    assert c["turns_sent"] == c["turns_answered"] == 30
    assert c["calls_completed"] == 10
    assert c["superseded"] > 0 and c["reminders"] > 0 and c["reconnects"] > 0
    assert c["update_only_sent"] == 30
    assert c["pings_sent"] > 0 and c["pings_answered"] > 0
    assert c["requests_sent"] == 30 + c["superseded"] + c["reconnects"]
    assert len(result.turns) == 30 and len(result.calls) == 10
    assert all(t.first_chunk_ms is not None and t.complete_ms >= t.first_sentence_ms for t in result.turns)
    assert len(result.reconnect_ms) == c["reconnects"]
    assert all(call.setup_ms is not None and call.ended == "completed" for call in result.calls)
    assert seen[-1] == (10, 30)
    summary = result.summary()
    assert summary["latency_ms"]["complete_ms"]["n"] == 30
    assert json.loads(result.to_json())["summary"]["ok"] is True


async def test_processes_split_and_merge(baseline_url: str) -> None:
    config = fast(baseline_url, calls=4, turns=1, processes=2, turn_timeout_s=5)
    result = await run_simulation(config)
    assert result.ok, result.summary()
    assert [c.call for c in result.calls] == [0, 1, 2, 3]
    assert result.counts["turns_answered"] == 4
    assert len({c.call_id for c in result.calls}) == 4


@pytest.mark.parametrize("processes", [1, 2])
async def test_progress_is_reported_now_and_then_and_at_the_end(baseline_url: str, processes: int) -> None:
    """A report per turn and per call cost a forked simulator process a pickle, a queue put and
    a thread wake-up each, on the cores the server under test shares: reports are spaced by
    PROGRESS_INTERVAL_S, and the last one has the final counts."""
    seen: list[tuple[int, int]] = []
    started = time.monotonic()
    result = await run_simulation(fast(baseline_url, calls=20, turns=2, processes=processes, turn_timeout_s=5),
                                  progress=lambda calls, turns: seen.append((calls, turns)))
    elapsed = time.monotonic() - started
    assert result.ok, result.summary()
    assert seen[-1] == (20, 40)
    assert len(seen) <= processes * (2 + elapsed / PROGRESS_INTERVAL_S)  # a report per call and turn: 60


async def test_an_observer_watches_the_run_live_in_this_process(baseline_url: str) -> None:
    """Chaos and soak read the run while it goes (live counts, each socket opened) through the
    simulator's hooks; an observer keeps the run in-process even when processes > 1."""

    class Watcher(SimObserver):
        def __init__(self) -> None:
            self.recorders: list[Recorder] = []
            self.opens: list[tuple[str, bool, bool]] = []
            self.times: list[float] = []

        def run_started(self, recorder: Recorder) -> None:
            self.recorders.append(recorder)

        def socket_opened(self, call_id: str, at: float, reconnect: bool, ok: bool) -> None:
            self.opens.append((call_id, reconnect, ok))
            self.times.append(at)

    watcher = Watcher()
    started = time.time()
    result = await run_simulation(fast(baseline_url, calls=3, turns=1, processes=2, turn_timeout_s=5),
                                  observer=watcher)
    assert result.ok, result.summary()
    [recorder] = watcher.recorders
    assert recorder.counts["turns_answered"] == 3
    assert sorted(watcher.opens) == sorted((c.call_id, False, True) for c in result.calls)
    assert all(started <= at <= time.time() for at in watcher.times)  # unix times of this run


async def test_the_heap_a_run_starts_with_is_left_out_of_garbage_collection_until_it_ends(baseline_url: str) -> None:
    """A full collection over a driver's heap (Ray loaded) stalled the load generator for about
    230 ms, and every answer arriving meanwhile was timed that much late: the heap is frozen for
    the run, and given back to the collector after it."""
    class Watcher(SimObserver):
        frozen = 0

        def run_started(self, recorder: Recorder) -> None:
            self.frozen = gc.get_freeze_count()

    watcher = Watcher()
    assert gc.get_freeze_count() == 0
    result = await run_simulation(fast(baseline_url, calls=2, turns=1, turn_timeout_s=5), observer=watcher)
    assert result.ok, result.summary()
    assert watcher.frozen > 1000  # this process's modules and objects
    assert gc.get_freeze_count() == 0


# ------------------------------------------------------------------ each broken rule is counted


async def test_a_holding_phrase_is_timed_apart_from_the_answer() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        rid = msg["response_id"]
        await ws.send(_resp(rid, "One moment.", False))
        await asyncio.sleep(0.2)
        await ws.send(_resp(rid, "Here you are.", True))

    async with retell_server(on_request) as url:
        timed = await run_simulation(fast(url, calls=2, turns=2, holding_phrases=["One moment."]))
        naive = await run_simulation(fast(url, calls=1, turns=1))
    assert timed.ok and timed.counts["holding_phrases"] == 4
    for turn in timed.turns:  # the answer is the completing frame, 0.2 s (the server's sleep) after the holding one
        assert turn.holding_ms < turn.first_chunk_ms == turn.complete_ms
        assert turn.first_chunk_ms >= 200 and turn.first_sentence_ms >= 200
    naive_turn = naive.turns[0]  # the holding phrase read as the answer: its first chunk precedes the completion
    assert naive_turn.holding_ms is None and naive_turn.first_chunk_ms < naive_turn.complete_ms
    assert timed.counts["frames_received"] >= 2 * (2 + 2 * 2)  # config, response 0, two frames per turn


async def test_double_complete_is_counted() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.send(_resp(msg["response_id"], "Sure.", True))
        await ws.send(_resp(msg["response_id"], "", True))

    async with retell_server(on_request) as url:
        result = await run_simulation(fast(url))
    assert result.violations == {"duplicate_complete": 4}
    assert result.counts["turns_answered"] == 4


async def test_an_answer_that_says_a_sentence_twice_is_counted() -> None:
    """What a caller hears when an answer cut by a fault is regenerated under the same id."""
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        rid = msg["response_id"]
        await ws.send(_resp(rid, "Your visit is on Friday. ", False))
        await ws.send(_resp(rid, "Your visit is on Friday. Anything else?", True))

    async with retell_server(on_request) as url:
        result = await run_simulation(fast(url, calls=1, turns=2))
    assert result.violations == {"sentence_repeated": 2}
    assert "your visit is on friday." in result.examples["sentence_repeated"][0]


async def test_string_booleans_are_dropped_and_leave_the_turn_open() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.send(_resp(msg["response_id"], "Sure.", "true"))

    async with retell_server(on_request) as url:
        result = await run_simulation(fast(url))
    assert result.violations == {"wrong_type": 4, "no_complete": 4}
    assert result.counts["turns_answered"] == 0
    assert "content_complete='true'" in result.examples["wrong_type"][0]


async def test_never_completing_server() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.send(_resp(msg["response_id"], "Let me check", False))

    async with retell_server(on_request) as url:
        result = await run_simulation(fast(url))
    assert result.violations == {"no_complete": 4}


async def test_ignored_pings() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.send(_resp(msg["response_id"], "Sure.", True))

    async with retell_server(on_request, pong=False) as url:
        result = await run_simulation(fast(url, calls=1, think_s=0.3, ping_interval_s=0.05, ping_timeout_s=0.15))
    assert set(result.violations) == {"ping_unanswered"}
    assert result.counts["pings_sent"] > 0 and result.counts["pings_answered"] == 0


async def test_wire_garbage_kinds() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        rid = msg["response_id"]
        await ws.send(b"\x00\x01")
        await ws.send("not json at all")
        await ws.send(_resp(rid + 5, "Hello?", False))
        await ws.send(json.dumps({"response_id": rid, "content": "Okay.", "content_complete": True}))

    async with retell_server(on_request, config=False) as url:
        result = await run_simulation(fast(url))
    assert result.violations == {"binary_frame": 4, "not_json": 4, "unknown_response_id": 4,
                                 "missing_response_type": 4}
    assert result.warnings == {"first_frame_not_config": 2}
    assert result.counts["turns_answered"] == 4  # a frame without response_type is read as a response


async def test_content_for_older_id_after_newer_one() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        rid = msg["response_id"]
        await ws.send(_resp(rid, "Sure.", True))
        if rid > 1:
            await ws.send(_resp(rid - 1, "a late word", False))

    async with retell_server(on_request) as url:
        result = await run_simulation(fast(url, turns=3))
    assert result.violations == {"stale_content": 4}


async def test_cross_talk_needs_expect_echo() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.send(_resp(msg["response_id"], f"Thanks, {caller_token(0)}.", True))  # always call 0's name

    async with retell_server(on_request) as url:
        strict = await run_simulation(fast(url, calls=3, turns=1, expect_echo=True))
        lenient = await run_simulation(fast(url, calls=3, turns=1))
    assert strict.violations == {"cross_talk": 2, "echo_missing": 2}
    assert lenient.violations == {}


async def test_greeting_again_on_reconnect_is_a_warning() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.send(_resp(msg["response_id"], "Sure.", True))

    async with retell_server(on_request, greeting="Hello, Maple Street Clinic.") as url:
        result = await run_simulation(fast(url, reconnect_rate=1.0))
    assert result.violations == {} and result.dropped == {}
    assert result.warnings == {"greeting_repeated": 2}
    assert result.counts["reconnects"] == 2 and result.counts["turns_answered"] == 4


async def test_end_call_then_server_close_is_not_a_drop() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.send(_resp(msg["response_id"], "Goodbye!", True, end_call=True))
        await ws.close(1000)

    async with retell_server(on_request) as url:
        result = await run_simulation(fast(url, turns=3))
    assert result.ok, result.summary()
    assert result.counts["end_calls"] == 2 and result.counts["turns_answered"] == 2
    assert [c.ended for c in result.calls] == ["end_call", "end_call"]


async def test_server_error_close_and_connect_failure_are_drops() -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.close(1011)

    async with retell_server(on_request) as url:
        result = await run_simulation(fast(url))
    assert result.dropped == {"server_close_1011": 2}
    assert result.violations == {}  # a dropped call is not also a missing completion
    assert not result.ok

    closed = await run_simulation(fast(f"ws://127.0.0.1:{free_port()}/llm-websocket"))
    assert closed.dropped == {"connect_failed": 2}


# ------------------------------------------------------------------ pieces


def test_validate_frame_is_strict_about_types() -> None:
    assert validate_frame(_resp(1, "hi", True))[1] == []
    data, issues = validate_frame(json.dumps({"response_type": "response", "response_id": True,
                                              "content": "x", "content_complete": True}))
    assert data is None and [k for k, _ in issues] == ["wrong_type"]
    data, issues = validate_frame(json.dumps({"response_type": "response", "response_id": 1, "content": "x",
                                              "content_complete": True, "end_call": None}))
    assert data is not None and [k for k, _ in issues] == ["null_optional_field"]
    data, issues = validate_frame(json.dumps({"response_type": "config", "auto_reconnect": True}))
    assert data["config"] == {"auto_reconnect": True} and [k for k, _ in issues] == ["config_not_nested"]
    assert [k for k, _ in validate_frame('{"response_type": "response", "response_id": 1}')[1]] == [
        "missing_field", "missing_field"]
    assert validate_frame(json.dumps({"response_type": "tool_call_invocation", "tool_call_id": "t",
                                      "name": "book", "arguments": {"day": 1}}))[0] is None


async def test_the_retell_client_keeps_alive_only_when_asked(baseline_url: str) -> None:
    """The one client: a scripted test sees exactly what it sends; the simulator's and the CLI's
    sockets answer config as Retell does."""
    quiet, talker = RetellClient(baseline_url, "quiet-1"), RetellClient(
        baseline_url, "talker-1", call_object={"call_id": "talker-1", "agent_id": "a1"}, ping_interval_s=0.1)
    for client in (quiet, talker):
        await client.connect()
        await client.complete(0)
    await talker.wait_for(lambda f: sum(g["response_type"] == "ping_pong" for g in talker.frames) >= 2, timeout=10)
    await quiet.close()
    await talker.close()
    assert quiet.frames[0]["response_type"] == "config" and quiet.issues == [] and talker.issues == []
    assert quiet.socket.counts["pings_sent"] == 0 and not [f for f in quiet.frames if f["response_type"] == "ping_pong"]
    assert talker.socket.counts["pings_sent"] >= 2
    assert talker.socket.counts["pings_answered"] >= talker.socket.counts["pings_sent"] - 1  # one may be in flight
    assert quiet.closed and quiet.close_code == 1000


def test_urls_tokens_and_percentiles() -> None:
    assert call_url("ws://h:1/llm-websocket", "c1") == "ws://h:1/llm-websocket/c1"
    assert call_url("ws://h:1/llm-websocket/?secret=s", "c1") == "ws://h:1/llm-websocket/c1?secret=s"
    assert len({caller_token(i) for i in range(5000)}) == 5000
    assert describe([1, 2, 3, 4]) == {"n": 4, "p50": 2.5, "p90": 3.7, "p99": 3.97, "max": 4}
    with pytest.raises(ValueError, match="expect_echo"):
        SimConfig(url="ws://h/x", caller_lines=["no name here"], expect_echo=True)
    with pytest.raises(ValueError, match="ws://"):
        SimConfig(url="http://h/x")


def test_merge_adds_counts() -> None:
    a = SimResult(config={}, started_at=1, duration_s=1, counts={"calls": 1}, violations={"not_json": 1})
    b = SimResult(config={}, started_at=2, duration_s=2, counts={"calls": 2}, violations={"not_json": 2})
    merged = SimResult.merge([a, b])
    assert merged.counts == {"calls": 3} and merged.violations == {"not_json": 3} and merged.duration_s == 2


# ------------------------------------------------------------------ CLI


def test_cli_call_prints_both_sides(baseline_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["call", baseline_url, "--say-line", "Hi, this is Dana.", "--say-line", "Bye now."])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Hello, thanks for calling Maple Street Clinic" in out
    assert "caller> Hi, this is Dana." in out
    assert "agent> Got it. You said: Hi, this is Dana." in out
    assert "agent> Got it. You said: Bye now." in out
    assert "call ended: caller_hangup" in out


def test_cli_call_reads_say_file(baseline_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "lines.txt"
    script.write_text("Is the clinic open?\n\n")
    assert main(["call", baseline_url, "--say", str(script), "--call-id", "cli-file-1"]) == 0
    out = capsys.readouterr().out
    assert "call_id cli-file-1" in out and "You said: Is the clinic open?" in out


def test_cli_sim_writes_json_and_exits_zero(baseline_url: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "sim.json"
    rc = main(["sim", baseline_url, "--calls", "3", "--turns", "2", "--think-s", "0.01", "--supersede-rate", "0.5",
               "--reconnect-rate", "0.5", "--expect-echo", "--json", str(out_file), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "first_sentence_ms" in out and "OK" in out
    data = json.loads(out_file.read_text())
    assert data["summary"]["counts"]["turns_answered"] == 6 and len(data["turns"]) == 6


async def test_cli_sim_exits_nonzero_on_violations(capsys: pytest.CaptureFixture[str]) -> None:
    async def on_request(ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.send(_resp(msg["response_id"], "Sure.", True))
        await ws.send(_resp(msg["response_id"], "Sure.", True))

    async with retell_server(on_request) as url:
        rc = await asyncio.to_thread(main, ["sim", url, "--calls", "1", "--turns", "1", "--think-s", "0",
                                            "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "duplicate_complete" in out and "FAILED" in out


def test_cli_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "ws://127.0.0.1:1/x", "--supersede-rate", "2"]) == 2
    assert "supersede_rate" in capsys.readouterr().out
