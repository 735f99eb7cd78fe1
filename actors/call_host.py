"""``CallHost``: a Ray actor hosting calls as virtual actors (dedicated placement).

A thin shell around :class:`callray.runtime.CallsRuntime`, the same calls runtime a gateway
replica runs (stores, agents, directory, idle sweep, pre-caching, in-process consumers): it
exposes the host's entries as actor methods, exports its metrics, and gives itself back to its
pool when its call leaves memory. Hosts are named, detached and restarted by Ray when they die;
a restarted host re-activates its calls from the state store when their gateway re-attaches.
"""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator

import ray

from actors.metrics import HostMetrics
from callray.commands import CallCommand
from callray.events import Event
from callray.host import Delivery, Host
from callray.outbox import StreamEnd
from callray.protocol import InboundEvent, OutboundFrame
from callray.runtime import CallsRuntime
from callray.settings import CallraySettings


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class CallHost:
    def __init__(self, settings: CallraySettings, name: str, release_to: str):
        self.name, self.settings = name, settings
        self.release_to = release_to  # the pool that gets this actor back when its call is over
        self._runtime: CallsRuntime | None = None
        self._starting: asyncio.Lock | None = None
        self._exporting: asyncio.Task | None = None

    async def _ensure_host(self) -> Host:
        """Start the calls runtime on first use (connecting to Redis needs the event loop)."""
        if self._runtime is None:
            self._starting = self._starting or asyncio.Lock()
            async with self._starting:
                if self._runtime is None:
                    self.settings.configure_logging()
                    metrics = HostMetrics(self.name, self.settings.architecture)
                    runtime = await CallsRuntime.start(self.settings, self.name, observe=metrics.observe,
                                                       on_deactivate=self._release, live=False)
                    self._exporting = asyncio.create_task(metrics.export_forever(runtime))  # held: tasks need a reference
                    self._runtime = runtime
        return self._runtime.host

    async def _release(self, call_id: str) -> None:
        """The call is over here, so this actor goes back to (is ended by) its pool."""
        pool = ray.get_actor(self.release_to, namespace=self.settings.hosts.namespace)
        pool.release.remote(call_id)

    async def ready(self) -> str:
        await self._ensure_host()
        return self.name

    async def stream(self, call_id: str, connection_id: str, agent: str | None = None,
                     resume: bool = False, heard_greeting: bool = True) -> AsyncIterator[list[OutboundFrame] | StreamEnd]:
        host = await self._ensure_host()
        async for item in host.stream(call_id, connection_id, agent, resume, heard_greeting):
            yield item

    async def deliver(self, call_id: str, connection_id: str, event: InboundEvent) -> Delivery:
        return await (await self._ensure_host()).deliver(call_id, connection_id, event)

    async def detach(self, call_id: str, connection_id: str) -> None:
        await (await self._ensure_host()).detach(call_id, connection_id)

    async def command(self, call_id: str, command: CallCommand) -> bool:
        return await (await self._ensure_host()).command(call_id, command)

    async def webhook(self, event: Event) -> None:
        await (await self._ensure_host()).webhook(event)

    async def pid(self) -> int:
        return os.getpid()
