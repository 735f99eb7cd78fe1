"""``EventConsumer``: one background actor per consumer kind on the Redis Streams bus.

Each kind (analytics, archive, escalation) is its own consumer group, so each sees every
event; the actor's name is its consumer name, stable across Ray's restarts, so a restarted
consumer first re-reads what it had taken but not acknowledged. The analytics actor also
exports its figures as Prometheus metrics through Ray's metrics API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import ray
from ray.util import metrics

from actors.metrics import LATENCY_BOUNDARIES_MS
from callray.consumers.runner import build_consumers, close_consumers, run_consumers
from callray.directory import CallDirectory
from callray.settings import CallraySettings
from callray.stores.factory import build_bus, open_redis
from callray.stores.redis import RedisStateStore

log = logging.getLogger("callray.actors.consumers")

METRICS_INTERVAL_S = 5.0
#: Consumers run behind the calls: on a busy node the CPU goes to turns first, and the stream
#: holds what the consumers have not read yet. Ray starts its workers, the gateway's among them,
#: at niceness 15. Niceness 19 still left a consumer 15/36 of a replica's share of a contended
#: core, so the consumers that only keep figures and records also take Linux's SCHED_IDLE
#: policy: the CPU no one else wants (weight 3). Escalation acts on live calls: it keeps 19.
CONSUMER_NICENESS = 19
LIVE_KINDS = frozenset({"escalation"})
DURATION_BOUNDARIES_S = [10, 30, 60, 120, 180, 300, 600, 900, 1800, 3600]


def run_behind_calls(kind: str) -> None:
    """Every thread of this process at CONSUMER_NICENESS and, unless ``kind`` acts on live
    calls, under SCHED_IDLE. Linux keeps both per thread, Ray runs an actor's methods on threads
    of its own, and threads started later inherit them. Lowering one's own priority needs no
    privilege; where it is refused (or not Linux) the consumer runs as it was."""
    idle = kind not in LIVE_KINDS and hasattr(os, "sched_setscheduler")
    tasks = "/proc/self/task"
    for tid in os.listdir(tasks) if os.path.isdir(tasks) else [0]:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(tid), CONSUMER_NICENESS)
            if idle:
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class EventConsumer:
    def __init__(self, settings: CallraySettings, app_name: str, kind: str):
        run_behind_calls(kind)
        self.settings = settings
        self.settings.configure_logging()
        self.app_name, self.kind = app_name, kind
        self.name = f"{app_name}-{kind}"
        self._held: tuple[Any, dict[str, Any]] | None = None  # the Redis client and consumers in use
        self._disabled = False
        self._tasks: list[asyncio.Task] = []
        self._gauges: dict[str, metrics.Gauge] = {}
        self._histograms: dict[str, metrics.Histogram] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> str:
        """Connect and start consuming (idempotent)."""
        async with self._lock:
            return await self._start()

    async def _start(self) -> str:
        """Consume unless already consuming. Everything is built aside and kept only once it
        all worked, so a start that fails (Redis down, a replay that breaks) leaves nothing
        half-made, and the next ``start`` (Serve's health check calls it) tries again; so does
        a consume loop that died."""
        if self._disabled:
            return f"{self.name}: disabled by settings"
        if self.consumer is not None and self._tasks and not self._tasks[0].done():
            return self.name
        await self._let_go()
        client, consumers = await open_redis(self.settings.redis), {}
        try:
            bus = build_bus(self.settings, client)
            # Escalation's way to a live call: the directory finds the owner recorded with the call.
            directory = CallDirectory(self.name, store=RedisStateStore(client, ttl_s=self.settings.state.ttl_s),
                                      redis=client)
            consumers = build_consumers(self.settings, [self.kind], command=directory.send, emit=bus.emit,
                                        redis=client)
            consumer = consumers.get(self.kind)
            if consumer is None:
                self._disabled = True
                await client.aclose()
                return f"{self.name}: disabled by settings"
            if self.kind == "analytics":  # a projection of the stream: rebuild it, duplicates are dropped
                async for event in bus.replay():
                    await consumer.handle(event)
                consumer.observe = self._observe  # from now on: the replay is not observed again
        except BaseException:
            await close_consumers(consumers)
            await client.aclose()
            raise
        self._held = (client, consumers)
        self._tasks.append(asyncio.create_task(run_consumers(bus, consumers, self.name, asyncio.Event())))
        self._tasks.append(asyncio.create_task(self._export_lag(bus)))
        if self.kind in ("analytics", "archive"):
            self._tasks.append(asyncio.create_task(self._export_metrics()))
        return self.name

    @property
    def consumer(self) -> Any:
        """This actor's consumer while it consumes, else None."""
        return self._held[1][self.kind] if self._held is not None else None

    async def _let_go(self) -> None:
        """Stop a consume loop that died and close what it held (its Redis client, the archive's
        database pool), so that each restart of the loop does not leave connections behind."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._held is not None:
            client, consumers = self._held
            self._held = None
            await close_consumers(consumers)
            await client.aclose()

    async def _export_lag(self, bus: Any) -> None:
        """How many stream entries this consumer group has not read yet (Redis 7 XINFO lag)."""
        gauge = metrics.Gauge("callray_bus_lag", "Events not yet read by a consumer group.", tag_keys=("group",))
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            try:
                for group in await bus.client.xinfo_groups(bus.stream):
                    if group.get("name") in (self.kind, self.kind.encode()) and group.get("lag") is not None:
                        gauge.set(float(group["lag"]), tags={"group": self.kind})
            except Exception as exc:  # metrics must never stop a consumer
                log.warning("%s: reading the bus lag failed: %r", self.name, exc)

    def _observe(self, histogram: str, agent: str, value: float) -> None:
        """One latency sample into its Ray histogram (``ray_callray_analytics_<name>_bucket``)."""
        if histogram not in self._histograms:
            seconds = histogram.endswith("_seconds")
            self._histograms[histogram] = metrics.Histogram(
                f"callray_analytics_{histogram}", description=f"callray analytics: {histogram}, per agent",
                boundaries=DURATION_BOUNDARIES_S if seconds else LATENCY_BOUNDARIES_MS, tag_keys=("agent",))
        self._histograms[histogram].observe(value, tags={"agent": agent})

    async def _export_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            for sample, labels, value in self.consumer.prometheus_samples():
                name = ("callray_analytics_" + sample.removeprefix("callray_")  # apart from the hosts' own metrics
                        if self.kind == "analytics" else sample)
                gauge = self._gauges.get(name)
                if gauge is None:
                    gauge = self._gauges[name] = metrics.Gauge(name, description=f"callray analytics: {name}",
                                                               tag_keys=tuple(sorted(labels)))
                gauge.set(value, tags=labels)

    async def snapshot(self) -> dict[str, Any] | None:
        await self.start()
        return self.consumer.snapshot() if self.kind == "analytics" and self.consumer else None

    async def archived(self, call_id: str) -> dict[str, Any] | None:
        return await self._archive("get", call_id)

    async def export(self, since: float | None, after: str, limit: int) -> dict[str, Any] | None:
        return await self._archive("export", since, after, limit)

    async def calls_of(self, callers: list[str]) -> list[str]:
        return await self._archive("calls_of", callers) or []

    async def erase_record(self, call_id: str) -> bool:
        return bool(await self._archive("erase", call_id))

    async def _archive(self, method: str, *args: Any) -> Any:
        """The archive consumer's ``method`` (None in the other consumers or with no archive)."""
        await self.start()
        if self.kind != "archive" or self.consumer is None:
            return None
        return await getattr(self.consumer, method)(*args)


def start_consumers(app_name: str, settings: CallraySettings) -> dict[str, Any]:
    """Create (or find) the consumer actors of an event-driven deployment."""
    handles = {}
    for kind in ("analytics", "archive", "escalation"):
        handles[kind] = EventConsumer.options(
            name=f"{app_name}-{kind}", namespace=settings.hosts.namespace, lifetime="detached", get_if_exists=True,
        ).remote(settings, app_name, kind)
    return handles
