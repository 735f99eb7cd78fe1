"""Retell webhooks: signature check over the raw body, lenient parsing, dedupe, bus events.

Retell signs each POST with ``x-retell-signature: v=<unix ms>,d=<hex>`` where the digest is
HMAC-SHA256(key=API key, message=raw body text + decimal timestamp). The digest covers the
bytes *as received*: re-serialised JSON (``\\/``, ``\\u00e9``, spacing) does not verify.
Retell retries until it gets a 2xx, so lifecycle events are deduped on (event, call_id), after
they were handed over.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Any

import redis.asyncio as aioredis
from cachetools import FIFOCache
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from callray.events import WEBHOOK_SEQ_BASE, CallAnalyzed, CallEnded, Event

SIGNATURE_HEADER = "x-retell-signature"
_SIGNATURE = re.compile(r"v=(\d{1,16}),d=([0-9a-f]{64})")
LIFECYCLE_EVENTS = frozenset({"call_started", "call_ended", "call_analyzed"})
# A redelivered webhook maps to the same (call_id, seq), so consumers drop it as a duplicate.
WEBHOOK_SEQ = {"call_ended": WEBHOOK_SEQ_BASE + 1, "call_analyzed": WEBHOOK_SEQ_BASE + 2}


class WebhookAuthError(Exception):
    """The signature is missing, malformed, stale or wrong (answer 401)."""

    def __init__(self, reason: str):
        super().__init__(f"webhook signature rejected: {reason}")
        self.reason = reason


class WebhookPayloadError(ValueError):
    """The body is not a webhook payload (answer 400)."""


def _digest(raw_body: bytes, secret: str, timestamp_ms: int) -> str:
    return hmac.new(secret.encode(), raw_body + str(timestamp_ms).encode(), hashlib.sha256).hexdigest()


def sign(raw_body: bytes, secret: str, *, now_ms: int | None = None) -> str:
    """The header value Retell would send (also used to sign our own outbound notifications)."""
    timestamp = int(time.time() * 1000) if now_ms is None else now_ms
    return f"v={timestamp},d={_digest(raw_body, secret, timestamp)}"


def verify_signature(
    raw_body: bytes,
    header: str | None,
    api_key: str,
    *,
    now_ms: int | None = None,
    tolerance_ms: int = 300_000,
) -> None:
    """Raise WebhookAuthError unless ``header`` signs ``raw_body`` with ``api_key`` within
    ``tolerance_ms`` of now. Compares digests in constant time."""
    if not header:
        raise WebhookAuthError(f"missing {SIGNATURE_HEADER} header")
    match = _SIGNATURE.fullmatch(header.strip())
    if match is None:
        raise WebhookAuthError("malformed signature header (expected v=<unix ms>,d=<64 lowercase hex>)")
    timestamp, digest = int(match.group(1)), match.group(2)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if abs(now - timestamp) > tolerance_ms:
        raise WebhookAuthError(f"stale timestamp ({abs(now - timestamp)} ms from now, tolerance {tolerance_ms} ms)")
    if not hmac.compare_digest(_digest(raw_body, api_key, timestamp), digest):
        raise WebhookAuthError("bad digest")


class WebhookEvent(BaseModel):
    """``{"event": ..., "call": {...}}``; unknown events and fields are kept, not rejected."""

    model_config = ConfigDict(extra="allow")

    event: str = Field(description="Retell's event name, e.g. call_ended.")
    call: dict[str, Any] = Field(default_factory=dict, description="Retell's call object, as sent.")

    @property
    def call_id(self) -> str | None:
        value = self.call.get("call_id")
        return value if isinstance(value, str) and value else None


def parse_webhook(raw_body: bytes | str) -> WebhookEvent:
    """Parse the (already verified) body; raise WebhookPayloadError on anything malformed."""
    try:
        return WebhookEvent.model_validate_json(raw_body)
    except ValidationError as exc:
        raise WebhookPayloadError(f"webhook body is not a valid payload: {exc.errors()[0]['msg']}") from exc


class WebhookDeduper:
    """In-process dedupe of lifecycle events on (event, call_id); bounded, oldest forgotten.

    A webhook is handed over first and remembered only after: ``seen`` before, ``remember``
    once the hand-over succeeded. Nothing is claimed ahead, so a hand-over that fails, is
    cancelled or dies with its replica leaves no mark, and Retell's retry is processed. Two
    deliveries racing may both be handed over: harmless, since the event's identity
    (call_id, its fixed webhook seq) makes consumers drop the second. Events outside
    ``events`` are never deduped (``transcript_updated`` legitimately repeats).
    """

    def __init__(self, max_entries: int = 100_000, events: frozenset[str] = LIFECYCLE_EVENTS):
        self.events = events
        self._seen: FIFOCache[tuple[str, str], None] = FIFOCache(max_entries)

    async def seen(self, event: str, call_id: str) -> bool:
        return event in self.events and (event, call_id) in self._seen

    async def remember(self, event: str, call_id: str) -> None:
        if event in self.events:
            self._seen[(event, call_id)] = None


class RedisWebhookDeduper:
    """The same dedupe shared by all gateway replicas: a key with a TTL per (event, call_id)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_s: int = 86_400,
        prefix: str = "callray:webhook:",
        events: frozenset[str] = LIFECYCLE_EVENTS,
    ):
        self.client, self.ttl_s, self.prefix, self.events = client, ttl_s, prefix, events

    def _key(self, event: str, call_id: str) -> str:
        return f"{self.prefix}{event}:{call_id}"

    async def seen(self, event: str, call_id: str) -> bool:
        return event in self.events and bool(await self.client.exists(self._key(event, call_id)))

    async def remember(self, event: str, call_id: str) -> None:
        if event in self.events:
            await self.client.set(self._key(event, call_id), b"1", ex=self.ttl_s)


def to_bus_event(webhook: WebhookEvent, seq: int | None = None, *, agent: str = "") -> Event | None:
    """``call_ended`` -> CallEnded, ``call_analyzed`` -> CallAnalyzed, anything else -> None.

    ``seq`` defaults to the event's fixed webhook seq (see ``WEBHOOK_SEQ``)."""
    if webhook.event not in WEBHOOK_SEQ:
        return None
    call_id = webhook.call_id
    if call_id is None:
        raise WebhookPayloadError(f"{webhook.event} webhook without call.call_id")
    seq = WEBHOOK_SEQ[webhook.event] if seq is None else seq
    if webhook.event == "call_ended":
        reason = webhook.call.get("disconnection_reason")
        return CallEnded(call_id=call_id, seq=seq, agent=agent, reason=str(reason or ""), call=webhook.call)
    return CallAnalyzed(call_id=call_id, seq=seq, agent=agent, call=webhook.call)
