"""callray's Ray Serve application: the gateway deployment and its builder.

``serve run config/serve.yaml`` imports ``serve_app:build_app`` and passes the config's
``args`` to it; the settings are validated there, so a bad config fails at start naming the
field. The gateway does socket I/O only; calls live in the ``CallHost`` actors.
"""


# No `from __future__ import annotations` here: FastAPI must resolve the WebSocket annotation
# of the class-based routes Serve rewrites, and string annotations break that (HTTP 403).
import logging
from typing import Any

import asyncio
import time

from fastapi import FastAPI, HTTPException, Request, Response, WebSocket
from ray import serve
from ray.serve import Application

from actors.consumers import start_consumers
from actors.gateway import SocketSession
from actors.placement import host_directory
from callray.guard import SocketGuard
from callray.placement import host_names
from callray.settings import CallraySettings
from callray.webhook import (
    RedisWebhookDeduper, WebhookAuthError, WebhookDeduper, WebhookPayloadError, parse_webhook, to_bus_event,
    verify_signature,
)

log = logging.getLogger("callray.serve_app")

api = FastAPI(title="callray", description="Retell AI custom-LLM backend on Ray Serve")


@serve.deployment(
    name="CallGateway",
    ray_actor_options={"num_cpus": 0.5},
    # Each open socket is one ongoing request for the whole call: Serve's defaults (5 / 2)
    # would refuse the sixth call. The config file overrides these per architecture.
    max_ongoing_requests=1000,
    graceful_shutdown_timeout_s=60,
)
@serve.ingress(api)
class CallGateway:
    def __init__(self, settings: dict[str, Any]):
        self.settings = CallraySettings.parse(settings)
        self.settings.configure_logging()
        self.guard = SocketGuard(self.settings.gateway.guard)
        app_name = serve.get_replica_context().app_name
        self.hosts = host_directory(app_name, self.settings)
        self.app_name = app_name
        self.prefix = self.settings.gateway.path_prefix.strip("/").split("/")
        self.consumers: dict = {}
        self.deduper: WebhookDeduper | RedisWebhookDeduper = WebhookDeduper()
        self._background: set[asyncio.Task] = set()
        self._started = False

    async def _ensure_hosts(self) -> None:
        if not self._started:
            await self.hosts.start()
            if self.settings.events.backend == "redis_streams":
                from callray.stores.redis_client import redis_client

                self.consumers = start_consumers(self.app_name, self.settings)
                await asyncio.gather(*(c.start.remote() for c in self.consumers.values()))
                self.deduper = RedisWebhookDeduper(redis_client(self.settings.state.redis_url))
            self._started = True

    async def check_health(self) -> None:
        """Serve's periodic probe: hosts exist, and consumer actors that Ray restarted consume
        again (``start`` is idempotent; not awaited, so a restarting consumer cannot fail it)."""
        await self._ensure_hosts()
        for consumer in self.consumers.values():
            consumer.start.remote()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        await self._ensure_hosts()
        return {"status": "ok", "architecture": self.settings.architecture, "placement": self.settings.hosts.placement}

    @api.post("/webhook")
    async def webhook(self, request: Request) -> Response:
        """Retell's signed webhook: verify over the raw bytes, dedupe, answer 204 at once,
        hand the event to the call's host after (Retell retries on a slow answer)."""
        settings = self.settings.webhook
        if not settings.enabled:
            raise HTTPException(404, "webhooks are disabled (webhook.enabled: false)")
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise HTTPException(413, f"body of {len(raw)} bytes exceeds webhook.max_body_bytes={settings.max_body_bytes}")
        if not settings.api_key:
            raise HTTPException(401, "webhook.api_key is not configured (set RETELL_API_KEY)")
        try:
            verify_signature(raw, request.headers.get("x-retell-signature"), settings.api_key,
                             now_ms=int(time.time() * 1000), tolerance_ms=int(settings.tolerance_s * 1000))
            webhook = parse_webhook(raw)
        except WebhookAuthError as exc:
            raise HTTPException(401, exc.reason) from None
        except WebhookPayloadError as exc:
            raise HTTPException(400, str(exc)) from None
        call_id = webhook.call_id
        if call_id and await self.deduper.claim(webhook.event, call_id):
            event = to_bus_event(webhook)
            if event is not None:
                task = asyncio.create_task(self._hand_over(webhook.event, event))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        return Response(status_code=204)

    async def _hand_over(self, name: str, event: Any) -> None:
        await self._ensure_hosts()
        host = await self.hosts.owner(event.call_id)
        try:
            await host.webhook.remote(event)
        except Exception:
            await self.deduper.release(name, event.call_id)  # let Retell's retry through
            log.exception("call %s: webhook %s not handed over", event.call_id, event.type)

    @api.get("/analytics")
    async def analytics(self) -> dict[str, Any]:
        """Live figures: from the analytics actor (event-driven), else per call host."""
        await self._ensure_hosts()
        if "analytics" in self.consumers:
            return await self.consumers["analytics"].snapshot.remote()
        names = host_names(self.app_name, self.settings.hosts.count) if self.settings.hosts.placement == "shared" else []
        hosts = [await self.hosts.owner_by_name(name) for name in names]
        snapshots = await asyncio.gather(*(host.analytics.remote() for host in hosts))
        return {"hosts": dict(zip(names, snapshots))}

    @api.get("/calls/{call_id}")
    async def call_record(self, call_id: str) -> dict[str, Any]:
        """The archived record of one call (turns, timings, Retell's call object)."""
        await self._ensure_hosts()
        if "archive" in self.consumers:
            record = await self.consumers["archive"].archived.remote(call_id)
        else:
            record = await (await self.hosts.owner(call_id)).archived.remote(call_id)
        if record is None:
            raise HTTPException(404, f"no archived record for call {call_id!r}")
        return record

    @api.websocket("/{path:path}")
    async def socket(self, websocket: WebSocket, path: str) -> None:
        """``{prefix}/{call_id}`` (default agent) or ``{prefix}/{agent}/{call_id}``, with the
        shared secret as a first segment (or ``?token=``) when ``gateway.guard.secret`` is set."""
        tail = self._route_tail(path)
        if tail is None:
            await websocket.close(code=4404, reason="unknown route")
            return
        verdict = self.guard.check(tail, dict(websocket.query_params), websocket.client.host if websocket.client else None,
                                   {k.lower(): v for k, v in websocket.headers.items()})
        segments = verdict.segments
        code, reason = verdict.code, verdict.reason
        if verdict.allowed and (len(segments) not in (1, 2) or (len(segments) == 2 and segments[0] not in self.settings.agents.files)):
            code, reason = 4404, "unknown route or agent"
        if code:  # refused before any call state exists; the close code says why
            log.warning("refused socket from %s: %d %s", verdict.client, code, reason)
            await websocket.accept()
            await websocket.close(code=code, reason=reason)
            return
        agent, call_id = (segments[0], segments[1]) if len(segments) == 2 else (None, segments[0])
        self.guard.opened()
        try:
            await self._ensure_hosts()
            await SocketSession(websocket, call_id, agent, self.hosts, self.settings).run()
        finally:
            self.guard.closed()

    def _route_tail(self, path: str) -> list[str] | None:
        """The segments after the configured prefix (Serve may keep its route prefix in ``path``)."""
        parts, n = [p for p in path.split("/") if p], len(self.prefix)
        for start in range(len(parts) - n, -1, -1):
            if parts[start:start + n] == self.prefix:
                return parts[start + n:]
        return None


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: validate the settings, bind the gateway."""
    settings = CallraySettings.parse(args, source="serve application args")
    return CallGateway.bind(settings.model_dump(mode="json"))
