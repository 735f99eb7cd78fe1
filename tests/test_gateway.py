"""The gateway's front door on a real loopback server, without Ray: the same FastAPI app Serve
runs in each replica, here under uvicorn with a local replica (memory stores). Refusals with
their codes, the read token, flood and slow-reader limits, the webhook body limit."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from callray.gateway import Gateway, build_api
from callray.runtime import CallsRuntime
from callray.scenarios.server import LocalServer
from callray.settings import CallraySettings
from callray.webhook import sign
from callray.sim.client import RetellClient
from tests.test_bus import until

READ_TOKEN = "read-t0ken-for-tests"
WEBHOOK_KEY = "key_gateway_test"


class Served(LocalServer):
    """The gateway of ``args`` served in this process (``callray.scenarios.server``)."""

    def __init__(self, args: dict[str, Any]):
        super().__init__(CallraySettings.parse(args))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Served]:
    with Served({
        "gateway": {"read_token": READ_TOKEN, "max_frames_per_s": 20, "max_queued_frames": 200,
                    "max_frame_bytes": 1 << 20},  # the abuse run's garbage goes just over and 4x over it
        "webhook": {"api_key": WEBHOOK_KEY, "max_body_bytes": 4096},
        "archive": {"dir": str(tmp_path_factory.mktemp("archive"))},
    }) as served:
        yield served


@pytest.fixture(scope="module")
def closed_gateway(tmp_path_factory) -> Iterator[Served]:
    """No read token configured: the read routes do not exist."""
    with Served({"archive": {"dir": str(tmp_path_factory.mktemp("archive-closed"))}}) as served:
        yield served


def get(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


async def closed_with(client: RetellClient, timeout: float = 10) -> int:
    with pytest.raises(ConnectionError):
        await client.wait_for(lambda f: False, timeout=timeout)
    return client.close_code


# --------------------------------------------------------------------------- read routes


async def test_read_routes_need_the_bearer_token_and_are_off_without_one(gateway, closed_gateway):
    client = await RetellClient(gateway.ws, "call-read-1").connect()
    try:
        await client.complete(0)
        await client.send({"interaction_type": "call_details", "call": {"call_id": "call-read-1",
                                                                         "from_number": "+15551230000"}})
        await client.turn(1, "Where can I park?")
    finally:
        await client.close()
    url = f"{gateway.http}/calls/call-read-1"
    for token in (None, "wrong", READ_TOKEN[:-1]):
        status, body = await asyncio.to_thread(get, url, token)
        assert status == 401 and "Bearer" in body["detail"]
        assert await asyncio.to_thread(get, f"{gateway.http}/analytics", token) == (status, body)
    deadline = time.monotonic() + 10
    while not ((got := await asyncio.to_thread(get, url, READ_TOKEN))[0] == 200 and got[1]["turns"]) \
            and time.monotonic() < deadline:  # the archive applies events in batches, a second apart
        await asyncio.sleep(0.2)
    assert got[0] == 200 and [t["response_id"] for t in got[1]["turns"]] == [1]
    while not ((analytics := await asyncio.to_thread(get, f"{gateway.http}/analytics", READ_TOKEN))[0] == 200
               and analytics[1]["overall"]["turns"]) and time.monotonic() < deadline:  # it reads in batches too
        await asyncio.sleep(0.05)
    assert analytics[0] == 200 and analytics[1]["overall"]["turns"] >= 1
    assert (await asyncio.to_thread(get, f"{gateway.http}/calls/bad%20id!", READ_TOKEN))[0] == 400
    for path in ("/calls/call-read-1", "/analytics"):  # no token configured: the routes do not exist
        assert (await asyncio.to_thread(get, closed_gateway.http + path, "anything"))[0] == 404
    assert (await asyncio.to_thread(get, f"{gateway.http}/healthz"))[0] == 200  # health stays open, without caller data


# --------------------------------------------------------------------------- sockets


@pytest.mark.parametrize("path", ["/elsewhere/call-1", "/spam/llm-websocket/call-1", "/llm-websocket-2/call-1"])
async def test_sockets_outside_the_prefix_are_refused_in_the_handshake(gateway, path):
    """Only ``{path_prefix}/...`` reaches the guard (the prefix found anywhere in the path did before)."""
    base = gateway.ws.removesuffix("/llm-websocket")
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with websockets.connect(base + path):
            pass
    assert refused.value.response.status_code == 403
    assert "call-1" not in gateway.runtime.host.calls


@pytest.mark.parametrize("call_id", ["x" * 129, "call%20with%20spaces", "call.dots", "ünïcode"])
async def test_call_ids_outside_retells_shape_are_refused_before_any_state(gateway, call_id):
    client = await RetellClient(gateway.ws, call_id).connect()
    assert await closed_with(client) == 4400 and client.frames == []
    assert not any(key.startswith("call") and "with" in key for key in gateway.runtime.host.calls)
    assert len(gateway.runtime.host.calls) < 50  # nothing was activated for the refused ids


async def test_a_flooding_socket_is_closed_with_1008_and_its_call_freed(gateway):
    client = await RetellClient(gateway.ws, "call-flood").connect()
    await client.complete(0)
    for i in range(500):  # far past 20 frames/s with a 3 s burst
        try:
            await client.send({"interaction_type": "ping_pong", "timestamp": i})
        except websockets.ConnectionClosed:
            break
    assert await closed_with(client) == 1008
    fresh = await RetellClient(gateway.ws, "call-after-flood").connect()  # the server is fine
    try:
        assert "Maple Street" in await fresh.complete(0)
    finally:
        await fresh.close()
    conversation = gateway.runtime.host.calls.get("call-flood")
    assert conversation is None or not conversation.connected  # the socket's hold on the call is gone


@pytest.fixture(scope="module")
def unthrottled_gateway(tmp_path_factory) -> Iterator[Served]:
    """No frame-rate limit worth the name, and room for 16 queued frames per socket."""
    with Served({"gateway": {"max_frames_per_s": 100_000, "max_queued_frames": 16},
                 "archive": {"dir": str(tmp_path_factory.mktemp("archive-slow"))}}) as served:
        yield served


async def test_a_socket_that_does_not_read_is_closed_with_1013_and_its_frames_dropped(unthrottled_gateway):
    """The client's receive window is tiny and it stops reading: its pongs pile up on the server."""
    served = unthrottled_gateway
    sock = socket.create_connection(("127.0.0.1", served.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    ws = await websockets.connect(f"{served.ws}/call-slow", sock=sock, max_queue=1, max_size=None)
    try:
        for i in range(20_000):
            await ws.send(json.dumps({"interaction_type": "ping_pong", "timestamp": i}))
            conversation = served.runtime.host.calls.get("call-slow")
            if conversation is not None and not conversation.connected:
                break  # the server gave up on this socket
        else:
            raise AssertionError("20000 unread pongs and the socket is still held")
        with pytest.raises(websockets.ConnectionClosed):
            while True:  # now read: what the server still had in flight, then its close frame
                await asyncio.wait_for(ws.recv(), 15)
        assert ws.close_code == 1013
    finally:
        await ws.close()
    fresh = await RetellClient(served.ws, "call-after-slow").connect()
    try:
        assert "Maple Street" in await fresh.complete(0)
    finally:
        await fresh.close()


async def test_the_webhook_body_limit_holds_while_reading(gateway):
    """The limit is 4 KB. A body declared bigger is refused on its headers alone, and an
    undeclared (chunked) one once 8 KB of it arrived: neither is sent in full, so a server
    that waited for the whole body would time out here."""
    import http.client

    def post(declared: int | None, sent: bytes, *, end: bool = False) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        try:
            conn.putrequest("POST", "/webhook")
            conn.putheader("content-type", "application/json")
            conn.putheader("x-retell-signature", sign(sent, WEBHOOK_KEY))
            if declared is None:
                conn.putheader("Transfer-Encoding", "chunked")
            else:
                conn.putheader("Content-Length", str(declared))
            conn.endheaders()
            if declared is None:
                for i in range(0, len(sent), 4096):
                    chunk = sent[i:i + 4096]
                    conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if end:
                    conn.send(b"0\r\n\r\n")
            else:
                conn.send(sent)
            return conn.getresponse().status
        finally:
            conn.close()

    big = b'{"event":"call_started","call":{"call_id":"c","pad":"' + b"x" * 100_000 + b'"}}'
    assert await asyncio.to_thread(post, len(big), b"") == 413  # declared too big: refused unread
    assert await asyncio.to_thread(post, None, big[:8192]) == 413  # undeclared: refused while reading
    small = b'{"event":"call_started","call":{"call_id":"c-small"}}'
    assert await asyncio.to_thread(post, len(small), small) == 204
    assert await asyncio.to_thread(post, None, small, end=True) == 204


async def test_the_abuse_run_leaves_a_server_that_greets_new_calls_at_once(gateway):
    """The short version of ``python -m harness.abuse``: every kind of abuse at once."""
    from harness.abuse import abuse

    report = await abuse(gateway.ws, gateway.http, sockets=4, hold_s=2.0,
                         max_frame_bytes=gateway.settings.gateway.max_frame_bytes)
    outcomes = report["outcomes"]
    assert outcomes.get("flood closed 1008") == 1
    assert sum(v for k, v in outcomes.items() if k.startswith("bad id")) == 5
    assert outcomes.get("bad id closed 4400", 0) + sum(v for k, v in outcomes.items() if "refused" in k) == 5
    assert outcomes.get("garbage closed 1009") == 4  # each garbage socket ends on its oversized frame
    webhook = {k: v for k, v in outcomes.items() if k.startswith("webhook")}
    assert all(" 413" in k or "connection" in k for k in webhook) and sum(webhook.values()) == 4
    assert report["greeted_after_ms"] > 0  # greeted_in_ms fails unless a fresh call hears a non-empty greeting
    held = [c for c in gateway.runtime.host.calls.values() if c.connected]
    assert not [c.call_id for c in held if c.call_id.startswith("abuse-")]  # nothing abusive is still held


# --------------------------------------------------------------------------- inbound call webhook


@pytest.fixture(scope="module")
def inbound_gateway(tmp_path_factory) -> Iterator[Served]:
    with Served({
        "webhook": {"api_key": WEBHOOK_KEY},
        "archive": {"dir": str(tmp_path_factory.mktemp("archive-inbound"))},
        "inbound": {"hook": "tests.inbound_hook:answer", "timeout_s": 0.3, "numbers": {
            "+15557770000": {"override_agent_id": "agent_dental", "dynamic_variables": {"office": "Main St"}}}},
    }) as served:
        yield served


def post_inbound(served: Served, payload: dict, *, signed: bool = True) -> tuple[int, dict]:
    body = json.dumps({"event": "call_inbound", "call_inbound": payload}).encode()
    headers = {"content-type": "application/json"}
    if signed:
        headers["x-retell-signature"] = sign(body, WEBHOOK_KEY)
    request = urllib.request.Request(f"{served.http}/webhook/inbound", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.parametrize("caller, expected", [
    ("+15550000001", {"override_agent_id": "agent_dental", "dynamic_variables": {"customer_name": "Ada"},
                      "metadata": {"crm_id": "42"}}),  # the hook's answer over the table's
    ("+15550000009", {"override_agent_id": "agent_dental", "dynamic_variables": {"office": "Main St"}}),  # hook: None
    ("+15550000002", {"override_agent_id": "agent_dental", "dynamic_variables": {"office": "Main St"}}),  # raises
    ("+15550000003", {"override_agent_id": "agent_dental", "dynamic_variables": {"office": "Main St"}}),  # too slow
    ("+15550000004", {"override_agent_id": "agent_dental", "dynamic_variables": {"office": "Main St"}}),  # garbage
])
async def test_the_inbound_webhook_answers_from_the_table_and_the_hook_and_never_fails_the_call(
        inbound_gateway, caller, expected):
    status, body = await asyncio.to_thread(
        post_inbound, inbound_gateway, {"agent_id": "agent_x", "from_number": caller, "to_number": "+15557770000"})
    assert status == 200 and body == {"call_inbound": expected}  # the slow hook's late answer is never used


async def test_the_inbound_webhook_is_signed_like_the_others(inbound_gateway):
    payload = {"from_number": "+15550000001", "to_number": "+15550001111"}
    status, _ = await asyncio.to_thread(post_inbound, inbound_gateway, payload, signed=False)
    assert status == 401
    status, body = await asyncio.to_thread(post_inbound, inbound_gateway, payload)
    assert status == 200 and body["call_inbound"]["dynamic_variables"] == {"customer_name": "Ada"}


def test_an_inbound_hook_that_cannot_be_imported_fails_at_start_naming_the_field():
    from callray.env import SettingsError
    from callray.inbound import InboundCalls

    with pytest.raises(SettingsError, match="inbound.hook: module 'tests.inbound_hook' has no 'missing'"):
        InboundCalls(CallraySettings.parse({"inbound": {"hook": "tests.inbound_hook:missing"}}).inbound)


# --------------------------------------------------------------------------- long calls


def two_hour_transcript() -> list[dict[str, Any]]:
    """What Retell resends after two hours of continuous talk: turns of 20 words, 160 words a
    minute, each word with its call-relative timings."""
    entries, t = [], 0.0
    for turn in range(int(120 * 160 / 20)):
        words = []
        for i in range(20):
            words.append({"word": f"word{i}", "start": round(t, 3), "end": round(t + 0.3, 3)})
            t += 60 / 160
        entries.append({"role": "user" if turn % 2 else "agent", "content": " ".join(w["word"] for w in words),
                        "words": words})
    entries[-1]["content"] = "What are your hours?"
    return entries


async def test_a_two_hour_call_with_both_transcripts_fits_the_frame_limit(closed_gateway):
    """closed_gateway runs the default settings."""
    transcript = two_hour_transcript()
    frame = json.dumps({"interaction_type": "response_required", "response_id": 1, "transcript": transcript,
                        "transcript_with_tool_calls": transcript})
    assert 1 << 20 < len(frame) < closed_gateway.settings.gateway.max_frame_bytes  # the old 1 MiB limit ended it
    async with RetellClient(closed_gateway.ws, "call-two-hours") as client:
        await client.complete(0)
        await client.send_raw(frame)
        assert "Monday to Friday" in await client.complete(1)
        assert not client.closed


# --------------------------------------------------------------------------- activation failures


async def test_a_call_whose_agent_was_renamed_goes_on_with_the_default_agent(gateway):
    """A redeploy renamed the agent a live call was saved with: the reconnect used to leave the
    socket silent (KeyError in the unwatched activation); the default agent takes the call."""
    from callray.stores.base import CallState

    state = CallState(call_id="call-renamed", agent="retired_agent", greeted=True, latest_response_id=3)
    gateway.on_loop(gateway.runtime.stores.state.save(state))
    async with RetellClient(gateway.ws, "call-renamed") as client:
        assert await client.complete(0, timeout=5) == ""  # greeted before: not again
        assert "Monday to Friday" in await client.turn(4, "What are your hours?")


@pytest.fixture(scope="module")
def redis_gateway(tmp_path_factory, redis_server) -> Iterator[Served]:
    with Served({"state": {"backend": "redis"}, "redis": {"url": redis_server.url},
                 "archive": {"dir": str(tmp_path_factory.mktemp("archive-redis"))}}) as served:
        yield served


async def test_a_stored_state_that_no_longer_decodes_drops_the_socket_instead_of_leaving_it_silent(
        redis_gateway, redis_server):
    from callray.stores.redis_client import redis_client

    client = redis_client(redis_server.url)
    await client.hset("callray:call:call-garbled", mapping={"v": 3, "e": 1, "s": b"{not json"})
    try:
        async with RetellClient(redis_gateway.ws, "call-garbled") as caller:
            assert await closed_with(caller) == 1006  # dropped, as a dead replica's: Retell reconnects
            assert not caller.responses(0)
    finally:
        await client.delete("callray:call:call-garbled")
        await client.aclose()


async def test_a_call_that_cannot_be_activated_in_time_is_dropped_so_retell_reconnects(tmp_path):
    """Its state store is down for longer than gateway.activate_timeout_s: a close frame (1011 before)
    would end the call; an abnormal closure makes Retell reconnect, and the call goes on."""
    from callray.sim.local import RedisServer

    redis = RedisServer(tmp_path / "redis", appendonly=False)
    redis.start()
    try:
        with Served({"state": {"backend": "redis"}, "redis": {"url": redis.url, "timeout_s": 0.2},
                     "gateway": {"activate_timeout_s": 0.5}, "archive": {"dir": str(tmp_path / "archive")}}) as served:
            redis.stop()
            async with RetellClient(served.ws, "call-store-down") as caller:
                assert await closed_with(caller) == 1006
            redis.start()
            async with RetellClient(served.ws, "call-store-down") as caller:  # Retell's reconnect
                assert "Maple Street" in await caller.complete(0, timeout=10)
    finally:
        redis.stop()


def test_callray_sends_no_close_code_that_ends_a_live_call():
    """The close-code policy over every place that closes a socket: refusals before a call
    exists use 4xxx, abuse 1008/1009/1013, a superseded socket 4001; never 1000 or 1011."""
    import ast

    from callray import session
    from callray.settings import PROJECT_DIR

    allowed = {1008, 1009, 1013, 4001}
    assert set(session.CLOSE_CODES.values()) | {session.CLOSE_FLOOD, session.CLOSE_TOO_BIG} <= allowed
    found = []
    server_side = [p for p in (PROJECT_DIR / "callray").rglob("*.py") if "sim" not in p.parts]  # sim/ is Retell's side
    for path in [*server_side, *(PROJECT_DIR / "actors").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "close":
                for arg in [*node.args, *(k.value for k in node.keywords if k.arg == "code")]:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, int):
                        found.append((path.name, arg.value))
    assert found and all(code >= 4000 or code in allowed for _, code in found), found
    assert not any(code in (1000, 1011) for _, code in found)


async def test_the_simulator_sends_retell_s_call_ended_webhook_and_the_call_ends(gateway: Served) -> None:
    """As Retell does after every call (the soak relies on it: without it finished calls would
    wait in memory and in the live view until their timeouts)."""
    from callray.sim.simulator import SimConfig, run_simulation

    result = await run_simulation(SimConfig(url=gateway.ws, calls=2, turns=1, think_s=0.05, call_id_prefix="hangup",
                                            webhook_url=f"{gateway.http}/webhook", webhook_key=WEBHOOK_KEY))
    assert result.counts["webhooks_sent"] == 2 and not result.counts.get("webhooks_refused")
    for call in result.calls:
        deadline = time.monotonic() + 10
        while True:  # the archive applies events in batches, a second apart
            status, record = await asyncio.to_thread(get, f"{gateway.http}/calls/{call.call_id}", READ_TOKEN)
            if status == 200 and record["ended"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert record["ended"] and record["end_reason"] == "user_hangup"
    refused = await run_simulation(SimConfig(url=gateway.ws, calls=1, turns=0, call_id_prefix="badkey",
                                             webhook_url=f"{gateway.http}/webhook", webhook_key="not-the-key"))
    assert refused.counts["webhooks_refused"] == 1  # a wrong key is counted, not taken


def test_a_replica_behind_another_ingress_than_the_config_s_says_how_to_start_ray(caplog):
    """gateway.ingress is what the deployment expects; Ray's start decides. A mismatch serves
    anyway and says what to change, as does a guard that would see HAProxy, not the caller."""
    import logging

    from callray.gateway import Gateway

    settings = CallraySettings.parse({"gateway": {"ingress": "haproxy", "guard": {"allow_ips": ["203.0.113.0/24"]}}})
    callray_logger = logging.getLogger("callray")
    propagate, callray_logger.propagate = callray_logger.propagate, True  # configure_logging may have turned it off
    try:
        with caplog.at_level(logging.WARNING, logger="callray.gateway"):
            Gateway(settings, None, None, ingress="proxy")  # type: ignore[arg-type]
            assert "RAY_SERVE_ENABLE_HA_PROXY=1" in caplog.text and "trusted_proxies" not in caplog.text
            caplog.clear()
            Gateway(settings, None, None, ingress="haproxy")  # type: ignore[arg-type]
            assert "RAY_SERVE_ENABLE_HA_PROXY" not in caplog.text and "trusted_proxies" in caplog.text
            caplog.clear()
            trusted = settings.model_copy(deep=True)
            trusted.gateway.guard.trusted_proxies = ["10.0.0.0/8"]
            Gateway(trusted, None, None, ingress="haproxy")  # type: ignore[arg-type]
            assert not caplog.text
    finally:
        callray_logger.propagate = propagate


# --------------------------------------------------------------------------- cancelled by Serve


async def test_a_socket_handler_cancelled_after_its_client_left_tears_down_and_ends_normally(tmp_path) -> None:
    """Serve cancels the handler of a socket whose client disconnected, before the session reads
    the disconnect, and keeps the request's exception in a reference cycle. A handler that ended
    cancelled kept every frame of its call alive through that cycle until a full garbage
    collection; it now tears the session down and ends normally."""
    settings = CallraySettings.parse({"archive": {"dir": str(tmp_path)}})
    runtime = await CallsRuntime.start(settings, "cancelled")
    app = build_api(Gateway(settings, runtime, runtime))
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []
    scope = {"type": "websocket", "path": "/llm-websocket/call-cancelled-1", "raw_path": b"/llm-websocket/call-cancelled-1",
             "query_string": b"", "headers": [], "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "scheme": "ws", "root_path": "", "subprotocols": [], "asgi": {"version": "3.0"}}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await inbox.put({"type": "websocket.connect"})
        handler = asyncio.create_task(app(scope, inbox.get, send))
        await until(lambda: (call := runtime.host.calls.get("call-cancelled-1")) is not None and call.connected)
        assert sent[0]["type"] == "websocket.accept"
        await inbox.put({"type": "websocket.disconnect", "code": 1000})
        handler.cancel()  # as Serve's direct ingress does, at once
        await asyncio.wait([handler], timeout=10)
        assert handler.done() and not handler.cancelled() and handler.exception() is None
        assert not runtime.host.calls["call-cancelled-1"].connected  # detached: kept for a reconnect
    finally:
        await runtime.close()
