"""The live calls view behind the operator's page (``/ui``): calls as they happen.

A :class:`LiveCalls` is a small projection of the call events: the calls talking now (agent,
where they live, how long, their turns with per-turn latency, holding phrases, cache hits,
tools, transfers, escalations), the recently ended ones, and the latest first-sentence
latencies for a chart. It follows every event a replica can see (its own calls' events with
in-process events; the whole Redis stream in the event-driven architecture), but only while
someone looks: a page's first load replays the last ``HISTORY`` events and follows from there,
and ``idle_s`` after the last page closed it stops, so an unwatched replica does not parse
every call's events. It hands each open page a batch of what changed every ``interval_s``, so
the cost of an open page does not grow with the event rate. Everything it keeps is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any, AsyncIterator

from cachetools import LRUCache

from callray.events import CallEnded, CallStarted, CallSuperseded, CallTurn, EscalationPerformed, EscalationRequested, Event
from callray.events.bus import EventBus

MAX_CALLS = 2000  # live calls shown (the least recently active are dropped beyond)
MAX_TURNS = 50  # turns shown per call (the newest)
MAX_ENDED = 100  # recently ended calls shown
MAX_LATENCIES = 500  # points of the latency chart
MAX_PAGES = 50  # pages open at once; a page that does not keep up is dropped
KEEPALIVE_S = 15.0
HISTORY = 2000  # events replayed when a page starts the view (its calls, ended calls and chart)
CATCH_UP_S = 2.0  # a page's first load waits at most this long for that replay
LOADING_S = 10.0  # after a snapshot, what changes is kept this long for the page's stream to take

log = logging.getLogger("callray.live")


class LiveCalls:
    """The view (see the module docstring). Not thread-safe: one event loop."""

    def __init__(self, source: EventBus | None = None, interval_s: float = 0.25, idle_s: float = 60.0):
        self.source, self.interval_s, self.idle_s = source, interval_s, idle_s
        self.calls: LRUCache[str, dict[str, Any]] = LRUCache(MAX_CALLS)
        self.ended: deque[dict[str, Any]] = deque(maxlen=MAX_ENDED)
        self.latencies: deque[dict[str, Any]] = deque(maxlen=MAX_LATENCIES)
        # What changed since the last batch: kept only while a page listens (a page's first load
        # is the snapshot), and bounded like what it refers to.
        self._changed: set[str] = set()
        self._new_ended: deque[dict[str, Any]] = deque(maxlen=MAX_ENDED)
        self._new_latencies: deque[dict[str, Any]] = deque(maxlen=MAX_LATENCIES)
        self._pages: set[asyncio.Queue[dict[str, Any]]] = set()
        self._loading_until = 0.0  # a page took its snapshot and has not opened its stream yet
        self._wake = asyncio.Event()
        self._publisher: asyncio.Task | None = None
        self._follower: asyncio.Task | None = None
        self._caught_up = asyncio.Event()
        self._watched_at = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ following the events

    @property
    def following(self) -> bool:
        """Whether the view reads the events now (someone looked within ``idle_s``)."""
        return self._follower is not None and not self._follower.done()

    async def watch(self) -> None:
        """Someone looks: follow the events (from the last ``HISTORY`` when not following yet)
        and wait, up to ``CATCH_UP_S``, until those are in the view."""
        self._watched_at = time.monotonic()
        if self.source is None:
            return
        if not self.following:
            self._caught_up = asyncio.Event()
            self._follower = asyncio.get_running_loop().create_task(self._follow())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CATCH_UP_S):
                await self._caught_up.wait()

    async def _follow(self) -> None:
        assert self.source is not None
        self._stop_after(self.idle_s)
        try:
            try:
                history, position = await self.source.recent(HISTORY)
            except Exception as exc:  # the view shows what comes from now on
                log.warning("live view: recent events unavailable (%r); following from now", exc)
                history, position = [], None
            self._forget()  # what it showed before it stopped is stale
            for event in history:
                self.handle(event)
            self._caught_up.set()
            async with contextlib.aclosing(self.source.tail(position)) as events:
                async for event in events:
                    self.handle(event)
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._caught_up.set()

    def _stop_after(self, delay: float) -> None:
        self._idle_timer = asyncio.get_running_loop().call_later(delay, self._stop_when_idle)

    def _stop_when_idle(self) -> None:
        idle = time.monotonic() - self._watched_at
        if self._pages or idle < self.idle_s:
            self._stop_after(self.idle_s if self._pages else self.idle_s - idle)
        elif self._follower is not None:
            self._follower.cancel()

    def _forget(self) -> None:
        self.calls.clear()
        self.ended.clear()
        self.latencies.clear()

    async def close(self) -> None:
        for task in (self._follower, self._publisher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # ------------------------------------------------------------------ events

    def handle(self, event: Event) -> None:
        if isinstance(event, CallEnded):
            self._end(event)
            return
        call = self._call(event)
        if isinstance(event, CallStarted):
            call["reconnects"] += event.reconnect
        elif isinstance(event, CallTurn):
            turn = {"response_id": event.response_id, "kind": event.kind, "caller": event.caller_text,
                    "agent": event.agent_text, "first_sentence_ms": event.first_sentence_ms,
                    "complete_ms": event.complete_ms, "holding": event.budget_miss, "cache_hit": event.cache_hit,
                    "fallback": event.fallback, "tools": list(event.tools), "action": event.action, "ts": event.ts}
            call["turns"].append(turn)
            del call["turns"][:-MAX_TURNS]
            call["turn_count"] += 1
            call["cache_hits"] += event.cache_hit
            call["holding"] += event.budget_miss
            call["tokens"] += event.prompt_tokens + event.completion_tokens
            call["agent_errors"] += event.agent_error is not None
            call["tools"] = sorted(set(call["tools"]) | set(event.tools))
            if event.action == "Transfer":
                call["transferred"] = True
            if event.first_sentence_ms is not None:
                point = {"ts": event.ts, "first_sentence_ms": event.first_sentence_ms, "call_id": event.call_id}
                self.latencies.append(point)
                if self._recording:
                    self._new_latencies.append(point)
        elif isinstance(event, CallSuperseded):
            call["superseded"] += 1
        elif isinstance(event, (EscalationRequested, EscalationPerformed)):
            call["escalation"] = {"rule": event.rule, "performed": isinstance(event, EscalationPerformed)
                                  or bool((call.get("escalation") or {}).get("performed"))}
        self._touch(event.call_id)

    def _call(self, event: Event) -> dict[str, Any]:
        call = self.calls.get(event.call_id)
        if call is None:
            call = self.calls[event.call_id] = {
                "call_id": event.call_id, "agent": event.agent, "host": event.host, "started_at": event.ts,
                "last_at": event.ts, "turns": [], "turn_count": 0, "superseded": 0, "reconnects": 0, "cache_hits": 0,
                "holding": 0, "tools": [], "transferred": False, "escalation": None, "tokens": 0, "agent_errors": 0}
        call["last_at"] = max(call["last_at"], event.ts)
        call["host"] = event.host or call["host"]
        call["agent"] = event.agent or call["agent"]
        call["started_at"] = min(call["started_at"], event.ts)
        return call

    def _end(self, event: CallEnded) -> None:
        call = self.calls.pop(event.call_id, None) or {"call_id": event.call_id, "agent": event.agent,
                                                       "host": event.host, "started_at": event.ts, "turn_count": 0}
        if any(e["call_id"] == event.call_id for e in self.ended):
            return  # Retell's webhook after our own hang-up: ended once
        ended = {k: call.get(k) for k in ("call_id", "agent", "host", "started_at", "turn_count", "transferred",
                                          "escalation", "tokens")}
        ended.update(ended_at=event.ts, reason=event.reason or str(event.call.get("disconnection_reason") or ""))
        self.ended.appendleft(ended)
        if self._recording:
            self._new_ended.append(ended)
        self._touch(event.call_id)

    @property
    def _recording(self) -> bool:
        """Whether changes are kept for pages: while one listens, or is about to (it has its
        snapshot and opens its stream next; what changes in between must reach it)."""
        return bool(self._pages) or time.monotonic() < self._loading_until

    def _touch(self, call_id: str) -> None:
        if self._recording:  # the publisher takes it every interval_s
            self._changed.add(call_id)
            self._wake.set()

    # ------------------------------------------------------------------ pages

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, at once (its first load); what changes after it is kept
        for ``LOADING_S`` so that the page's stream, opened next, starts from here."""
        if not self._pages:  # nobody else waits for changes: those before this snapshot are in it
            self._changed.clear()
            self._new_ended.clear()
            self._new_latencies.clear()
        self._loading_until = time.monotonic() + LOADING_S
        return {"now": time.time(), "calls": list(self.calls.values()), "ended": list(self.ended),
                "latencies": list(self.latencies)}

    async def updates(self) -> AsyncIterator[dict[str, Any]]:
        """What changed, one batch per ``interval_s`` at most, for as long as the page listens."""
        if len(self._pages) >= MAX_PAGES:
            raise RuntimeError(f"{MAX_PAGES} pages are open already")
        await self.watch()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=20)
        self._pages.add(queue)
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(self._publish())
        try:
            while True:
                batch = await queue.get()
                yield batch
                if batch.get("reload"):
                    return
        finally:
            self._pages.discard(queue)
            self._watched_at = time.monotonic()  # idle from the last page's close

    async def _publish(self) -> None:
        while self._pages:
            try:  # a quiet page still hears from the server, so proxies keep its stream open
                await asyncio.wait_for(self._wake.wait(), KEEPALIVE_S)
            except TimeoutError:
                for page in list(self._pages):
                    if not page.full():
                        page.put_nowait({"now": time.time(), "keepalive": True})
                continue
            self._wake.clear()
            changed, self._changed = self._changed, set()
            batch = {"now": time.time(),
                     "calls": [self.calls[c] for c in changed if c in self.calls],
                     "gone": [c for c in changed if c not in self.calls],
                     "ended": list(self._new_ended), "latencies": list(self._new_latencies)}
            self._new_ended.clear()
            self._new_latencies.clear()
            for page in list(self._pages):
                if page.full():  # it stopped reading: free what it holds, tell it to reload
                    while not page.empty():
                        page.get_nowait()
                    page.put_nowait({"reload": True})
                    self._pages.discard(page)
                else:
                    page.put_nowait(batch)
            await asyncio.sleep(self.interval_s)
