"""callray's Ray Serve application: the gateway deployment and its builder.

``serve run config/serve.yaml`` imports ``serve_app:build_app`` and passes the config's
``args`` to it; the settings are validated there, so a bad config fails at start naming the
field. The gateway does socket I/O only; calls live in the ``CallHost`` actors.
"""


# No `from __future__ import annotations` here: FastAPI must resolve the WebSocket annotation
# of the class-based routes Serve rewrites, and string annotations break that (HTTP 403).
import logging
from typing import Any

from fastapi import FastAPI, WebSocket
from ray import serve
from ray.serve import Application

from actors.gateway import SocketSession
from actors.placement import host_directory
from callray.settings import CallraySettings

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
        app_name = serve.get_replica_context().app_name
        self.hosts = host_directory(app_name, self.settings)
        self.prefix = self.settings.gateway.path_prefix.strip("/").split("/")
        self._started = False

    async def _ensure_hosts(self) -> None:
        if not self._started:
            await self.hosts.start()
            self._started = True

    async def check_health(self) -> None:
        await self._ensure_hosts()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        await self._ensure_hosts()
        return {"status": "ok", "architecture": self.settings.architecture, "placement": self.settings.hosts.placement}

    @api.websocket("/{path:path}")
    async def socket(self, websocket: WebSocket, path: str) -> None:
        """``{prefix}/{call_id}`` (default agent) or ``{prefix}/{agent}/{call_id}``."""
        tail = self._route_tail(path)
        if tail is None or len(tail) not in (1, 2) or (len(tail) == 2 and tail[0] not in self.settings.agents.files):
            await websocket.close(code=4404, reason="unknown route or agent")
            return
        agent, call_id = (tail[0], tail[1]) if len(tail) == 2 else (None, tail[0])
        await self._ensure_hosts()
        await SocketSession(websocket, call_id, agent, self.hosts, self.settings).run()


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
