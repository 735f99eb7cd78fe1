"""Placement: which ``CallHost`` actor serves a call.

* ``shared`` (the default): K long-lived hosts, each hosting many calls as virtual actors;
  every gateway replica finds a call's host by rendezvous hashing, with no lookup.
* ``dedicated``: one actor per call, for users who need process isolation. A ``DedicatedPool``
  actor keeps a few actors started (an actor takes 0.2-2 s to start, far over a call-setup
  budget), hands one to each new call, and kills it when the call is deactivated.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import ray

from actors.call_host import CallHost
from callray.placement import host_names, place
from callray.settings import CallraySettings

log = logging.getLogger("callray.placement")


def _host_options(settings: CallraySettings, name: str) -> dict[str, Any]:
    return dict(name=name, namespace=settings.hosts.namespace, lifetime="detached", get_if_exists=True,
                max_concurrency=settings.hosts.max_concurrency)


class SharedHosts:
    """K named hosts, found by rendezvous hashing of the call_id."""

    def __init__(self, app_name: str, settings: CallraySettings):
        self.settings = settings
        self.names = host_names(app_name, settings.hosts.count)
        self._raw = settings.model_dump(mode="json")
        self._handles: dict[str, Any] = {}

    def _handle(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            handle = CallHost.options(**_host_options(self.settings, name)).remote(self._raw, name)
            self._handles[name] = handle
        return handle

    async def owner(self, call_id: str) -> Any:
        return self._handle(place(call_id, self.names))

    async def owner_by_name(self, name: str) -> Any:
        return self._handle(name)

    def forget(self, call_id: str) -> None:
        """Nothing to forget: the owner is computed, not remembered."""

    async def start(self) -> None:
        """Create (or find) every host, hand it the current settings, wait until it is ready."""
        handles = [self._handle(name) for name in self.names]
        await asyncio.gather(*(h.configure.remote(self._raw) for h in handles))
        await asyncio.gather(*(h.ready.remote() for h in handles))


@ray.remote(num_cpus=0, max_restarts=-1)
class DedicatedPool:
    """Warm actors for dedicated placement, and which call owns which actor."""

    def __init__(self, settings: dict[str, Any], app_name: str):
        self.settings = CallraySettings.parse(settings)
        self._raw, self.app_name = settings, app_name
        self.idle: list[tuple[str, Any]] = []
        self.assigned: dict[str, tuple[str, Any]] = {}
        self._refilling: asyncio.Task | None = None
        self.started = 0

    async def _start_one(self) -> tuple[str, Any]:
        name = f"{self.app_name}-call-{uuid.uuid4().hex[:12]}"
        handle = CallHost.options(**_host_options(self.settings, name)).remote(self._raw, name, f"{self.app_name}-pool")
        await handle.ready.remote()
        self.started += 1
        return name, handle

    async def _refill(self) -> None:
        while len(self.idle) < self.settings.hosts.warm_pool:
            self.idle.append(await self._start_one())

    def _refill_soon(self) -> None:
        if self._refilling is None or self._refilling.done():
            self._refilling = asyncio.create_task(self._refill())

    async def fill(self) -> int:
        """Start the warm actors (called by each gateway at start); returns the idle count."""
        self._refill_soon()
        await self._refilling
        return len(self.idle)

    async def acquire(self, call_id: str) -> Any:
        """The call's own actor: already assigned, else a warm one (else a new one)."""
        if call_id not in self.assigned:
            self.assigned[call_id] = self.idle.pop(0) if self.idle else await self._start_one()
            self._refill_soon()
        return self.assigned[call_id][1]

    async def release(self, call_id: str) -> bool:
        """The call was deactivated: its actor goes away (a fresh one replaces it in the pool)."""
        entry = self.assigned.pop(call_id, None)
        if entry is None:
            return False
        ray.kill(entry[1], no_restart=True)
        return True

    async def stats(self) -> dict[str, int]:
        return {"idle": len(self.idle), "assigned": len(self.assigned), "started": self.started}


class DedicatedHosts:
    """Gateway side of dedicated placement: asks the pool once per call, then remembers."""

    def __init__(self, app_name: str, settings: CallraySettings):
        self.settings = settings
        self.pool = DedicatedPool.options(
            name=f"{app_name}-pool", namespace=settings.hosts.namespace, lifetime="detached", get_if_exists=True,
        ).remote(settings.model_dump(mode="json"), app_name)
        self._owners: dict[str, Any] = {}

    async def owner(self, call_id: str) -> Any:
        handle = self._owners.get(call_id)
        if handle is None:
            handle = self._owners[call_id] = await self.pool.acquire.remote(call_id)
        return handle

    def forget(self, call_id: str) -> None:
        self._owners.pop(call_id, None)

    async def start(self) -> None:
        await self.pool.fill.remote()


def host_directory(app_name: str, settings: CallraySettings) -> SharedHosts | DedicatedHosts:
    return (DedicatedHosts if settings.hosts.placement == "dedicated" else SharedHosts)(app_name, settings)
