"""The calls of one process: what a gateway replica (``local`` placement) and a ``CallHost``
actor (``dedicated`` placement) each run, built in one place.

A :class:`CallsRuntime` owns the process's stores, a :class:`Host` for the calls activated
here, the :class:`CallDirectory` that routes commands between processes, and its housekeeping:
the command channel, the idle sweep, pre-caching of common answers and, when events stay in
process (single and distributed architectures), the consumers of its own events. Start-up
connects the stores and nothing slower: pre-caching and consumers run in the background, so no
socket ever waits for them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from callray.agents.registry import AgentRegistry
from callray.events.bus import TappedSink
from callray.commands import Ended
from callray.consumers.runner import build_consumers, close_consumers, run_consumers
from callray.directory import CallDirectory
from callray.events import CallEnded, Event
from callray.host import Host, LocalLink
from callray.live import LiveCalls
from callray.settings import CallraySettings
from callray.stores.factory import Stores, build_stores
from callray.stores.memory import MemoryStateStore

log = logging.getLogger("callray.runtime")

SWEEP_INTERVAL_S = 30.0


class CallsRuntime:
    """The calls of one process (see the module docstring)."""

    def __init__(self, settings: CallraySettings, name: str, stores: Stores, host: Host, directory: CallDirectory,
                 consumers: dict[str, Any], live: bool):
        self.settings, self.name, self.stores, self.host, self.directory = settings, name, stores, host, directory
        self.consumers = consumers
        # the live page is a gateway's, and exists only with a read token
        self.live = LiveCalls(stores.events) if live and settings.gateway.read_token else None
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def start(cls, settings: CallraySettings, name: str, *, observe: Any = None,
                    on_deactivate: Callable[[str], Awaitable[None]] | None = None, live: bool = True) -> CallsRuntime:
        """Connect the stores (failing at once, naming the setting, on a bad Redis URL), then
        start the housekeeping. ``observe(event)`` sees every event a call emits (metrics);
        ``on_deactivate(call_id)`` runs after a call leaves memory; ``live`` keeps a live page
        (which reads the events only while someone looks)."""
        stores = await build_stores(settings)
        agents = AgentRegistry.from_settings(settings.agents)
        sink = TappedSink(stores.events, observe) if observe is not None else stores.events
        host = Host(settings, agents, store=stores.state, cache=stores.cache, events=sink, name=name,
                    on_deactivate=on_deactivate)
        directory = CallDirectory(name, host, store=stores.state, redis=stores.redis,
                                  handover_timeout_s=settings.hosts.handover_timeout_s)
        host.on_claimed = directory.notify_superseded
        if stores.redis is not None:  # another process may hold the call: it hands it over first
            host.release_elsewhere = directory.release
        consumers: dict[str, Any] = {}
        if settings.events.backend == "memory":  # in-process consumers, best effort
            consumers = build_consumers(settings, command=directory.send, emit=stores.events.emit)
        runtime = cls(settings, name, stores, host, directory, consumers, live)
        runtime._run(directory.serve(), "command channel")
        runtime._run(runtime._sweep_forever(), "idle sweep")
        runtime._run(host.warm_cache(), "pre-caching")
        if consumers:
            runtime._run(run_consumers(stores.events, consumers, name, asyncio.Event()), "consumers")
        return runtime

    def _run(self, coro: Any, what: str) -> None:
        task = asyncio.create_task(coro, name=f"{self.name}: {what}")
        task.add_done_callback(lambda t: None if t.cancelled() or t.exception() is None else
                               log.error("%s: %s stopped: %r", self.name, what, t.exception()))
        self._tasks.append(task)

    async def _sweep_forever(self) -> None:
        """Deactivate idle calls; drop expired and ended calls from an in-memory store."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.host.sweep()
                if isinstance(self.stores.state, MemoryStateStore):
                    self.stores.state.sweep()
            except Exception:  # housekeeping must outlive one bad call
                log.exception("%s: idle sweep failed", self.name)

    # ------------------------------------------------------------------ the gateway's entries

    def link(self, call_id: str, agent: str | None) -> LocalLink:
        return LocalLink(self.host, call_id, agent)

    async def webhook(self, event: Event) -> None:
        """Publish a webhook's event (raises if the bus cannot take it, so Retell retries), and
        end the live call wherever it is activated."""
        await self.stores.events.publish(event)
        if isinstance(event, CallEnded):
            await self.directory.send(event.call_id, Ended(reason=event.reason, call=event.call))

    async def analytics(self) -> dict[str, Any] | None:
        consumer = self.consumers.get("analytics")
        return consumer.snapshot() if consumer is not None else None

    async def archived(self, call_id: str) -> dict[str, Any] | None:
        archive = self.consumers.get("archive")
        return await archive.get(call_id) if archive is not None else None

    async def export(self, since: float | None, after: str, limit: int) -> dict[str, Any] | None:
        archive = self.consumers.get("archive")
        return await archive.export(since, after, limit) if archive is not None else None

    async def calls_of(self, callers: list[str]) -> list[str]:
        archive = self.consumers.get("archive")
        return await archive.calls_of(callers) if archive is not None else []

    async def erase_record(self, call_id: str) -> bool:
        archive = self.consumers.get("archive")
        return await archive.erase(call_id) if archive is not None else False

    def stats(self) -> dict[str, Any]:
        return {**self.host.stats(), "directory": dict(self.directory.counts)}

    def healthy(self) -> str | None:
        """Why this runtime is unhealthy (a housekeeping task died), or None."""
        dead = [t.get_name() for t in self._tasks if t.done() and not t.cancelled() and t.exception() is not None]
        return f"stopped: {', '.join(dead)}" if dead else None

    async def close(self) -> None:
        """Deactivate every call (saving it), stop the housekeeping and the consumers, close the stores."""
        await self.host.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.live is not None:
            await self.live.close()
        await close_consumers(self.consumers)
        await self.directory.close()
        await self.host.agents.aclose()
        await self.stores.close()
