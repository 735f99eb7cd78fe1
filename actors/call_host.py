"""``CallHost``: a Ray actor hosting calls as virtual actors (dedicated placement).

A thin shell around :class:`callray.host.Host`: it owns the stores and the agents, starts a
sweeper that deactivates idle calls, and exposes the host's entries as actor methods. Hosts are
named, detached and restarted by Ray when they die; a restarted host re-activates its calls
from the state store when their gateway re-attaches.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncIterator

import ray

from actors.metrics import HostMetrics
from callray.agents.registry import AgentRegistry
from callray.stores.bus import TappedSink
from callray.commands import CallCommand
from callray.consumers.runner import build_consumers, run_consumers
from callray.directory import CallDirectory
from callray.outbox import Frame, StreamEnd
from callray.events import Event
from callray.host import Delivery, Host
from callray.settings import CallraySettings
from callray.stores.factory import Stores, build_stores

log = logging.getLogger("callray.actors.call_host")

SWEEP_INTERVAL_S = 30.0
METRICS_INTERVAL_S = 5.0


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class CallHost:
    def __init__(self, settings: CallraySettings, name: str, release_to: str | None = None):
        self.name, self.settings = name, settings
        self.release_to = release_to  # dedicated placement: the pool that gets this actor back
        self._host: Host | None = None
        self._stores: Stores | None = None
        self._starting: asyncio.Lock | None = None
        self._consumers: dict[str, Any] = {}

    async def _ensure_host(self) -> Host:
        """Build stores and agents on first use (connecting to Redis needs the event loop)."""
        if self._host is not None:
            return self._host
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._host is None:
                settings = self.settings
                settings.configure_logging()
                self._stores = await build_stores(settings)
                self._metrics = HostMetrics(self.name, settings.architecture)
                self._host = Host(settings, AgentRegistry.from_settings(settings.agents), store=self._stores.state,
                                  cache=self._stores.cache, events=TappedSink(self._stores.events, self._metrics.observe),
                                  name=self.name,
                                  on_deactivate=self._release if self.release_to else None)
                self._directory = CallDirectory(self.name, self._host, store=self._stores.state,
                                                redis=self._stores.redis)
                self._host.on_claimed = self._directory.notify_superseded
                self._commands = asyncio.create_task(self._directory.serve())
                self._sweeper = asyncio.create_task(self._sweep_forever())  # held: tasks need a reference
                self._warmup = asyncio.create_task(self._host.warm_cache())
                self._consumers = {}
                if settings.events.backend == "memory":  # in-process consumers, best effort
                    self._consumers = build_consumers(settings, command=self._directory.send,
                                                      emit=self._stores.events.emit)
                    self._consuming = asyncio.create_task(
                        run_consumers(self._stores.events, self._consumers, self.name, asyncio.Event()))
        return self._host

    async def _release(self, call_id: str) -> None:
        """Dedicated placement: the call is over, so this actor goes back to (is ended by) its pool."""
        pool = ray.get_actor(self.release_to, namespace=self._host.settings.hosts.namespace)
        pool.release.remote(call_id)

    async def _sweep_forever(self) -> None:
        """Every few seconds refresh the gauges; every SWEEP_INTERVAL_S deactivate idle calls."""
        ticks = 0
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            ticks += 1
            try:
                self._metrics.export(self._host.stats(), self._stores.events.stats())
                if ticks * METRICS_INTERVAL_S >= SWEEP_INTERVAL_S:
                    ticks = 0
                    await self._host.sweep()
            except Exception:  # housekeeping must outlive one bad call
                log.exception("%s: housekeeping failed", self.name)

    async def ready(self) -> str:
        await self._ensure_host()
        return self.name

    async def stream(self, call_id: str, connection_id: str, agent: str | None = None,
                     resume: bool = False, heard_greeting: bool = True) -> AsyncIterator[list[Frame] | StreamEnd]:
        host = await self._ensure_host()
        async for item in host.stream(call_id, connection_id, agent, resume, heard_greeting):
            yield item

    async def deliver(self, call_id: str, connection_id: str, frame: str) -> Delivery:
        return await (await self._ensure_host()).deliver(call_id, connection_id, frame)

    async def detach(self, call_id: str, connection_id: str) -> None:
        await (await self._ensure_host()).detach(call_id, connection_id)

    async def command(self, call_id: str, command: CallCommand) -> bool:
        return await (await self._ensure_host()).command(call_id, command)

    async def webhook(self, event: Event) -> None:
        await (await self._ensure_host()).webhook(event)

    async def analytics(self) -> dict[str, Any] | None:
        """In-process analytics (memory event backend), else None."""
        await self._ensure_host()
        consumer = self._consumers.get("analytics")
        return consumer.snapshot() if consumer else None

    async def archived(self, call_id: str) -> dict[str, Any] | None:
        await self._ensure_host()
        archive = self._consumers.get("archive")
        return await archive.get(call_id) if archive else None

    async def deactivate(self, call_id: str) -> bool:
        return await (await self._ensure_host()).deactivate(call_id)

    async def stats(self) -> dict[str, Any]:
        return (await self._ensure_host()).stats()

    async def pid(self) -> int:
        return os.getpid()
