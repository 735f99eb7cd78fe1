"""Webhook verification over raw bytes, cross-checked with the official retell-sdk, plus
lenient parsing, replay dedupe and the mapping onto bus events."""

from __future__ import annotations

import asyncio

import json
import time
import uuid

import pytest
from retell import Retell
from retell.lib.webhook_auth import symmetric

from callray.events import CallAnalyzed, CallEnded
from callray.stores.redis_client import redis_client
from callray.webhook import (
    WEBHOOK_SEQ,
    RedisWebhookDeduper,
    WebhookAuthError,
    WebhookDeduper,
    WebhookPayloadError,
    parse_webhook,
    sign,
    to_bus_event,
    verify_signature,
)

KEY = "key_test_0123456789"
# As Retell sends it: escaped slash and an escaped non-ASCII character, compact spacing.
RAW = (b'{"event":"call_ended","call":{"call_id":"call_abc","agent_id":"ag_1",'
       b'"recording_url":"https:\\/\\/example.com\\/r.wav","transcript":"Ren\\u00e9e: merci",'
       b'"disconnection_reason":"user_hangup","new_field":{"x":1}}}')
NOW = 1_700_000_000_000


def test_valid_signature_verifies():
    verify_signature(RAW, sign(RAW, KEY, now_ms=NOW), KEY, now_ms=NOW + 1000)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("d=" + "a" * 64, "malformed"),
        (f"v={NOW},d=" + "A" * 64, "malformed"),
        (f"v={NOW},d=" + "a" * 63, "malformed"),
        ("v=abc,d=" + "a" * 64, "malformed"),
        (f"v={NOW},d=" + "a" * 64, "bad digest"),
        (sign(RAW, "other-key", now_ms=NOW), "bad digest"),
        (sign(RAW, KEY, now_ms=NOW - 300_001), "stale"),
        (sign(RAW, KEY, now_ms=NOW + 300_001), "stale"),
    ],
)
def test_rejections_name_the_reason(header, reason):
    with pytest.raises(WebhookAuthError) as info:
        verify_signature(RAW, header, KEY, now_ms=NOW)
    assert reason in info.value.reason
    assert KEY not in str(info.value)


def test_timestamp_is_bound_into_the_digest():
    header = sign(RAW, KEY, now_ms=NOW)
    moved = header.replace(f"v={NOW}", f"v={NOW + 1}")
    with pytest.raises(WebhookAuthError, match="bad digest"):
        verify_signature(RAW, moved, KEY, now_ms=NOW)


def test_raw_bytes_verify_but_reserialised_json_does_not():
    header = sign(RAW, KEY, now_ms=NOW)
    verify_signature(RAW, header, KEY, now_ms=NOW)
    reserialised = json.dumps(json.loads(RAW)).encode()
    assert reserialised != RAW and b"\\/" not in reserialised
    with pytest.raises(WebhookAuthError, match="bad digest"):
        verify_signature(reserialised, header, KEY, now_ms=NOW)
    with pytest.raises(WebhookAuthError, match="bad digest"):
        verify_signature(RAW.replace(b"user_hangup", b"agent_hangup"), header, KEY, now_ms=NOW)


def test_cross_check_with_retell_sdk():
    body = RAW.decode()
    sdk = Retell(api_key=KEY)
    ours = sign(RAW, KEY)
    assert sdk.verify(body, KEY, ours) is True
    assert sdk.verify(body, "wrong", ours) is False
    theirs = symmetric["sign"](body, KEY)
    verify_signature(RAW, theirs, KEY)
    assert theirs == sign(RAW, KEY, now_ms=int(theirs.split(",")[0][2:]))
    old = symmetric["sign"](body, KEY, NOW)
    with pytest.raises(WebhookAuthError, match="stale"):
        verify_signature(RAW, old, KEY)
    assert sdk.verify(body, KEY, old) is False
    unicode_body = '{"event":"call_started","call":{"call_id":"c","name":"Renée 😀"}}'
    verify_signature(unicode_body.encode(), symmetric["sign"](unicode_body, KEY), KEY)


def test_parse_is_lenient_and_rejects_garbage():
    webhook = parse_webhook(RAW)
    assert webhook.event == "call_ended" and webhook.call_id == "call_abc"
    assert webhook.call["transcript"] == "Renée: merci" and webhook.call["new_field"] == {"x": 1}
    future = parse_webhook(b'{"event":"transfer_bridged","call":{"call_id":"c"},"transfer_destination":"+1"}')
    assert future.event == "transfer_bridged" and future.model_extra == {"transfer_destination": "+1"}
    for bad in (b"{not json", b"[]", b'{"call":{}}', b'{"event":"call_ended","call":"x"}', b""):
        with pytest.raises(WebhookPayloadError):
            parse_webhook(bad)


def test_to_bus_event_maps_lifecycle_events():
    ended = to_bus_event(parse_webhook(RAW), agent="demo")
    assert isinstance(ended, CallEnded) and ended.call_id == "call_abc" and ended.reason == "user_hangup"
    assert ended.seq == WEBHOOK_SEQ["call_ended"] and ended.agent == "demo"
    analyzed = to_bus_event(parse_webhook(b'{"event":"call_analyzed","call":{"call_id":"c","call_analysis":{}}}'), 7)
    assert isinstance(analyzed, CallAnalyzed) and analyzed.seq == 7
    assert to_bus_event(parse_webhook(b'{"event":"call_started","call":{"call_id":"c"}}')) is None
    assert to_bus_event(parse_webhook(b'{"event":"transcript_updated","call":{"call_id":"c"}}')) is None
    with pytest.raises(WebhookPayloadError, match="call_id"):
        to_bus_event(parse_webhook(b'{"event":"call_ended","call":{}}'))


async def test_memory_deduper_drops_replays_of_lifecycle_events_only():
    dedupe = WebhookDeduper(max_entries=2)
    assert not await dedupe.seen("call_ended", "c1")
    await dedupe.remember("call_ended", "c1")  # handed over
    assert await dedupe.seen("call_ended", "c1")  # Retell's retry
    assert not await dedupe.seen("call_analyzed", "c1")  # not handed over yet: a retry goes through
    await dedupe.remember("transcript_updated", "c1")
    assert not await dedupe.seen("transcript_updated", "c1")  # legitimately repeats


async def test_redis_deduper_is_shared_between_replicas(redis_url):
    client = redis_client(redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    a, b = RedisWebhookDeduper(client, prefix=prefix, ttl_s=60), RedisWebhookDeduper(client, prefix=prefix, ttl_s=60)
    assert not await b.seen("call_ended", "c1")
    await a.remember("call_ended", "c1")
    assert await b.seen("call_ended", "c1")
    assert 0 < await client.ttl(f"{prefix}call_ended:c1") <= 60
    await client.delete(f"{prefix}call_ended:c1")
    await client.aclose()


async def test_a_webhook_whose_hand_over_was_cancelled_is_processed_on_retell_s_retry():
    """Serve cancels the handler when Retell's 10 s timeout closes the connection: the retry
    must be handed over, not answered 204 from a claim the cancelled attempt left behind."""
    from starlette.requests import Request

    from callray.gateway import Gateway
    from callray.settings import CallraySettings

    class SlowThenFine:
        def __init__(self) -> None:
            self.handed: list = []
            self.first = True

        async def webhook(self, event) -> None:
            if self.first:
                self.first = False
                await asyncio.sleep(3600)  # the bus is slow; Retell gives up and Serve cancels us
            self.handed.append(event)

    calls = SlowThenFine()
    gateway = Gateway(CallraySettings(webhook={"api_key": KEY}), calls, calls)
    body = b'{"event":"call_ended","call":{"call_id":"c-cancel","disconnection_reason":"user_hangup"}}'

    def request() -> Request:
        sent = {"done": False}

        async def receive():
            if sent["done"]:
                return {"type": "http.disconnect"}
            sent["done"] = True
            return {"type": "http.request", "body": body, "more_body": False}

        return Request({"type": "http", "method": "POST", "path": "/webhook", "headers": [
            (b"x-retell-signature", sign(body, KEY).encode()), (b"content-length", str(len(body)).encode())]}, receive)

    first = asyncio.create_task(gateway.webhook(request()))
    await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await gateway.webhook(request())).status_code == 204
    assert [e.call_id for e in calls.handed] == ["c-cancel"]  # the retry was handed over
    assert (await gateway.webhook(request())).status_code == 204
    assert len(calls.handed) == 1  # and the next retry is deduped


def test_default_clock_accepts_fresh_signatures():
    verify_signature(RAW, sign(RAW, KEY), KEY)
    with pytest.raises(WebhookAuthError, match="stale"):
        verify_signature(RAW, sign(RAW, KEY, now_ms=int(time.time() * 1000) - 600_000), KEY)
