"""``dedicated`` placement: one ``CallHost`` actor per call, for users who need process isolation.

A ``DedicatedPool`` actor keeps a few actors started (an actor takes 0.2-2 s to start, far over
a call-setup budget), hands one to each new call, and kills it when the call is deactivated.
The socket reaches its call through a :class:`RemoteLink`: two actor hops per event
(``deliver``, and the outbound frame stream back), which ``local`` placement does not pay.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from typing import Any, Awaitable, Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from actors.call_host import CallHost
from callray.outbox import Outbox, StreamEnd
from callray.events import Event
from callray.host import Delivery
from callray.protocol import (AgentInterruptFrame, InboundEvent, OutboundFrame, ReminderRequired, ResponseFrame,
                              ResponseRequired, UpdateOnly)
from callray.settings import CallraySettings, GatewaySettings

log = logging.getLogger("callray.placement")

HOST_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError, RayTaskError)
#: Inbound frames a socket may have waiting for its (restarting) call actor; beyond, it closes (1013).
MAX_PENDING_FRAMES = 256


def _host_options(settings: CallraySettings, name: str) -> dict[str, Any]:
    return dict(name=name, namespace=settings.hosts.namespace, lifetime="detached", get_if_exists=True,
                max_concurrency=settings.hosts.max_concurrency)


class RemoteLink:
    """A socket's link to a call hosted by a Ray actor: a pump for the actor's outbound stream
    (re-attaching with ``resume`` when the actor restarts) and a forwarder of inbound frames,
    in order, each until the actor accepts it."""

    retryable = HOST_ERRORS

    def __init__(self, owner: Callable[[], Awaitable[Any]], call_id: str, agent: str | None,
                 settings: GatewaySettings, forget: Callable[[], None]):
        self.owner, self.call_id, self.agent, self.settings, self.forget = owner, call_id, agent, settings, forget
        self.outbox: Outbox | None = None
        self._inbound: deque[InboundEvent] = deque()
        self._wake = asyncio.Event()
        self._attached = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._open_request: ResponseRequired | ReminderRequired | None = None  # the latest, not yet completed
        self._open_spoken = False  # part of the open request's answer has gone to the socket
        self._newest_request_id = 0
        self._heard_greeting = False  # a response 0 has gone to the socket

    async def attach(self, outbox: Outbox) -> None:
        self.outbox = outbox
        stream = await self._open(resume=False)
        self._tasks = [asyncio.create_task(self._pump(stream)), asyncio.create_task(self._forward())]

    async def _open(self, resume: bool) -> Any:
        """Attach to the owner's stream and forward its first batch (the acknowledgement)."""
        host = await self.owner()
        stream = host.stream.remote(self.call_id, self.outbox.connection_id, self.agent, resume, self._heard_greeting)
        first = await (await stream.__anext__())
        self._put(first)
        if resume and self._open_request is not None:  # its answer died with the host
            if self._open_spoken:  # the caller heard part of it: close it rather than say those words twice
                rid = self._open_request.response_id
                self._open_request = None
                self.outbox.put(ResponseFrame(response_id=rid, content="", content_complete=True))
            else:
                await host.deliver.remote(self.call_id, self.outbox.connection_id, self._open_request)
        self._attached.set()
        return stream

    def _put(self, item: list[OutboundFrame] | StreamEnd) -> None:
        if isinstance(item, StreamEnd):
            self.outbox.close(item)
            return
        for frame in item:
            if self._current(frame):
                self.outbox.put(frame)

    def _current(self, frame: OutboundFrame) -> bool:
        """False for a response to an id older than the newest request Retell sent on this
        socket (after a host restart a re-delivered older request could otherwise still be
        answered). Tracks what the socket has heard: response 0 (a resume before it greets), part
        of the open request (a resume then closes it empty), its completion or an agent_interrupt
        (nothing to redo)."""
        if not isinstance(frame, ResponseFrame):
            if isinstance(frame, AgentInterruptFrame):  # the agent spoke over it: not asked again after a restart
                self._open_request = None
            return True
        if frame.response_id == 0:
            self._heard_greeting = True
        if 0 < frame.response_id < self._newest_request_id:
            return False
        if self._open_request is not None and frame.response_id == self._open_request.response_id:
            if frame.content_complete:
                self._open_request = None
            else:
                self._open_spoken = True
        return True

    async def _pump(self, stream: Any) -> None:
        failing_since = None
        while True:
            try:
                if stream is None:
                    stream = await self._open(resume=True)
                async for ref in stream:
                    self._put(await ref)
                    failing_since = None
                return
            except HOST_ERRORS as exc:
                stream = None
                self._attached.clear()
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.settings.activate_timeout_s:
                    log.error("call %s: host unavailable: %r", self.call_id, exc, extra={"call_id": self.call_id})
                    self.outbox.close(StreamEnd.UNAVAILABLE)
                    return
                log.warning("call %s: host lost (%s); re-attaching", self.call_id, exc.__class__.__name__,
                            extra={"call_id": self.call_id})
                await asyncio.sleep(0.1)

    def deliver(self, event: InboundEvent) -> None:
        if isinstance(event, (ResponseRequired, ReminderRequired)) and event.response_id > 0:
            self._open_request, self._open_spoken = event, False
            self._newest_request_id = max(self._newest_request_id, event.response_id)
        if isinstance(event, UpdateOnly) and self._inbound and isinstance(self._inbound[-1], UpdateOnly):
            self._inbound[-1] = event  # only the newest partial transcript matters
        elif len(self._inbound) >= MAX_PENDING_FRAMES:
            self._inbound.clear()
            self.outbox.close(StreamEnd.OVERFLOW)
            return
        else:
            self._inbound.append(event)
        self._wake.set()

    async def _forward(self) -> None:
        """Deliver frames in order, each until the host accepts it (or the retry window ends)."""
        while True:
            if not self._inbound:
                self._wake.clear()
                await self._wake.wait()
                continue
            event = self._inbound[0]
            failing_since = None
            while True:
                await self._attached.wait()
                try:
                    status = await (await self.owner()).deliver.remote(self.call_id, self.outbox.connection_id, event)
                except HOST_ERRORS as exc:
                    status = exc
                if status is Delivery.OK:
                    break
                if status is Delivery.SUPERSEDED:
                    self.outbox.close(StreamEnd.SUPERSEDED)
                    return
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.settings.activate_timeout_s:
                    self.outbox.close(StreamEnd.UNAVAILABLE)
                    return
                await asyncio.sleep(0.05)  # the pump is re-attaching to the restarted host
            self._inbound.popleft()

    async def detach(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.outbox is not None:
            try:
                (await self.owner()).detach.remote(self.call_id, self.outbox.connection_id)
            except HOST_ERRORS:
                pass
        self.forget()


@ray.remote(num_cpus=0, max_restarts=-1)
class DedicatedPool:
    """Warm actors for dedicated placement, and which call owns which actor."""

    def __init__(self, settings: CallraySettings, app_name: str):
        self.settings, self.app_name = settings, app_name
        self.idle: list[tuple[str, Any]] = []
        self.assigned: dict[str, tuple[str, Any]] = {}
        self._refilling: asyncio.Task | None = None
        self.started = 0

    async def _start_one(self) -> tuple[str, Any]:
        name = f"{self.app_name}-call-{uuid.uuid4().hex[:12]}"
        handle = CallHost.options(**_host_options(self.settings, name)).remote(self.settings, name, f"{self.app_name}-pool")
        await handle.ready.remote()
        self.started += 1
        return name, handle

    async def _refill(self) -> None:
        while len(self.idle) < self.settings.hosts.warm_pool:
            settings = self.settings
            entry = await self._start_one()
            if settings is self.settings:
                self.idle.append(entry)
            else:  # started with settings a redeploy replaced meanwhile
                ray.kill(entry[1], no_restart=True)

    async def configure(self, settings: CallraySettings) -> int:
        """A redeploy: calls from now on get actors with these settings. Warm actors with the
        old ones are ended and replaced; a live call keeps its actor, and so its agent and
        stores, until it ends. Returns how many warm actors were replaced."""
        if settings == self.settings:
            return 0
        self.settings = settings
        stale, self.idle = self.idle, []
        for _, handle in stale:
            ray.kill(handle, no_restart=True)
        self._refill_soon()
        return len(stale)

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

    async def assigned_to(self, call_id: str) -> str | None:
        """The name of the call's actor, if it has one."""
        entry = self.assigned.get(call_id)
        return entry[0] if entry else None

    async def holder(self, call_id: str) -> Any:
        """The call's actor if it has one, else None (never starts or assigns one)."""
        entry = self.assigned.get(call_id)
        return entry[1] if entry else None

    async def stats(self) -> dict[str, int]:
        return {"idle": len(self.idle), "assigned": len(self.assigned), "started": self.started}


class DedicatedPlacement:
    """``dedicated`` placement, gateway side: asks the pool once per call, then remembers."""

    def __init__(self, app_name: str, settings: CallraySettings):
        self.settings = settings
        self.pool = DedicatedPool.options(
            name=f"{app_name}-pool", namespace=settings.hosts.namespace, lifetime="detached", get_if_exists=True,
        ).remote(settings, app_name)
        self._owners: dict[str, Any] = {}
        self._redis_bus: Any = None

    async def owner(self, call_id: str) -> Any:
        handle = self._owners.get(call_id)
        if handle is None:
            handle = self._owners[call_id] = await self.pool.acquire.remote(call_id)
        return handle

    async def start(self) -> None:
        await self.pool.configure.remote(self.settings)  # the pool outlives deploys
        await self.pool.fill.remote()

    def link(self, call_id: str, agent: str | None) -> RemoteLink:
        return RemoteLink(lambda: self.owner(call_id), call_id, agent, self.settings.gateway,
                          lambda: self._owners.pop(call_id, None))

    async def webhook(self, event: Event) -> None:
        """A webhook reaches the call's own actor, which publishes it and ends the call. A call
        with no actor (it ended and was released, or never connected here) gets none: a call
        actor is ~150 MB, and a webhook for any call id must not buy one. Its event then goes to
        the Redis stream when events are durable; with in-process events (best effort) the
        consumers it would have reached lived in that actor, so it is logged and dropped."""
        holder = self._owners.get(event.call_id) or await self.pool.holder.remote(event.call_id)
        if holder is not None:
            await holder.webhook.remote(event)
        elif self.settings.events.backend == "redis_streams":
            await (await self._bus()).publish(event)
        else:
            log.info("call %s: %s for a call with no live actor; events are in-process (best effort): dropped",
                     event.call_id, event.type, extra={"call_id": event.call_id})

    async def _bus(self) -> Any:
        if self._redis_bus is None:
            from callray.stores.factory import build_bus, open_redis

            self._redis_bus = build_bus(self.settings, await open_redis(self.settings.redis))
        return self._redis_bus
