"""Micro-benchmarks of the plain library on a real Redis (no Ray, no sockets).

They isolate costs the end-to-end suite cannot separate:

* **checkpoint**: time of one call's state save per turn, memory vs Redis, with 100 calls
  turning concurrently (the save runs after the completing frame, off the caller's path);
* **cache hit**: server time from a request to its first frame when the answer comes from the
  response cache (memory and Redis), against the flow agent answering itself;
* **event emit**: time a turn spends handing one event to the bus (a buffer append);
* **bus throughput**: events per second from ``XADD`` through a consumer group into analytics.

Usage: ``python bench/micro.py [--calls 100] [--turns 10] [--events 20000] [--json out.json]``.
Prints p50/p99 per measure and the ratios to the in-memory baseline of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from rich.console import Console
from rich.table import Table

from callray.agents.registry import load_agent
from callray.bench import Processes
from callray.bus import RedisStreamBus, consume
from callray.consumers.analytics import Analytics
from callray.conversation import Conversation
from callray.events import CallTurn
from callray.protocol import parse_event
from callray.settings import PROJECT_DIR, TurnSettings
from callray.stores.base import CallState
from callray.stores.memory import MemoryResponseCache, MemoryStateStore
from callray.stores.redis import RedisResponseCache, RedisStateStore

QUESTIONS = ["What are your opening hours?", "Where can I park?", "Do you take insurance?", "Where are you located?"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(pct(values, 0.5), 3), "p99": round(pct(values, 0.99), 3),
            "mean": round(statistics.fmean(values), 3)}


class TimedStore:
    """Wraps a state store and records how long each save takes (ms)."""

    def __init__(self, inner: Any):
        self.inner, self.save_ms = inner, []

    async def load(self, call_id: str) -> Any:
        return await self.inner.load(call_id)

    async def save(self, state: CallState) -> int:
        start = time.perf_counter()
        try:
            return await self.inner.save(state)
        finally:
            self.save_ms.append((time.perf_counter() - start) * 1000)

    async def delete(self, call_id: str) -> None:
        await self.inner.delete(call_id)

    async def close(self) -> None:
        await self.inner.close()




async def run_calls(store: Any, cache: Any, calls: int, turns: int, tag: str) -> list[float]:
    """``calls`` conversations answering ``turns`` questions concurrently; returns first-frame ms."""
    agent = load_agent(PROJECT_DIR / "config/agents/clinic.yaml")
    settings = TurnSettings()
    first_frames: list[float] = []

    async def one(index: int) -> None:
        conversation = Conversation(CallState(call_id=f"{tag}-{index}"), agent, store=store, settings=settings,
                                    cache=cache)
        outbox = await conversation.attach("socket")
        await outbox._queue.get()  # response 0
        rng = random.Random(index)
        for turn in range(1, turns + 1):
            await asyncio.sleep(rng.uniform(0, 0.2))  # callers do not all speak in the same millisecond
            question = QUESTIONS[(index + turn) % len(QUESTIONS)]
            event = parse_event({"interaction_type": "response_required", "response_id": turn,
                                 "transcript": [{"role": "user", "content": question}]})
            start = time.perf_counter()
            conversation.handle(event)
            await outbox._queue.get()
            first_frames.append((time.perf_counter() - start) * 1000)
            while conversation._request is not None:  # wait for completion
                await outbox._queue.get()
            while not outbox._queue.empty():
                outbox._queue.get_nowait()
        await conversation.deactivate()

    await asyncio.gather(*(one(i) for i in range(calls)))
    return first_frames


async def time_many(n: int, action: Callable[[int], Awaitable[None] | None]) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        result = action(i)
        if result is not None:
            await result
        out.append((time.perf_counter() - start) * 1000)
    return out


async def bus_throughput(url: str, events: int) -> dict[str, Any]:
    bus = await RedisStreamBus.connect(url, stream=f"micro:{time.time_ns()}", buffer_size=events + 10)
    emit_ms = await time_many(events, lambda i: bus.emit(CallTurn(call_id=f"c{i % 500}", seq=i + 1, response_id=i,
                                                                  first_chunk_ms=5.0)))
    await bus.flush()
    analytics, stop = Analytics(), asyncio.Event()
    start = time.perf_counter()
    task = asyncio.create_task(consume(bus, "analytics", "micro", analytics.handle, stop=stop, batch=500))
    while analytics.snapshot()["overall"]["turns"] < events:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    stop.set()
    await task
    await bus.close()
    return {"emit_ms": summary(emit_ms), "events": events, "consume_s": round(elapsed, 3),
            "events_per_s": round(events / elapsed)}


async def main_async(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    procs = Processes(Path(tempfile.mkdtemp(prefix="callray-micro-")))
    try:
        url = procs.start_redis(Path(tempfile.mkdtemp(prefix="callray-micro-redis-")))
        results: dict[str, Any] = {"calls": args.calls, "turns": args.turns}
        console.log(f"checkpoint: {args.calls} calls x {args.turns} turns, memory then Redis")
        memory_store = TimedStore(MemoryStateStore())
        memory_first = await run_calls(memory_store, None, args.calls, args.turns, "mem")
        redis_store = TimedStore(await RedisStateStore.connect(url))
        await run_calls(redis_store, None, args.calls, 1, "warm")  # open the pool, load the save script
        redis_store.save_ms.clear()
        redis_first = await run_calls(redis_store, None, args.calls, args.turns, "redis")
        results["checkpoint_ms"] = {"memory": summary(memory_store.save_ms), "redis": summary(redis_store.save_ms)}
        results["first_frame_ms_no_cache"] = {"memory": summary(memory_first), "redis": summary(redis_first)}

        console.log("cache hits: the same questions, answers from the cache")
        for name, cache in (("memory", MemoryResponseCache()), ("redis", await RedisResponseCache.connect(url))):
            await run_calls(MemoryStateStore(), cache, 4, 2, f"warm-{name}")  # fill the cache
            results.setdefault("first_frame_ms_cache", {})[name] = summary(
                await run_calls(MemoryStateStore(), cache, args.calls, args.turns, f"hit-{name}"))
            results.setdefault("cache_stats", {})[name] = cache.stats()
            await cache.close()
        await redis_store.close()

        console.log(f"bus: {args.events} events emitted, then consumed into analytics")
        results["bus"] = await bus_throughput(url, args.events)
        return results
    finally:
        procs.stop_all()


def print_results(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"callray micro-benchmarks ({results['calls']} concurrent calls x {results['turns']} turns)")
    for column in ("measure", "p50 ms", "p99 ms", "vs memory (p99)"):
        table.add_column(column)

    def row(label: str, stats: dict[str, float], base: dict[str, float] | None = None) -> None:
        ratio = f"{stats['p99'] / base['p99']:.2f}x" if base and base["p99"] else ""
        table.add_row(label, f"{stats['p50']:.3f}", f"{stats['p99']:.3f}", ratio)

    row("checkpoint save, memory", results["checkpoint_ms"]["memory"])
    row("checkpoint save, Redis", results["checkpoint_ms"]["redis"], results["checkpoint_ms"]["memory"])
    row("first frame, agent answers (memory state)", results["first_frame_ms_no_cache"]["memory"])
    row("first frame, agent answers (Redis state)", results["first_frame_ms_no_cache"]["redis"],
        results["first_frame_ms_no_cache"]["memory"])
    row("first frame, cache hit (memory cache)", results["first_frame_ms_cache"]["memory"])
    row("first frame, cache hit (Redis cache)", results["first_frame_ms_cache"]["redis"],
        results["first_frame_ms_cache"]["memory"])
    row("event emit (bus buffer append)", results["bus"]["emit_ms"])
    console.print(table)
    console.print(f"bus throughput: {results['bus']['events_per_s']} events/s into analytics "
                  f"({results['bus']['events']} events in {results['bus']['consume_s']} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    console = Console()
    results = asyncio.run(main_async(args, console))
    print_results(results, console)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
