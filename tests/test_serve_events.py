"""The event-driven architecture: events reach analytics, archive and escalation; webhooks."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from callray.webhook import sign
from tests.conftest import ADMIN_TOKEN, READ_TOKEN, WEBHOOK_KEY
from callray.sim.client import RetellClient
from tests.test_serve_single import new_call_id

pytestmark = pytest.mark.ray


def http_base(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://").rsplit("/llm-websocket", 1)[0]


def get(url: str, token: str = READ_TOKEN) -> tuple[int, dict]:
    """GET a read route of a test deployment (with its read token)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def post_webhook(base: str, body: bytes, signature: str | None) -> int:
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers["x-retell-signature"] = signature
    request = urllib.request.Request(f"{base}/webhook", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def eventually(check, timeout: float = 30.0):
    """Poll ``check`` (sync, returns a truthy value when done) until it succeeds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.5)


async def test_events_reach_analytics_and_archive_with_exact_counts(events_app):
    base = http_base(events_app)
    _, before = get(f"{base}/analytics")
    turns_before = before.get("overall", {}).get("turns", 0)
    call_ids = []
    for line in ("What are your hours?", "Where can I park?", "Do you take insurance?"):
        client = await RetellClient(events_app, new_call_id()).connect()
        call_ids.append(client.call_id)
        try:
            await client.complete(0)
            await client.turn(1, line)
            await client.turn(2, "Where are you located?")
        finally:
            await client.close()

    def counted():
        status, snap = get(f"{base}/analytics")
        return status == 200 and snap["overall"]["turns"] - turns_before == 6 and snap

    snapshot = await eventually(counted)
    assert snapshot, get(f"{base}/analytics")
    status, record = await eventually(
        lambda: (r := get(f"{base}/calls/{call_ids[0]}"))[0] == 200 and r[1].get("turns") and r) or (0, {})
    assert status == 200
    assert [t["response_id"] for t in record["turns"]] == [1, 2]
    assert get(f"{base}/calls/never-seen")[0] == 404


async def test_an_erased_call_leaves_no_record_state_or_event_behind(events_app, redis_server):
    """Erasure on the event-driven architecture: the record in PostgreSQL (kept by the archive
    actor), the state in Redis, the call's entries in the stream, all through one DELETE."""
    from callray.stores.redis_client import redis_client

    base = http_base(events_app)
    call_id = new_call_id()
    async with RetellClient(events_app, call_id) as client:
        await client.complete(0)
        await client.turn(1, "My email is jane@example.com, what are your hours?")
    assert post_webhook(base, webhook_body("call_ended", call_id, from_number="+14155552671",
                                           disconnection_reason="user_hangup"),
                        sign(webhook_body("call_ended", call_id, from_number="+14155552671",
                                          disconnection_reason="user_hangup"), WEBHOOK_KEY)) == 204
    record = await eventually(lambda: (r := get(f"{base}/calls/{call_id}"))[0] == 200 and r[1]["ended"]
                              and r[1]["turns"] and r[1])
    assert record and record["turns"][0]["caller"] == "My email is [EMAIL], what are your hours?"
    redis = redis_client(redis_server.url)
    try:
        def entries_of_the_call(raw: list) -> int:
            return sum(f'"call_id":"{call_id}"'.encode() in f[b"event"] for _, f in raw)

        assert entries_of_the_call(await redis.xrange("callray:test-events")) >= 3
        request = urllib.request.Request(f"{base}/calls/{call_id}", method="DELETE",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            erased = json.loads(reply.read())
        assert erased["record"] and erased["state"] and erased["events"] >= 3, erased
        assert get(f"{base}/calls/{call_id}")[0] == 404
        assert not await redis.exists(f"callray:call:{call_id}")
        assert entries_of_the_call(await redis.xrange("callray:test-events")) == 0
    finally:
        await redis.aclose()


def webhook_body(event: str, call_id: str, **call) -> bytes:
    return json.dumps({"event": event, "call": {"call_id": call_id, "call_status": "ended", **call}}).encode()


async def test_webhook_signatures_and_dedupe(events_app):
    base = http_base(events_app)
    call_id = new_call_id()
    body = webhook_body("call_ended", call_id, disconnection_reason="user_hangup")
    now = int(time.time() * 1000)
    assert post_webhook(base, body, None) == 401
    assert post_webhook(base, body, "v=123,d=nothex") == 401
    assert post_webhook(base, body, sign(body, "wrong-key")) == 401
    assert post_webhook(base, body, sign(body, WEBHOOK_KEY, now_ms=now - 10 * 60 * 1000)) == 401  # stale
    assert post_webhook(base, b"{not json", sign(b"{not json", WEBHOOK_KEY)) == 400
    assert post_webhook(base, body, sign(body, WEBHOOK_KEY)) == 204
    assert post_webhook(base, body, sign(body, WEBHOOK_KEY)) == 204  # replay: accepted, deduped
    # escapes as Retell sends them verify over the raw bytes (re-serialising would break them)
    raw = ('{"event":"call_analyzed","call":{"call_id":"' + call_id + '","agent_name":"Caf\\u00e9",'
           '"recording_url":"https:\\/\\/x.example\\/r.wav","call_analysis":{"user_sentiment":"Positive",'
           '"call_successful":true}}}').encode()
    assert post_webhook(base, raw, sign(raw, WEBHOOK_KEY)) == 204

    def archived():
        status, record = get(f"{base}/calls/{call_id}")
        return status == 200 and record.get("call", {}).get("call_analysis") and record

    record = await eventually(archived)
    assert record and record["call"]["disconnection_reason"] == "user_hangup"

    def counted():  # analytics reads the stream in batches of its own: it may trail the archive
        status, snap = get(f"{base}/analytics")
        return status == 200 and snap["overall"]["disconnections"].get("user_hangup", 0) >= 1

    assert await eventually(counted), get(f"{base}/analytics")


async def test_escalation_rule_transfers_the_live_call_once(events_app):
    client = await RetellClient(events_app, new_call_id()).connect()
    try:
        await client.complete(0)
        await client.turn(1, "I am going to call my lawyer about this bill")
        interrupt = await client.wait_for(lambda f: f.get("response_type") == "agent_interrupt", timeout=30)
        assert interrupt["transfer_number"] == "+15550009999"
        assert interrupt["content"] == "Let me get a colleague for you." and interrupt["content_complete"] is True
        await client.turn(2, "my lawyer will hear about this")
        await asyncio.sleep(3)
        assert len([f for f in client.frames if f.get("response_type") == "agent_interrupt"]) == 1
    finally:
        await client.close()


async def test_analytics_consumer_restart_rebuilds_exact_counts(events_app, ray_cluster):
    import ray

    base = http_base(events_app)

    def settled():
        first = get(f"{base}/analytics")[1]
        time.sleep(1.5)
        second = get(f"{base}/analytics")[1]
        return first == second and second

    # Rebuilt once first: an erasure earlier in the session removed a call's events from the
    # stream, which the live figures counted and a rebuild does not (they are aggregates).
    ray.kill(ray.get_actor("events-analytics", namespace="callray-test-events"), no_restart=False)
    before = await eventually(settled, timeout=60)
    ray.kill(ray.get_actor("events-analytics", namespace="callray-test-events"), no_restart=False)
    async with RetellClient(events_app, new_call_id()) as client:
        await client.complete(0)
        await client.turn(1, "What are your hours?")

    def recounted():
        status, snap = get(f"{base}/analytics")
        return status == 200 and snap["overall"]["turns"] == before["overall"]["turns"] + 1 and snap

    after = await eventually(recounted, timeout=60)
    assert after, (before["overall"]["turns"], get(f"{base}/analytics")[1].get("overall", {}).get("turns"))
    assert after["overall"]["calls"]["started"] == before["overall"]["calls"]["started"] + 1
    # the restarted actor feeds its histograms with what it consumes after its replay
    analytics = ray.get_actor("events-analytics", namespace="callray-test-events")
    async with RetellClient(events_app, new_call_id()) as client:
        await client.complete(0)
        await client.turn(1, "Where can I park?")
    histograms = await eventually(lambda: ray.get(analytics.__ray_call__.remote(lambda a: sorted(a._histograms))))
    assert "first_chunk_ms" in histograms, histograms


async def test_socket_secret_is_required(events_app):
    base, secret = events_app.rsplit("/", 1)
    for url in (base, f"{base}/wrong-secret"):
        client = await RetellClient(url, new_call_id()).connect()
        with pytest.raises(ConnectionError):
            await client.wait_for(lambda f: False, timeout=10)
        assert client.close_code == 4401 and client.frames == []
    by_query = await RetellClient(base, new_call_id() + f"?token={secret}").connect()
    try:
        assert "Maple Street" in await by_query.complete(0)
    finally:
        await by_query.close()


async def test_the_guard_sees_the_caller_a_trusted_balancer_names_behind_either_ingress(events_app):
    """Behind Serve's Python proxy the replica sees the socket's peer; behind HAProxy it sees
    HAProxy. Either way a balancer in front (TLS for Retell's wss://) names the caller in
    X-Forwarded-For, which reaches the replica unchanged and is believed from the trusted peer."""
    import websockets

    async def verdict(forwarded_for: str | None) -> int | str:
        headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
        async with websockets.connect(f"{events_app}/{new_call_id()}", additional_headers=headers) as ws:
            try:
                await asyncio.wait_for(ws.recv(), 10)  # the config frame: admitted
                return "open"
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else 1006

    assert await verdict("203.0.113.9") == "open"
    assert await verdict("198.51.100.7") == 4403  # not an allowed caller, though its peer is
    assert await verdict("198.51.100.7, 203.0.113.9") == "open"  # the right-most hop the balancer added
    assert await verdict(None) == "open"  # no balancer: the peer itself (loopback) is allowed


async def test_a_restarted_consumer_consumes_again(events_app, ray_cluster):
    """Ray restarts a killed consumer idle; the gateway's health check starts it again."""
    import ray

    ray.kill(ray.get_actor("events-escalation", namespace="callray-test-events"), no_restart=False)
    client = await RetellClient(events_app, new_call_id()).connect()
    try:
        await client.complete(0)
        await client.turn(1, "My lawyer will call you")
        interrupt = await client.wait_for(lambda f: f.get("response_type") == "agent_interrupt", timeout=60)
        assert interrupt["transfer_number"] == "+15550009999"
    finally:
        await client.close()
