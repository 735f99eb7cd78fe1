"""The single-server architecture end to end: Ray Serve, calls in the gateway replica, a real
loopback WebSocket."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from callray.settings import CallraySettings
from callray.sim.client import RetellClient

pytestmark = pytest.mark.ray

NAMES = ("Alice Bruno Chloe Dmitri Elena Farah Gustavo Hana Ivan Jonas Keiko Liam Mona Nadia Omar Priya Quinn Rosa "
         "Sven Tariq Uma Victor Wanda Xavier Yusuf Zoe Amara Boris Celine Dario Esme Felix Greta Hugo Ines Jasper "
         "Kira Lorenzo Maya Nico Olga Pablo Rhea Santiago Tessa Ulrich Vera Wes Ximena Yara").split()


def new_call_id() -> str:
    return f"call-{uuid.uuid4().hex[:12]}"


async def test_a_whole_call(single_app):
    client = await RetellClient(single_app, new_call_id()).connect()
    try:
        await client.wait_for(lambda f: f.get("response_id") == 0 and f.get("content_complete"))
        assert client.frames[0]["response_type"] == "config"
        assert client.frames[0]["config"]["auto_reconnect"] is True
        assert "Maple Street" in client.responses(0)[0]["content"]
        await client.send({"interaction_type": "call_details", "call": {"call_id": client.call_id, "agent_id": "a1"}})

        assert "Maria" in await client.turn(1, "Hi, my name is Maria")
        # a ping sent right behind a request is answered by the gateway while the answer streams
        await client.say(2, "What are your hours?")
        await client.send({"interaction_type": "ping_pong", "timestamp": 1234567})
        pong = await client.wait_for(lambda f: f.get("response_type") == "ping_pong")
        assert pong == {"response_type": "ping_pong", "timestamp": 1234567}
        assert "Monday" in await client.complete(2)
        client.transcript.append({"role": "agent", "content": "hours"})

        # supersede: the caller keeps talking; only the latest id matters
        await client.say(3, "I would like to")
        await client.say(4, "I would like to book an appointment")
        assert "What day" in await client.complete(4)
        first_of_4 = next(i for i, f in enumerate(client.frames) if f.get("response_id") == 4)
        assert all(f.get("response_id") != 3 for f in client.frames[first_of_4:])
        assert len([f for f in client.responses(3) if f["content_complete"]]) <= 1

        assert "Tuesday" in await client.turn(5, "Tuesday works")
        reminder = await client.turn(6, "", kind="reminder_required")
        assert reminder.strip()
        goodbye = await client.turn(7, "That's all, goodbye")
        ends = [f for f in client.responses(7) if f.get("end_call")]
        assert len(ends) == 1 and ends[0]["content_complete"] is True and "Maria" in goodbye
        complete_ids = [f["response_id"] for f in client.frames if f.get("content_complete")]
        assert len(complete_ids) == len(set(complete_ids))
    finally:
        await client.close()


def test_the_replica_says_which_ingress_it_runs_behind_and_on_which_loop(single_app):
    """RAY_SERVE_ENABLE_HA_PROXY, read when Ray starts, reaches the replica: /healthz names it.
    The shipped actor options put callray on the replica's own event loop, and Serve took them."""
    import urllib.request

    from tests.conftest import TEST_INGRESS

    health = single_app.replace("ws://", "http://").rsplit("/llm-websocket", 1)[0] + "/healthz"
    with urllib.request.urlopen(health, timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["ingress"] == TEST_INGRESS
    assert body["user_code_loop"] == "shared"


async def test_fifty_concurrent_calls_each_hear_their_own_words(single_app):
    async def one_call(name: str) -> tuple[str, str, str]:
        client = await RetellClient(single_app, new_call_id()).connect()
        try:
            await client.complete(0)
            first = await client.turn(1, f"Hello, my name is {name}")
            second = await client.turn(2, "I'd like to book an appointment")
            return name, first, second
        finally:
            await client.close()

    results = await asyncio.gather(*(one_call(name) for name in NAMES))
    for name, first, second in results:
        assert name in first and name in second, (name, first, second)
        assert not any(other in first + second for other in NAMES if other != name and len(other) > 3 and other not in name)


async def test_bad_frames_never_take_the_server_down(single_app):
    call_id = new_call_id()
    client = await RetellClient(single_app, call_id).connect()
    await client.complete(0)
    await client.send_raw(b"\x00\x01binary")
    await client.send_raw("{this is not json")
    await client.send_raw(json.dumps({"interaction_type": "response_required", "response_id": "one"}))
    await client.send_raw(json.dumps(["a", "list"]))
    await client.send_raw(json.dumps({"interaction_type": "from_the_future", "x": 1}))
    assert "Monday" in await client.turn(1, "What are your hours?")  # still up, still answering
    await client.send_raw("x" * (CallraySettings().gateway.max_frame_bytes + 10))  # oversize: 1009, state kept
    with pytest.raises(ConnectionError):
        await client.wait_for(lambda f: False, timeout=10)
    assert client.close_code == 1009

    again = await RetellClient(single_app, call_id).connect()  # Retell reconnects: no second greeting
    try:
        assert (await again.complete(0)) == ""
    finally:
        await again.close()
    fresh = await RetellClient(single_app, new_call_id()).connect()  # and new calls are greeted
    try:
        assert "Maple Street" in await fresh.complete(0)
    finally:
        await fresh.close()


async def test_unknown_agent_route_is_refused(single_app):
    client = await RetellClient(single_app + "/no-such-agent", new_call_id()).connect()
    with pytest.raises(ConnectionError):
        await client.wait_for(lambda f: False, timeout=10)
    assert client.close_code == 4404 and client.frames == []


async def test_agent_route_by_path(single_app):
    client = await RetellClient(single_app + "/clinic", new_call_id()).connect()
    try:
        assert "Maple Street" in await client.complete(0)
    finally:
        await client.close()


async def test_analytics_and_archive_in_process(single_app):
    """In the single architecture the gateway replica runs the consumers itself (best effort)."""
    from tests.test_serve_events import eventually, get, http_base

    base = http_base(single_app)
    async with RetellClient(single_app, new_call_id()) as client:
        await client.complete(0)
        await client.turn(1, "Where can I park?")
    status, record = await eventually(
        lambda: (r := get(f"{base}/calls/{client.call_id}"))[0] == 200 and r[1].get("turns") and r) or (0, {})
    assert status == 200 and [t["response_id"] for t in record["turns"]] == [1]
    status, snapshot = get(f"{base}/analytics")
    assert status == 200 and snapshot["overall"]["turns"] >= 1


def test_settings_are_expanded_once_at_build_never_in_the_replica(serve_port, monkeypatch):
    """An environment value that itself looks like a reference (a password with ``${`` in it)
    reaches the replica as it is: the settings are validated once and passed down, not parsed
    (and expanded) again in every process."""
    from ray import serve

    from tests.conftest import deploy
    from tests.test_serve_events import get, http_base

    token = "tok-${CALLRAY_TEST_NEVER_SET}-end"
    monkeypatch.setenv("CALLRAY_TEST_DOLLAR_TOKEN", token)
    url = deploy("dollar", {"hosts": {"namespace": "callray-test-dollar"},
                            "gateway": {"read_token": "${CALLRAY_TEST_DOLLAR_TOKEN}"}}, serve_port)
    try:
        assert get(f"{http_base(url)}/analytics", token=token)[0] == 200
        assert get(f"{http_base(url)}/analytics", token="tok--end")[0] == 401
    finally:
        serve.delete("dollar")
