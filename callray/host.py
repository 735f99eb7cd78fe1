"""A host of calls as virtual actors (Orleans-style), with no Ray in it.

A call is *activated* on its first message (its state loaded from the store, or created),
lives in memory while it talks, and is *deactivated* (saved and dropped) when it ends or idles.
The mailbox is the event loop itself: ``Conversation.handle`` never awaits, so one call's
events apply one at a time in arrival order while other calls proceed independently; the only
long work, a generation, runs as the call's single tracked task.

``actors/call_host.py`` puts one ``Host`` in each ``CallHost`` Ray actor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from callray.agents.registry import AgentRegistry
from callray.agents.base import EndCall, PressDigit, Speech, ToolCall, Transfer, Turn
from callray.conversation import Conversation, Outbox, shareable
from callray.events import CallEnded, Event
from callray.protocol import ProtocolError, parse_frame
from callray.settings import CallraySettings
from callray.stores.base import CallState, EventSink, ResponseCache, StateStore

log = logging.getLogger("callray.host")

STREAM_CLOSED = "closed:"  # prefix of the last item of an outbound stream: "closed:<reason>"


class Host:
    """Activation, delivery, commands and deactivation for the calls placed on one host."""

    def __init__(self, settings: CallraySettings, agents: AgentRegistry, *, store: StateStore,
                 cache: ResponseCache | None = None, events: EventSink | None = None, name: str = "host",
                 on_deactivate: Callable[[str], Awaitable[None]] | None = None):
        self.settings, self.agents, self.name = settings, agents, name
        self.on_deactivate = on_deactivate
        self.store, self.cache, self.events = store, cache, events
        self.calls: dict[str, Conversation] = {}
        self._activating: dict[str, asyncio.Future[Conversation]] = {}
        self.counters = {"activations": 0, "deactivations": 0, "dropped_events": 0, "invalid_frames": 0}

    # ------------------------------------------------------------------ activation

    async def activate(self, call_id: str, agent_name: str | None = None) -> Conversation:
        """The live conversation of ``call_id``, loading or creating it on first use."""
        live = self.calls.get(call_id)
        if live is not None:
            return live
        pending = self._activating.get(call_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Conversation] = asyncio.get_running_loop().create_future()
        self._activating[call_id] = future
        try:
            state = await self.store.load(call_id)
            if state is None:
                state = CallState(call_id=call_id, agent=agent_name or self.agents.default_name)
            agent = self.agents.get(state.agent or agent_name or self.agents.default_name)
            conversation = Conversation(state, agent, store=self.store, settings=self.settings.turns,
                                        cache=self.cache if self.settings.cache.enabled else None,
                                        events=self.events, route_agent=self.agents.route)
            self.calls[call_id] = conversation
            self.counters["activations"] += 1
            future.set_result(conversation)
            return conversation
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._activating[call_id]

    async def deactivate(self, call_id: str) -> bool:
        """Save and drop a call from memory (its next message re-activates it)."""
        conversation = self.calls.pop(call_id, None)
        if conversation is None:
            return False
        if conversation.ended and not conversation.state.ended:  # the agent hung up
            conversation.end("agent_hangup")
        await conversation.deactivate()
        self.counters["deactivations"] += 1
        if self.on_deactivate is not None:
            await self.on_deactivate(call_id)
        return True

    # ------------------------------------------------------------------ the gateway's entries

    async def attach(self, call_id: str, connection_id: str, agent_name: str | None = None,
                     resume: bool = False) -> Outbox:
        conversation = await self.activate(call_id, agent_name)
        return await conversation.attach(connection_id, resume=resume)

    async def stream(self, call_id: str, connection_id: str, agent_name: str | None = None,
                     resume: bool = False) -> AsyncIterator[list[str] | str]:
        """Attach, then yield the socket's outbound frames in batches.

        The first item acknowledges the attachment (it may be ``[]``: a resumed socket, or a
        greeting waiting for call_details, which the gateway may only forward once attached);
        the last is ``"closed:<reason>"`` when the call closed the stream (a newer socket,
        deactivation).
        """
        outbox = await self.attach(call_id, connection_id, agent_name, resume)
        yield outbox.drain()
        async for batch in outbox.batches():
            yield batch
        yield STREAM_CLOSED + (outbox.close_reason or "")

    async def deliver(self, call_id: str, connection_id: str, frame: str) -> str:
        """Apply one frame from Retell (validated here, so the gateway only decodes JSON).
        Returns "ok" (also for a frame skipped as invalid), or "superseded" / "detached" when
        this socket no longer owns the call (the event is dropped: the newest socket wins)."""
        event = parse_frame(frame)
        if isinstance(event, ProtocolError):
            self.counters["invalid_frames"] += 1
            log.warning("call %s: skipped bad frame: %s", call_id, event, extra={"call_id": call_id})
            return "ok"
        conversation = await self.activate(call_id)
        outbox = conversation.outbox
        if outbox is None or outbox.connection_id != connection_id:
            self.counters["dropped_events"] += 1
            return "superseded" if outbox is not None else "detached"
        conversation.handle(event)
        return "ok"

    async def detach(self, call_id: str, connection_id: str) -> None:
        conversation = self.calls.get(call_id)
        if conversation is None or not conversation.detach(connection_id):
            return
        if conversation.ended:
            await self.deactivate(call_id)

    # ------------------------------------------------------------------ background actors' entries

    async def command(self, call_id: str, command: dict[str, Any]) -> bool:
        """Act on a live call for a background actor: ``{"type": "transfer", "number",
        "line"}``, ``{"type": "say", "line"}`` or ``{"type": "end_call", "line"}``. False when
        the call has no live socket here."""
        kind = command.get("type")
        conversation = self.calls.get(call_id)
        if conversation is None:
            return False
        line = str(command.get("line") or "")
        if kind == "transfer":
            return conversation.interrupt(line, transfer_number=str(command["number"]))
        if kind == "end_call":
            return conversation.interrupt(line, end_call=True)
        if kind == "say":
            return conversation.interrupt(line)
        raise ValueError(f"unknown command type {kind!r}; expected transfer, end_call or say")

    async def webhook(self, event: Event) -> None:
        """A lifecycle event from Retell's webhook: publish it; ``call.ended`` ends the call."""
        if self.events is not None:
            self.events.emit(event)
        if isinstance(event, CallEnded):
            conversation = self.calls.get(event.call_id)
            if conversation is not None:
                conversation.end(event.reason, event.call, emit=False)
                if not conversation.connected:
                    await self.deactivate(event.call_id)

    # ------------------------------------------------------------------ housekeeping

    async def warm_cache(self) -> int:
        """Answer each agent's ``common_questions`` once and cache what may be shared."""
        if self.cache is None or not self.settings.cache.enabled:
            return 0
        stored = 0
        for agent in self.agents.agents.values():
            for question in getattr(agent, "common_questions", ()):
                turn = Turn(call_id="precache", kind="response", transcript=[{"role": "user", "content": question}],
                            state={})
                key = agent.cache_key(turn)
                if key is None:
                    continue
                phrases, tools, action = [], [], None
                try:
                    async for item in agent.respond(turn):
                        if isinstance(item, Speech):
                            phrases.append(item.text.strip())
                        elif isinstance(item, ToolCall):
                            tools.append(item.name)
                        elif isinstance(item, (EndCall, Transfer, PressDigit)):
                            action = item
                except Exception as exc:  # a warm-up must never stop the host
                    log.warning("%s: pre-caching %r for %s failed: %r", self.name, question, agent.name, exc)
                    continue
                if phrases and shareable(turn, turn.state != {}, tools, action):
                    await self.cache.put(agent.name, agent.version, key, phrases)
                    stored += 1
        return stored

    async def sweep(self, now: float | None = None) -> int:
        """Deactivate calls idle past ``idle_timeout_s`` (or detached past ``detached_timeout_s``)."""
        now = time.monotonic() if now is None else now
        hosts = self.settings.hosts
        idle = [
            call_id for call_id, c in self.calls.items()
            if now - c.last_activity > (hosts.idle_timeout_s if c.connected else hosts.detached_timeout_s)
        ]
        for call_id in idle:
            await self.deactivate(call_id)
        return len(idle)

    async def close(self) -> None:
        for call_id in list(self.calls):
            await self.deactivate(call_id)

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "active_calls": len(self.calls),
            "connected_calls": sum(1 for c in self.calls.values() if c.connected),
            **self.counters,
            "cache": self.cache.stats() if self.cache else {},
        }
