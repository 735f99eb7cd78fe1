"""The gateway: callray's HTTP and WebSocket front door, with no Ray in it.

:func:`build_api` is the FastAPI app that Serve runs as the ingress of every gateway replica
(``serve_app.py``) and that tests may run under plain uvicorn. Its routes find the replica's
:class:`Gateway` in ``app.state.gateway``: the socket guard, the webhook check, and where calls
live (``calls``: this replica with ``local`` placement, Ray actors with ``dedicated``).
"""

# No `from __future__ import annotations` here: FastAPI resolves the routes' annotations, and
# Serve's ingress rewriting breaks on string annotations (HTTP 403).
import asyncio
import hmac
import ipaddress
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, Security, WebSocket
from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from callray.erasure import CallLiveError, Erasure
from callray.events import Event
from callray.guard import SocketGuard
from callray.inbound import InboundCalls
from callray.live import LiveCalls
from callray.session import CallLink, SocketSession
from callray.settings import CallraySettings
from callray.webhook import (
    SIGNATURE_HEADER, RedisWebhookDeduper, WebhookAuthError, WebhookDeduper, WebhookPayloadError, parse_webhook, to_bus_event,
    verify_signature,
)

log = logging.getLogger("callray.gateway")

LIVE_PAGE = Path(__file__).with_name("static") / "live.html"

#: Retell's call ids are short url-safe strings; anything else is refused before any state exists.
CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
CLOSE_BAD_CALL_ID = 4400


class Placement(Protocol):
    """Where the calls of this gateway live: in this process (``CallsRuntime``, local placement)
    or in a Ray actor each (``DedicatedPlacement``, dedicated placement)."""

    def link(self, call_id: str, agent: str | None) -> CallLink:
        """How a new socket reaches the call's actor."""

    async def webhook(self, event: Event) -> None:
        """Hand a webhook's event over for good (raise if it cannot be, so Retell retries)."""


class Reads(Protocol):
    """Where the operator's routes find the analytics and the archive (None: there is none)."""

    async def analytics(self) -> dict[str, Any] | None: ...

    async def archived(self, call_id: str) -> dict[str, Any] | None: ...

    async def export(self, since: float | None, after: str, limit: int) -> dict[str, Any] | None: ...

    async def calls_of(self, callers: list[str]) -> list[str]: ...

    async def erase_record(self, call_id: str) -> bool: ...


class Gateway:
    """One replica's front door (see the module docstring)."""

    def __init__(self, settings: CallraySettings, placement: Placement, reads: Reads,
                 deduper: WebhookDeduper | RedisWebhookDeduper | None = None, live: LiveCalls | None = None,
                 erasure: Erasure | None = None, ingress: str | None = None, user_code_loop: str | None = None):
        self.settings, self.placement, self.reads, self.live = settings, placement, reads, live
        self.ingress = ingress  # what this replica runs behind (None: not under Serve)
        self.user_code_loop = user_code_loop  # where Serve runs this code (None: not under Serve)
        if ingress is not None:
            _check_ingress(settings, ingress)
        self.erasure = erasure or Erasure(reads, settings.privacy)
        self.guard = SocketGuard(settings.gateway.guard)
        self.deduper = deduper or WebhookDeduper()
        self.inbound_calls = InboundCalls(settings.inbound)
        self.redactor = settings.privacy.redactor()
        self._warned_open = False

    async def socket(self, websocket: WebSocket, tail: str) -> None:
        """``{prefix}/{call_id}`` (default agent) or ``{prefix}/{agent}/{call_id}``, with the
        shared secret as a first segment (or ``?token=``) when ``gateway.guard.secret`` is set;
        ``tail`` is what follows the prefix."""
        verdict = self.guard.check([p for p in tail.split("/") if p], dict(websocket.query_params), websocket.client.host if websocket.client else None,
                                   {k.lower(): v for k, v in websocket.headers.items()})
        segments, code, reason = verdict.segments, verdict.code, verdict.reason
        if verdict.allowed and (len(segments) not in (1, 2) or (len(segments) == 2 and segments[0] not in self.settings.agents.files)):
            code, reason = 4404, "unknown route or agent"
        elif verdict.allowed and not CALL_ID.fullmatch(segments[-1]):
            code, reason = CLOSE_BAD_CALL_ID, "a call id is 1-128 characters of A-Z a-z 0-9 _ -"
        if code:  # refused before any call state exists; the close code says why
            log.warning("refused socket from %s: %d %s", verdict.client, code, reason)
            await websocket.accept()
            await websocket.close(code=code, reason=reason)
            return
        agent, call_id = (segments[0], segments[1]) if len(segments) == 2 else (None, segments[0])
        self._warn_if_open(verdict.client)
        self.guard.opened()
        try:
            await SocketSession(websocket, call_id, self.placement.link(call_id, agent), self.settings.gateway).run()
        except asyncio.CancelledError:
            # Serve cancels the handler of a socket whose client went away before the session
            # has read the disconnect, and does not wait for it; the session has torn down by
            # now (in ``run``'s finally). Re-raised, the cancellation would keep, through its
            # traceback, every frame and object of the call in a reference cycle of Serve's
            # (``Replica._handle_errors_and_metrics`` keeps the exception it caught), which only
            # a full garbage collection frees: about 140 objects per call, and in a busy replica
            # full collections of 55-110 ms of CPU. Nothing awaits the handler: it ends normally.
            pass
        finally:
            self.guard.closed()

    def _warn_if_open(self, client: str) -> None:
        """Once per replica: sockets from beyond this machine are accepted without a secret."""
        if self._warned_open or self.settings.gateway.guard.secret is not None or not client:
            return
        try:
            local = ipaddress.ip_address(client).is_loopback
        except ValueError:
            return
        if not local:
            self._warned_open = True
            log.warning("SECURITY: a socket from %s was accepted without a secret: anyone who can reach this "
                        "address can talk to the agent. Set gateway.guard.secret (CALLRAY_SOCKET_SECRET) or "
                        "allow_ips.", client)

    async def _read_body(self, request: Request) -> bytes:
        """The raw body, refused with 413 as soon as it passes ``webhook.max_body_bytes``
        (declared or read), so an oversized body is never held whole."""
        limit = self.settings.webhook.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body of {declared} bytes exceeds webhook.max_body_bytes={limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"body exceeds webhook.max_body_bytes={limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _signed_body(self, request: Request) -> bytes:
        """The raw body of a webhook, once its signature is verified (404 when webhooks are
        off, 401 when the signature is missing or wrong)."""
        settings = self.settings.webhook
        if not settings.enabled:
            raise HTTPException(404, "webhooks are disabled (webhook.enabled: false)")
        raw = await self._read_body(request)
        if not settings.api_key:
            raise HTTPException(401, "webhook.api_key is not configured (set RETELL_API_KEY)")
        try:
            verify_signature(raw, request.headers.get(SIGNATURE_HEADER), settings.api_key,
                             now_ms=int(time.time() * 1000), tolerance_ms=int(settings.tolerance_s * 1000))
        except WebhookAuthError as exc:
            raise HTTPException(401, exc.reason) from None
        return raw

    async def inbound(self, request: Request) -> dict[str, Any]:
        """Retell's inbound call webhook: the overrides and variables for a ringing call."""
        raw = await self._signed_body(request)
        try:
            payload = json.loads(raw).get("call_inbound")
        except (ValueError, AttributeError):
            payload = None
        if not isinstance(payload, dict):
            raise HTTPException(400, "expected {\"event\": \"call_inbound\", \"call_inbound\": {...}}")
        return {"call_inbound": await self.inbound_calls.answer(payload)}

    async def webhook(self, request: Request) -> Response:
        """Retell's signed webhook: verify over the raw bytes, hand the event over unless it was
        before, and only then answer 204; a hand-over that fails answers 503 so that Retell's
        retry comes, and nothing marks it seen before it was handed over."""
        raw = await self._signed_body(request)
        try:
            webhook = parse_webhook(raw)
            event = to_bus_event(webhook)
        except WebhookPayloadError as exc:
            raise HTTPException(400, str(exc)) from None
        if event is not None and self.redactor is not None:  # the transcript and numbers Retell sends
            event = self.redactor.event(event)
        call_id = webhook.call_id
        if event is not None and call_id and not await self._seen(webhook.event, call_id):
            try:
                await self.placement.webhook(event)
            except Exception as exc:
                log.error("call %s: webhook %s not handed over: %r", call_id, webhook.event, exc,
                          extra={"call_id": call_id})
                raise HTTPException(503, f"{webhook.event} for call {call_id} not handed over; retry") from None
            try:
                await self.deduper.remember(webhook.event, call_id)
            except Exception as exc:  # handed over already: a retry is dropped by the consumers instead
                log.warning("call %s: webhook %s not remembered: %r", call_id, webhook.event, exc,
                            extra={"call_id": call_id})
        return Response(status_code=204)

    async def _seen(self, event: str, call_id: str) -> bool:
        """Whether this lifecycle webhook was handed over before; unknown (the dedupe store is
        down) counts as not seen: handing it over twice is harmless, losing it is not."""
        try:
            return await self.deduper.seen(event, call_id)
        except Exception as exc:
            log.warning("call %s: webhook dedupe unavailable (%r); handing %s over", call_id, exc, event,
                        extra={"call_id": call_id})
            return False


def _check_ingress(settings: CallraySettings, ingress: str) -> None:
    """Say once, at start, when the ingress is not the one the config expects, and when the
    guard's per-address checks would see HAProxy instead of the caller."""
    wanted = settings.gateway.ingress
    if ingress != wanted:
        how = ("start Ray with RAY_SERVE_ENABLE_HA_PROXY=1" if wanted == "haproxy"
               else "start Ray without RAY_SERVE_ENABLE_HA_PROXY")
        log.error("gateway.ingress is %r but this replica runs behind %r: %s (docs/operations.md, 'The ingress'); "
                  "serving anyway", wanted, ingress, how)
    guard = settings.gateway.guard
    if ingress == "haproxy" and (guard.allow_ips or guard.connections_per_s) and not guard.trusted_proxies:
        log.warning("behind HAProxy every socket's peer is HAProxy, so gateway.guard.allow_ips and "
                    "connections_per_s see HAProxy's address, not the caller's: put the balancer that terminates "
                    "TLS in front (it sets X-Forwarded-For) and list it and HAProxy's node addresses in "
                    "gateway.guard.trusted_proxies")


_BEARER = HTTPBearer(auto_error=False, description="gateway.read_token (read routes) or gateway.admin_token (erasure)")


def _require_bearer(credentials: HTTPAuthorizationCredentials | None, token: str | None, name: str, off: str) -> None:
    """Only with the configured token (compared in constant time); with none configured the
    routes do not exist (404)."""
    if token is None:
        raise HTTPException(404, f"not found ({off})")
    if credentials is None or not hmac.compare_digest(credentials.credentials.strip().encode(), token.encode()):
        raise HTTPException(401, f"a valid 'Authorization: Bearer <{name} token>' header is required",
                            headers={"WWW-Authenticate": "Bearer"})


def reader(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(_BEARER)) -> Gateway:
    """The gateway, for a request with the read token: the read routes serve callers' words and numbers."""
    front: Gateway = request.app.state.gateway
    _require_bearer(credentials, front.settings.gateway.read_token, "read", "the read routes are off: set CALLRAY_READ_TOKEN")
    return front


def admin(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(_BEARER)) -> Gateway:
    """The gateway, for a request with the admin token (not the read token): erasure removes
    callers' data for good."""
    front: Gateway = request.app.state.gateway
    _require_bearer(credentials, front.settings.gateway.admin_token, "admin", "erasure is off: set CALLRAY_ADMIN_TOKEN")
    return front


def _check_call_id(call_id: str) -> None:
    if not CALL_ID.fullmatch(call_id):
        raise HTTPException(400, "a call id is 1-128 characters of A-Z a-z 0-9 _ -")


def build_api(front: Gateway) -> FastAPI:
    """The routes of a gateway replica, serving ``front`` (kept in ``app.state.gateway``)."""
    api = FastAPI(title="callray", description="Retell AI custom-LLM backend on Ray Serve")
    api.state.gateway = front  # where the token dependencies (reader, admin) find it

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        settings = front.settings
        return {"status": "ok", "architecture": settings.architecture, "placement": settings.hosts.placement,
                "ingress": front.ingress, "user_code_loop": front.user_code_loop}

    @api.post("/webhook")
    async def webhook(request: Request) -> Response:
        return await front.webhook(request)

    @api.post("/webhook/inbound")
    async def inbound(request: Request) -> dict[str, Any]:
        return await front.inbound(request)

    @api.get("/analytics")
    async def analytics(front: Gateway = Depends(reader)) -> dict[str, Any]:
        """Live figures of the calls' events (needs the read token)."""
        snapshot = await front.reads.analytics()
        if snapshot is None:
            raise HTTPException(404, "no analytics consumer runs in this deployment")
        return snapshot

    @api.get("/calls/{call_id}")
    async def call_record(call_id: str, front: Gateway = Depends(reader)) -> dict[str, Any]:
        """The archived record of one call: turns, timings, Retell's call object (needs the read token)."""
        _check_call_id(call_id)
        record = await front.reads.archived(call_id)
        if record is None:
            raise HTTPException(404, f"no archived record for call {call_id!r}")
        return record

    @api.get("/calls")
    async def export_calls(since: float | None = None, after: str = "", limit: int = Query(default=100, ge=1, le=1000),
                           front: Gateway = Depends(reader)) -> dict[str, Any]:
        """One page of archived records in call id order (``callray export`` pages through them):
        calls that ended (or, never ended, started) at or after ``since`` (unix seconds), after
        call id ``after``. ``next`` is the ``after`` of the next page (null at the end); the first
        page also has ``total``. Needs the read token."""
        page = await front.reads.export(since, after, limit)
        if page is None:
            raise HTTPException(404, "no archive in this deployment (archive.backend: none)")
        return page

    @api.delete("/calls/{call_id}")
    async def erase_call(call_id: str, force: bool = False, front: Gateway = Depends(admin)) -> dict[str, Any]:
        """Erase one call: its record, state, cache entries and events (needs the admin token).
        409 while the call is live, unless ``force``."""
        _check_call_id(call_id)
        try:
            return await front.erasure.call(call_id, force=force)
        except CallLiveError as exc:
            raise HTTPException(409, str(exc)) from None

    @api.delete("/callers/{number}")
    async def erase_caller(number: str, front: Gateway = Depends(admin)) -> dict[str, Any]:
        """Erase every archived call of one caller, found by phone number (needs the admin token)."""
        try:
            return await front.erasure.caller(number)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    @api.get("/ui", response_class=HTMLResponse)
    @api.get("/ui/", response_class=HTMLResponse)
    async def live_page() -> HTMLResponse:
        """The live calls page (it asks for the read token, then reads the two routes below)."""
        if front.live is None:
            raise HTTPException(404, "not found (the live calls page needs CALLRAY_READ_TOKEN)")
        return HTMLResponse(LIVE_PAGE.read_text(encoding="utf-8"))

    @api.get("/ui/state")
    async def live_state(front: Gateway = Depends(reader)) -> dict[str, Any]:
        if front.live is None:
            raise HTTPException(404, "no live view in this deployment")
        await front.live.watch()  # the view follows the events while someone looks
        return front.live.snapshot()

    @api.get("/ui/events")
    async def live_events(front: Gateway = Depends(reader)) -> StreamingResponse:
        """What changed, as server-sent events, a batch every 250 ms at most."""
        if front.live is None:
            raise HTTPException(404, "no live view in this deployment")

        async def stream() -> Any:
            async for batch in front.live.updates():
                yield f"data: {json.dumps(batch, separators=(',', ':'))}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @api.websocket(front.settings.gateway.path_prefix + "/{tail:path}")
    async def socket(websocket: WebSocket, tail: str) -> None:
        await front.socket(websocket, tail)

    @api.websocket("/{path:path}")
    async def unknown_socket(websocket: WebSocket, path: str) -> None:
        """Refused before the handshake completes (HTTP 403; Starlette's own answer would be a 1000 close)."""
        await websocket.close(code=4404, reason="unknown route")

    return api
