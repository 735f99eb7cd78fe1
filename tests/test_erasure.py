"""Erasure and export on a real server (the gateway under uvicorn, Redis state and cache, the
files archive) and on the Redis stream: what an admin token may do, what a read token may not,
and that an erased call leaves nothing behind."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import httpx
import pytest

from callray.cli import main as callray
from callray.events import CallEnded, CallTurn
from callray.export import parse_since, write_export
from callray.sim.client import RetellClient
from callray.events.redis_streams import RedisStreamBus
from callray.stores.redis_client import redis_client
from callray.webhook import sign
from tests.test_gateway import Served

READ, ADMIN, KEY = "read-token-erasure", "admin-token-erasure", "key_erasure_test"
CALLER = "+14155552671"


def request(served: Served, method: str, path: str, token: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(f"{served.http}{path}", method=method,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_server) -> Iterator[Served]:
    with Served({"gateway": {"read_token": READ, "admin_token": ADMIN}, "webhook": {"api_key": KEY},
                 "redis": {"url": redis_server.url}, "state": {"backend": "redis"},
                 "cache": {"backend": "redis"}, "privacy": {"caller_key": "erasure-test-key"},
                 "archive": {"dir": str(tmp_path_factory.mktemp("archive-erasure"))}}) as server:
        yield server


async def hang_up(served: Served, call_id: str, number: str = CALLER) -> None:
    body = json.dumps({"event": "call_ended", "call": {"call_id": call_id, "from_number": number,
                                                       "disconnection_reason": "user_hangup"}}).encode()
    req = urllib.request.Request(f"{served.http}/webhook", data=body, method="POST", headers={
        "content-type": "application/json", "x-retell-signature": sign(body, KEY)})
    assert (await asyncio.to_thread(urllib.request.urlopen, req)).status == 204


async def a_call(served: Served, call_id: str, lines: list[str]) -> None:
    async with RetellClient(served.ws, call_id, call_object={"call_id": call_id, "from_number": CALLER}) as caller:
        await caller.complete(0)
        for rid, line in enumerate(lines, 1):
            await caller.turn(rid, line)


async def archived(served: Served, call_id: str, timeout: float = 10.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, record = await asyncio.to_thread(request, served, "GET", f"/calls/{call_id}", READ)
        if status == 200 and record["ended"]:
            return record
        await asyncio.sleep(0.1)
    return None


async def test_erasing_a_call_removes_its_record_state_and_cache_entries_and_needs_the_admin_token(
        served, redis_server):
    call_id = "call-erase-me"
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    erasure_log = logging.getLogger("callray.erasure")
    erasure_log.addHandler(handler)
    erasure_log.setLevel(logging.INFO)
    redis = redis_client(redis_server.url)
    try:
        async with RetellClient(served.ws, call_id, call_object={"call_id": call_id, "from_number": CALLER}) as caller:
            await caller.complete(0)
            await caller.turn(1, "What should I bring?")  # a cacheable answer this call writes
            # a live call is refused: its next checkpoint would write it again
            status, body = await asyncio.to_thread(request, served, "DELETE", f"/calls/{call_id}", ADMIN)
            assert status == 409 and "has not ended" in body["detail"]
        written = await redis.smembers(f"callray:cache:written-by:{call_id}")
        assert written, "the cacheable answer was not written with its call"
        await hang_up(served, call_id)
        assert await archived(served, call_id)
        # the read token reads; it does not erase
        assert (await asyncio.to_thread(request, served, "DELETE", f"/calls/{call_id}", READ))[0] == 401
        assert (await asyncio.to_thread(request, served, "DELETE", f"/calls/{call_id}", None))[0] == 401
        assert (await asyncio.to_thread(request, served, "DELETE", "/calls/bad.id", ADMIN))[0] == 400
        status, erased = await asyncio.to_thread(request, served, "DELETE", f"/calls/{call_id}", ADMIN)
        assert status == 200, erased
        assert erased == {"call_id": call_id, "record": True, "state": True, "cache_entries": len(written),
                          "events": 0}
        assert (await asyncio.to_thread(request, served, "GET", f"/calls/{call_id}", READ))[0] == 404
        assert lines and call_id in lines[0] and "bring" not in " ".join(lines).lower()  # the id, not the words
        assert not await redis.exists(f"callray:call:{call_id}", *written, f"callray:cache:written-by:{call_id}")
        again = await asyncio.to_thread(request, served, "DELETE", f"/calls/{call_id}", ADMIN)
        assert again == (200, {"call_id": call_id, "record": False, "state": False, "cache_entries": 0, "events": 0})
    finally:
        await redis.aclose()


async def test_a_caller_is_erased_by_number_in_any_format_and_other_callers_stay(served):
    for call_id in ("call-caller-a", "call-caller-b"):
        await a_call(served, call_id, ["What are your opening hours?"])
        await hang_up(served, call_id)
        assert await archived(served, call_id)
    await a_call(served, "call-someone-else", ["Hello"])
    await hang_up(served, "call-someone-else", "+14155550000")
    assert await archived(served, "call-someone-else")
    status, body = await asyncio.to_thread(request, served, "DELETE", "/callers/not-a-number", ADMIN)
    assert status == 400 and "not a phone number" in body["detail"]
    status, body = await asyncio.to_thread(request, served, "DELETE", "/callers/(415)%20555-2671", ADMIN)
    assert status == 200, body
    assert {c["call_id"] for c in body["calls"]} >= {"call-caller-a", "call-caller-b"}
    assert all(c["record"] for c in body["calls"])
    for call_id in ("call-caller-a", "call-caller-b"):
        assert (await asyncio.to_thread(request, served, "GET", f"/calls/{call_id}", READ))[0] == 404
    assert (await asyncio.to_thread(request, served, "GET", "/calls/call-someone-else", READ))[0] == 200


def test_the_erase_command_asks_the_server_and_says_what_it_removed(served, monkeypatch, capsys):
    monkeypatch.delenv("CALLRAY_ADMIN_TOKEN", raising=False)
    assert callray(["erase", served.http, "--call", "call-x"]) == 2
    assert "CALLRAY_ADMIN_TOKEN" in capsys.readouterr().out
    monkeypatch.setenv("CALLRAY_ADMIN_TOKEN", READ)  # the wrong token
    assert callray(["erase", served.http, "--call", "call-x"]) == 1
    assert "401" in capsys.readouterr().out
    monkeypatch.setenv("CALLRAY_ADMIN_TOKEN", ADMIN)
    assert callray(["erase", served.http, "--phone", "+1 415 555 0199"]) == 0  # a number that never called
    assert "0 calls of that caller erased" in capsys.readouterr().out


async def test_export_streams_every_record_as_jsonl_or_a_csv_row_per_turn(served, tmp_path, monkeypatch):
    for i in range(5):
        await a_call(served, f"call-export-{i}", ["What are your opening hours?", "Where can I park?"])
        await hang_up(served, f"call-export-{i}")
    for i in range(5):
        assert await archived(served, f"call-export-{i}")
    client = httpx.Client(base_url=served.http, headers={"Authorization": f"Bearer {READ}"})
    seen: list[tuple[int, int | None]] = []
    out = io.StringIO()
    count = await asyncio.to_thread(write_export, client, out, since=time.time() - 3600, fmt="jsonl",
                                    progress=lambda done, total: seen.append((done, total)))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    exported = {r["call_id"] for r in records}
    assert count == len(records) and {f"call-export-{i}" for i in range(5)} <= exported
    assert seen[-1] == (count, count)
    assert not await asyncio.to_thread(write_export, client, io.StringIO(), since=time.time() + 60, fmt="jsonl")
    monkeypatch.setenv("CALLRAY_READ_TOKEN", READ)
    target = tmp_path / "turns.csv"
    assert await asyncio.to_thread(callray, ["export", served.http, "--since", "1h", "--format", "csv",
                                             "--out", str(target)]) == 0
    rows = list(csv.DictReader(target.open()))
    mine = [r for r in rows if r["call_id"] == "call-export-0"]
    assert [r["response_id"] for r in mine] == ["1", "2"]
    assert mine[0]["caller"] == "What are your opening hours?" and float(mine[0]["first_sentence_ms"]) > 0
    monkeypatch.setenv("CALLRAY_READ_TOKEN", "wrong")
    assert await asyncio.to_thread(callray, ["export", served.http]) == 1


def test_since_accepts_durations_dates_and_unix_seconds_and_names_the_forms_otherwise():
    assert parse_since("7d", now=1_000_000) == 1_000_000 - 7 * 86400
    assert parse_since("2026-12-01") == 1796083200.0
    assert parse_since("2026-12-01T01:00:00+01:00") == 1796083200.0
    assert parse_since("1796083200") == 1796083200.0
    with pytest.raises(ValueError, match="7d, 12h, 30m"):
        parse_since("last tuesday")


async def test_the_stream_forgets_an_erased_call_s_events_and_dead_letters(redis_server):
    client = redis_client(redis_server.url)
    bus = RedisStreamBus(client, stream="erase:events", dead_letter_stream="erase:events:dead", maxlen=1000)
    try:
        for i in range(2500):  # pages of 1000: the erase crosses page boundaries
            await bus.publish(CallTurn(call_id=f"c{i % 5}", seq=i, response_id=i, caller_text="hello"))
        await bus.publish(CallEnded(call_id="c1x", seq=1))  # an id that starts like another's
        await client.xadd("erase:events:dead", {"event": CallTurn(call_id="c1", seq=9, response_id=9).model_dump_json(),
                                                "reason": "test"})
        assert await bus.erase("c1") == 501
        left = [json.loads(f[b"event"])["call_id"] for _, f in await client.xrange("erase:events")]
        assert "c1" not in left and left.count("c1x") == 1 and len(left) == 2001
        assert await client.xlen("erase:events:dead") == 0
    finally:
        await client.delete("erase:events", "erase:events:dead")
        await client.aclose()
