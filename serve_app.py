"""callray's Ray Serve application: the gateway deployment and its builder.

``serve run config/serve.yaml`` imports ``serve_app:build_app`` and passes the config's
``args`` to it; the settings are validated there, so a bad config fails at start naming the
field. Each ``CallGateway`` replica serves the routes of :func:`callray.gateway.build_api`.
With ``local`` placement (the default) the calls whose sockets a replica holds live in that
replica (``callray/runtime.py``): no Ray call on a turn's path. ``dedicated`` placement puts
each call in a Ray actor of its own (``actors/placement.py``).
"""

# No `from __future__ import annotations` here: Serve rewrites the ingress class, and string
# annotations break FastAPI's resolution of its routes (HTTP 403).
import asyncio
import os
import uuid
from typing import Any

from ray import serve
from ray.serve import Application

from actors.consumers import start_consumers
from actors.metrics import HostMetrics
from actors.placement import DedicatedPlacement
from callray.erasure import Erasure
from callray.gateway import Gateway, build_api
from callray.runtime import CallsRuntime
from callray.settings import CallraySettings
from callray.stores.factory import Stores, build_stores
from callray.webhook import RedisWebhookDeduper, WebhookDeduper


def serve_ingress() -> str:
    """What Serve put in front of this replica: HAProxy when Ray started with
    RAY_SERVE_ENABLE_HA_PROXY=1 (its processes, this one among them, inherit it), else its proxy."""
    return "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"


def user_code_loop() -> str:
    """Where Serve runs callray in this replica: "shared", on the replica's own event loop, as
    the shipped configs ask (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in the deployment's
    environment), or "separate", on a loop in a thread of its own (Ray's default), which costs
    every frame a hop between threads and the GIL (docs/operations.md, 'The event loop')."""
    from ray.serve._private import constants  # what the replica itself read at start

    return "separate" if constants.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD else "shared"


class ConsumerReads:
    """The read routes of the event-driven architecture: the analytics and archive actors."""

    def __init__(self, consumers: dict[str, Any]):
        self.consumers = consumers

    async def analytics(self) -> dict[str, Any] | None:
        return await self.consumers["analytics"].snapshot.remote()

    async def archived(self, call_id: str) -> dict[str, Any] | None:
        return await self.consumers["archive"].archived.remote(call_id)

    async def export(self, since: float | None, after: str, limit: int) -> dict[str, Any] | None:
        return await self.consumers["archive"].export.remote(since, after, limit)

    async def calls_of(self, callers: list[str]) -> list[str]:
        return await self.consumers["archive"].calls_of.remote(callers)

    async def erase_record(self, call_id: str) -> bool:
        return await self.consumers["archive"].erase_record.remote(call_id)


class NoReads:
    """Placements whose consumers run inside the call actors have nothing to read here."""

    async def analytics(self) -> None:
        return None

    async def archived(self, call_id: str) -> None:
        return None

    async def export(self, since: float | None, after: str, limit: int) -> None:
        return None

    async def calls_of(self, callers: list[str]) -> list[str]:
        return []

    async def erase_record(self, call_id: str) -> bool:
        return False


@serve.deployment(
    name="CallGateway",
    # The config files set the same (their ray_actor_options replace these).
    ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}},
    # Each open socket is one ongoing request for the whole call: Serve's defaults (5 / 2)
    # would refuse the sixth call. The config file overrides these per architecture.
    max_ongoing_requests=1000,
    # A downscale or redeploy drains a replica: its calls may finish (or Retell reconnects
    # them elsewhere) before it stops.
    graceful_shutdown_timeout_s=60,
)
@serve.ingress()  # the app is built in the replica, after the constructor: __serve_build_asgi_app__
class CallGateway:
    async def __init__(self, settings: CallraySettings):
        self.settings = settings  # validated once, by build_app
        self.settings.configure_logging()
        context = serve.get_replica_context()
        self.app_name = context.app_name
        self.name = f"{context.app_name}-{context.replica_id.unique_id}-{uuid.uuid4().hex[:6]}"
        self.runtime: CallsRuntime | None = None
        self._stores: Stores | None = None  # dedicated placement: the stores this gateway opened itself
        self.consumers: dict[str, Any] = {}
        self._background: list[asyncio.Task] = []
        if self.settings.hosts.placement == "local":
            self.metrics = HostMetrics(self.name, self.settings.architecture)
            self.runtime = await CallsRuntime.start(self.settings, self.name, observe=self.metrics.observe)
            placement, reads = self.runtime, self.runtime
            stores = self.runtime.stores
            self._background.append(asyncio.create_task(self.metrics.export_forever(self.runtime)))
        else:
            remote = DedicatedPlacement(self.app_name, self.settings)
            placement, reads = remote, NoReads()
            # the calls' state lives in their actors; Redis-backed stores are reachable from here too
            stores = self._stores = await build_stores(self.settings) if self.settings.uses_redis else None
            self._background.append(asyncio.create_task(remote.start()))  # warm pool / hosts, never before accept
        if self.settings.events.backend == "redis_streams":
            self.consumers = start_consumers(self.app_name, self.settings)
            reads = ConsumerReads(self.consumers)
            self._background.append(asyncio.create_task(self._start_consumers()))
        redis = stores.redis if stores is not None else None
        deduper = RedisWebhookDeduper(redis) if redis is not None else WebhookDeduper()
        self.gateway = Gateway(self.settings, placement, reads, deduper, erasure=Erasure(reads, self.settings.privacy, stores),
                               live=self.runtime.live if self.runtime is not None else None, ingress=serve_ingress(),
                               user_code_loop=user_code_loop())

    def __serve_build_asgi_app__(self) -> Any:
        """Serve's hook for an app built in the replica: callray's routes on this replica's gateway."""
        return build_api(self.gateway)

    async def _start_consumers(self) -> None:
        await asyncio.gather(*(c.start.remote() for c in self.consumers.values()))

    async def check_health(self) -> None:
        """Serve's periodic probe: the replica's housekeeping runs, and consumer actors that Ray
        restarted consume again (``start`` is idempotent; not awaited, so a restarting
        consumer cannot fail it)."""
        problem = self.runtime.healthy() if self.runtime is not None else None
        if problem:
            raise RuntimeError(f"{self.name}: {problem}")
        for consumer in self.consumers.values():
            consumer.start.remote()

    async def __del__(self) -> None:
        """Serve's shutdown of this replica: save every call it holds, close the stores."""
        for task in self._background:
            task.cancel()
        if self.runtime is not None:
            await self.runtime.close()
        if self._stores is not None:
            await self._stores.close()


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: validate the settings once (environment references expanded
    here, never again) and bind the gateway to the result; every actor gets the same object."""
    return CallGateway.bind(CallraySettings.parse(args, source="serve application args"))
