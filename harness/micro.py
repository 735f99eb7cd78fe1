"""Micro-benchmarks of the plain library on a real Redis (no Ray, no sockets).

They isolate costs the end-to-end suite cannot separate:

* **events**: CPU per Retell-shaped event (whole transcripts with word timings, update_only,
  pings, supersedes) through the Host, the conversation and the flow agent, in one process;
* **stream**: CPU per streamed token of four ways to read a chat-completion stream from the
  fake LLM (the SDK as usually called, the SDK over aiohttp, raw SSE lines over httpx and over
  aiohttp: the last is the LLM agent's);

* **checkpoint**: time of one call's state save per turn, memory vs Redis, with 100 calls
  turning concurrently (the save runs after the completing frame, off the caller's path);
* **cache hit**: server time from a request to its first frame when the answer comes from the
  response cache (memory and Redis), against the flow agent answering itself;
* **event emit**: time a turn spends handing one event to the bus (a buffer append);
* **bus throughput**: events per second from ``XADD`` through a consumer group into analytics.

Usage: ``python -m harness.micro [--only events stream ...] [--calls 100] [--turns 10] [--json out.json]``.
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

from callray.agents.llm import stream_delta
from callray.agents.registry import AgentRegistry, load_agent
from callray.events.consume import consume
from callray.events.redis_streams import RedisStreamBus
from callray.consumers.analytics import Analytics
from callray.conversation import Conversation
from callray.outbox import Outbox
from callray.events import CallTurn
from callray.protocol import parse_event
from callray.settings import PROJECT_DIR, TurnSettings
from callray.stores.base import CallState
from callray.stores.memory import MemoryResponseCache, MemoryStateStore
from callray.host import Host
from callray.protocol import PingPong, parse_frame
from callray.settings import CallraySettings
from callray.sim.simulator import DEFAULT_CALLER_LINES, _utterance
from callray.stores.redis import RedisResponseCache, RedisStateStore
from harness.targets import Processes

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
        self.carries_events = inner.carries_events

    async def load(self, call_id: str) -> Any:
        return await self.inner.load(call_id)

    async def save(self, state: CallState, events: list | None = None) -> int:
        start = time.perf_counter()
        try:
            return await self.inner.save(state, events)
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
        outbox = await conversation.attach(Outbox("socket"))
        frames = outbox.frames()
        await anext(frames)  # response 0
        rng = random.Random(index)
        for turn in range(1, turns + 1):
            await asyncio.sleep(rng.uniform(0, 0.2))  # callers do not all speak in the same millisecond
            question = QUESTIONS[(index + turn) % len(QUESTIONS)]
            event = parse_event({"interaction_type": "response_required", "response_id": turn,
                                 "transcript": [{"role": "user", "content": question}]})
            start = time.perf_counter()
            conversation.handle(event)
            frame = await anext(frames)
            first_frames.append((time.perf_counter() - start) * 1000)
            while not frame.content_complete:  # wait for completion (the flow agent sends only responses)
                frame = await anext(frames)
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


# ---------------------------------------------------------------------------------- events


GREETING = "Hi, thanks for calling Maple Street Family Clinic, this is Ava. How can I help you today?"
ANSWER = "Sure, I can help with that. What day works best for you?"


def retell_frames(index: int, turns: int) -> list[str]:
    """One call's frames as Retell sends them: call_details, then per turn an update_only
    mid-utterance, sometimes an early request, the request, a ping; whole transcripts with words."""
    rng = random.Random(index)
    transcript = [_utterance("agent", GREETING, True)]
    frames = [json.dumps({"interaction_type": "call_details", "call": {"call_id": f"c{index}", "agent_id": "a"}})]
    rid = 1
    for _ in range(turns):
        line = rng.choice(DEFAULT_CALLER_LINES).replace("{name}", f"Dana Q{index}quist")
        partial = _utterance("user", " ".join(line.split()[: len(line.split()) // 2]), True)
        frames.append(json.dumps({"interaction_type": "update_only", "transcript": transcript + [partial],
                                  "turntaking": "user_turn"}))
        if rng.random() < 0.1:
            frames.append(json.dumps({"interaction_type": "response_required", "response_id": rid,
                                      "transcript": transcript + [partial]}))
            rid += 1
        transcript = transcript + [_utterance("user", line, True)]
        frames.append(json.dumps({"interaction_type": "response_required", "response_id": rid, "transcript": transcript}))
        frames.append(json.dumps({"interaction_type": "ping_pong", "timestamp": rid}))
        transcript = transcript + [_utterance("agent", ANSWER, True)]
        rid += 1
    return frames


async def library_cpu_per_event(calls: int, turns: int) -> dict[str, Any]:
    """Parse, deliver and answer every frame of ``calls`` calls in one process (memory stores)."""
    settings = CallraySettings()
    host = Host(settings, AgentRegistry.from_settings(settings.agents), store=MemoryStateStore(),
                cache=MemoryResponseCache())
    per_call = [retell_frames(i, turns) for i in range(calls)]
    events = 0
    start = time.process_time()
    for i, frames in enumerate(per_call):
        conversation = await host.attach(f"c{i}", Outbox(f"s{i}"), None)
        for frame in frames:
            event = parse_frame(frame)
            events += 1
            if not isinstance(event, PingPong):
                conversation.handle(event)
            await asyncio.sleep(0)  # let the answer run, as the event loop would between frames
    await asyncio.sleep(0.2)
    cpu = time.process_time() - start
    return {"calls": calls, "events": events, "cpu_ms_per_event": round(cpu * 1000 / events, 3)}


# ---------------------------------------------------------------------------------- stream


STREAM_MESSAGES = [{"role": "user", "content": "Hi, this is Dana, I'd like to book a check-up for next week please."}]


async def _read_sdk(client: Any) -> int:
    tokens = 0
    stream = await client.chat.completions.create(model="m", messages=STREAM_MESSAGES, stream=True)
    async with stream:
        async for chunk in stream:
            tokens += bool(chunk.choices and chunk.choices[0].delta.content)
    return tokens


async def _read_lines(client: Any) -> int:
    tokens = 0
    async with client.chat.completions.with_streaming_response.create(model="m", messages=STREAM_MESSAGES,
                                                                      stream=True) as response:
        async for line in response.iter_lines():
            delta = stream_delta(line)
            tokens += bool(delta and delta.get("content"))
    return tokens


async def stream_cpu_per_token(llm_url: str, streams: int, concurrency: int) -> dict[str, Any]:
    """CPU of this process per streamed token, for each way of reading the fake LLM's stream."""
    import openai

    def client(aiohttp: bool) -> Any:
        extra = {"http_client": openai.DefaultAioHttpClient()} if aiohttp else {}
        return openai.AsyncOpenAI(base_url=llm_url, api_key="micro", max_retries=0, **extra)

    variants = {"SDK chunks over httpx (as usually called)": (False, _read_sdk),
                "SDK chunks over aiohttp": (True, _read_sdk),
                "raw SSE lines over httpx": (False, _read_lines),
                "raw SSE lines over aiohttp (the LLM agent's)": (True, _read_lines)}
    out: dict[str, Any] = {"streams": streams, "concurrency": concurrency}
    for name, (aiohttp, read) in variants.items():
        c = client(aiohttp)
        limit = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with limit:
                return await read(c)

        await asyncio.gather(*(one() for _ in range(10)))  # open the pool
        start = time.process_time()
        tokens = sum(await asyncio.gather(*(one() for _ in range(streams))))
        out[name] = {"tokens": tokens, "cpu_us_per_token": round((time.process_time() - start) * 1e6 / tokens)}
        await c.close()
    return out


async def main_async(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    results: dict[str, Any] = {"calls": args.calls, "turns": args.turns}
    if "events" in args.only:
        console.log(f"library CPU per event: {args.calls} calls x {args.turns} turns of Retell-shaped frames")
        results["events"] = await library_cpu_per_event(args.calls, args.turns)
    if "stream" in args.only:
        procs = Processes(Path(tempfile.mkdtemp(prefix="callray-micro-")))
        try:
            llm = procs.start_fake_llm(0, 400)
            console.log(f"stream: {args.streams} streams from the fake LLM, {args.stream_concurrency} at a time")
            results["stream"] = await stream_cpu_per_token(llm, args.streams, args.stream_concurrency)
        finally:
            procs.close()
    if {"checkpoint", "cache", "bus"} & set(args.only):
        results.update(await store_measures(args, console))
    return results


async def store_measures(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    procs = Processes(Path(tempfile.mkdtemp(prefix="callray-micro-")))
    try:
        url = procs.start_redis(Path(tempfile.mkdtemp(prefix="callray-micro-redis-")))
        results: dict[str, Any] = {}
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
        procs.close()


def print_results(results: dict[str, Any], console: Console) -> None:
    if "events" in results:
        e = results["events"]
        console.print(f"library: {e['cpu_ms_per_event']} ms of CPU per Retell-shaped event "
                      f"({e['events']} events of {e['calls']} calls, answers included)")
    if "stream" in results:
        table = Table(title=f"CPU per streamed token ({results['stream']['streams']} streams from the fake LLM)")
        table.add_column("stream reader")
        table.add_column("µs CPU per token", justify="right")
        for name, figures in results["stream"].items():
            if isinstance(figures, dict):
                table.add_row(name, str(figures["cpu_us_per_token"]))
        console.print(table)
    if "checkpoint_ms" not in results:
        return
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
    parser = argparse.ArgumentParser(prog="python -m harness.micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=["events", "stream", "checkpoint", "cache", "bus"],
                        choices=["events", "stream", "checkpoint", "cache", "bus"], help="measures to run (default: all)")
    parser.add_argument("--streams", type=int, default=300, help="stream: streams read (default: 300)")
    parser.add_argument("--stream-concurrency", type=int, default=100, help="stream: at once (default: 100)")
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
