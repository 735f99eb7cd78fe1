"""A host of calls as virtual actors (Orleans-style), with no Ray in it.

A call is *activated* on its first socket (its state claimed from the store, or created),
lives in memory while it talks, and is *deactivated* (saved and dropped) when it ends or idles.
The mailbox is the event loop itself: ``Conversation.handle`` never awaits, so one call's
events apply one at a time in arrival order while other calls proceed independently; the only
long work, a generation, runs as the call's single tracked task.

Activation claims the call in the state store, which bumps its owner epoch: the newest socket
wins even across processes, because a checkpoint under an older epoch is refused and the older
activation then drops the call without writing (``Conversation.lose``).

With ``local`` placement the gateway replica that holds the socket embeds one ``Host``;
with ``dedicated`` placement ``actors/call_host.py`` puts one in a Ray actor per call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from callray.agents.registry import AgentRegistry
from callray.agents.base import EndCall, PressDigit, Speech, ToolCall, Transfer, Turn
from callray.commands import CallCommand, Ended, HangUp, Release, Say, Superseded, TransferCall
from callray.conversation import Conversation, shareable
from callray.outbox import Outbox, StreamEnd
from callray.events import CallEnded, Event
from callray.protocol import InboundEvent, OutboundFrame
from callray.settings import CallraySettings
from callray.stores.base import CallState, EventSink, ResponseCache, StateStore, StoreUnavailableError
from callray.events.bus import TappedSink

log = logging.getLogger("callray.host")


class Delivery(str, enum.Enum):
    """What became of a frame handed to a remote host (``Host.deliver``)."""

    OK = "ok"  # applied (or skipped as invalid: a bad frame never fails the socket)
    SUPERSEDED = "superseded"  # a newer socket holds the call: this socket must close (4001)
    DETACHED = "detached"  # the call has no socket here any more


#: ``on_claimed(call_id, previous_owner, epoch)``: this host took a call over from another one.
OnClaimed = Callable[[str, str, int], None]


class Host:
    """Activation, delivery, commands and deactivation for the calls placed on one host.

    ``name`` is recorded in the store as the owner of every call activated here. Before it claims
    a call, ``release_elsewhere`` (set with a directory) asks the call's previous owner to save
    it and let it go: a reconnect that lands here while that owner's last checkpoint is in
    flight would otherwise fence that checkpoint off and lose the turn it saves.
    """

    def __init__(self, settings: CallraySettings, agents: AgentRegistry, *, store: StateStore,
                 cache: ResponseCache | None = None, events: EventSink | None = None, name: str = "host",
                 on_deactivate: Callable[[str], Awaitable[None]] | None = None, on_claimed: OnClaimed | None = None):
        self.settings, self.agents, self.name = settings, agents, name
        self.on_deactivate, self.on_claimed = on_deactivate, on_claimed
        self.release_elsewhere: Callable[[str, str], Awaitable[bool]] | None = None
        self.store, self.cache, self.events = store, cache, events
        # A store that carries events writes a call's events with its checkpoint: the calls'
        # events then only pass the observer (metrics) here, and are not published twice.
        self._call_events = events
        if store.carries_events:
            self._call_events = events.observer() if isinstance(events, TappedSink) else None
        self.calls: dict[str, Conversation] = {}
        # Calls without a socket, longest-detached first: bounded without scanning every call.
        self._detached: dict[str, Conversation] = {}
        # Without call_details (gateway.call_details: false) a greeting has nothing to wait for.
        self._turns = (settings.turns if settings.gateway.call_details
                       else settings.turns.model_copy(update={"greeting_wait_ms": 0.0}))
        self._activating: dict[str, asyncio.Future[Conversation]] = {}
        redactor = settings.privacy.redactor()
        self._redact = redactor.event if redactor is not None else None
        self.counters = {"activations": 0, "deactivations": 0, "dropped_events": 0, "taken_over": 0}

    # ------------------------------------------------------------------ activation

    async def activate(self, call_id: str, agent_name: str | None = None) -> Conversation:
        """The live conversation of ``call_id``, claiming or creating it on first use."""
        live = self.calls.get(call_id)
        if live is not None:
            return live
        pending = self._activating.get(call_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Conversation] = asyncio.get_running_loop().create_future()
        self._activating[call_id] = future
        try:
            conversation = await self._claim(call_id, agent_name)
            future.set_result(conversation)
            return conversation
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._activating[call_id]

    async def _claim(self, call_id: str, agent_name: str | None) -> Conversation:
        release = self.release_elsewhere
        claim = await self.store.claim(call_id, self.name, unless_held=release is not None)
        if not claim.epoch and release is not None and claim.previous_owner is not None:
            # another process holds it: it saves and lets go first, so that its last checkpoint
            # lands before our claim fences it off (a new call skips this: one round trip)
            await release(call_id, claim.previous_owner)
            claim = await self.store.claim(call_id, self.name)
        if claim.previous_owner not in (None, self.name) and self.on_claimed is not None:
            self.on_claimed(call_id, claim.previous_owner, claim.epoch)
        state = claim.state or CallState(call_id=call_id, agent=agent_name or self.agents.default_name)
        state.epoch = claim.epoch
        self.counters["activations"] += 1
        return self._live(state, agent_name)

    def _live(self, state: CallState, agent_name: str | None = None) -> Conversation:
        """The conversation of a claimed state, registered as live here."""
        name = state.agent or agent_name or self.agents.default_name
        try:
            agent = self.agents.get(name)
        except KeyError:  # renamed or removed by a redeploy: the call goes on with the default agent
            log.error("call %s: agent %r is not configured any more; the default agent %r takes the call",
                      state.call_id, name, self.agents.default_name, extra={"call_id": state.call_id})
            agent = self.agents.get(None)
        conversation = Conversation(state, agent, store=self.store, settings=self._turns,
                                    cache=self.cache if self.settings.cache.enabled else None,
                                    events=self._call_events,
                                    route_agent=self.agents.route if self.agents.by_retell_agent_id else None,
                                    on_lost=self._lost, host=self.name, redact=self._redact)
        self.calls[state.call_id] = conversation
        return conversation

    async def _reclaim(self, live: Conversation) -> Conversation:
        """A new socket for a call already live here: claim it again so that an activation
        elsewhere is fenced off; if that one wrote a newer state, continue from it."""
        call_id = live.call_id
        try:
            claim = await self.store.claim(call_id, self.name)
        except StoreUnavailableError:
            return live  # nobody can claim it meanwhile; the store catches up later
        if claim.previous_owner not in (None, self.name) and self.on_claimed is not None:
            self.on_claimed(call_id, claim.previous_owner, claim.epoch)
        if claim.state is None or claim.state.version <= live.state.version:
            live.state.epoch = claim.epoch
            return live
        self._forget(live)
        claim.state.epoch = claim.epoch
        return self._live(claim.state)

    def _lost(self, conversation: Conversation) -> None:
        """The conversation's ``on_lost``: a newer activation elsewhere owns the call (its save
        was fenced off, or a command said so). Lifecycle runs one way: the host asks a
        conversation to ``lose``, the conversation tells the host here, once."""
        if self.calls.get(conversation.call_id) is conversation:
            del self.calls[conversation.call_id]
            self._detached.pop(conversation.call_id, None)
            self.counters["taken_over"] += 1

    def _forget(self, conversation: Conversation) -> None:
        """Drop a stale activation of ours (the store holds a newer state): not a takeover."""
        if self.calls.get(conversation.call_id) is conversation:
            del self.calls[conversation.call_id]
            self._detached.pop(conversation.call_id, None)
        conversation.lose()

    async def deactivate(self, call_id: str, end: StreamEnd = StreamEnd.DEACTIVATED) -> bool:
        """Save and drop a call from memory (its next socket re-activates it); a socket still
        attached is closed as ``end`` says."""
        conversation = self.calls.pop(call_id, None)
        self._detached.pop(call_id, None)
        if conversation is None:
            return False
        if conversation.ended and not conversation.state.ended:  # the agent hung up
            conversation.end("agent_hangup")
        await conversation.deactivate(end)
        self.counters["deactivations"] += 1
        if self.on_deactivate is not None:
            await self.on_deactivate(call_id)
        return True

    # ------------------------------------------------------------------ sockets

    async def attach(self, call_id: str, outbox: Outbox, agent_name: str | None = None,
                     resume: bool = False, heard_greeting: bool = True) -> Conversation:
        """Bind a socket's outbox to the call (activating it); the newest socket wins."""
        live = self.calls.get(call_id)
        conversation = await (self._reclaim(live) if live is not None and not resume
                              else self.activate(call_id, agent_name))
        await conversation.attach(outbox, resume=resume, heard_greeting=heard_greeting)
        self._detached.pop(call_id, None)
        return conversation

    async def detach(self, call_id: str, connection_id: str) -> None:
        conversation = self.calls.get(call_id)
        if conversation is None or not conversation.detach(connection_id):
            return
        if conversation.ended:
            await self.deactivate(call_id)
            return
        self._detached[call_id] = conversation
        while len(self._detached) > self.settings.hosts.max_detached_calls:
            # memory is bounded: a reconnect re-activates the call from the store
            await self.deactivate(next(iter(self._detached)))

    async def stream(self, call_id: str, connection_id: str, agent_name: str | None = None,
                     resume: bool = False, heard_greeting: bool = True) -> AsyncIterator[list[OutboundFrame] | StreamEnd]:
        """For a remote gateway: attach, then yield the socket's outbound frames in batches.

        The first item acknowledges the attachment (it may be ``[]``: a resumed socket, or a
        greeting waiting for call_details); the last is the :class:`StreamEnd` that closed it.
        """
        outbox = Outbox(connection_id)
        await self.attach(call_id, outbox, agent_name, resume, heard_greeting)
        yield outbox.drain()
        async for batch in outbox.batches():
            yield batch
        yield outbox.close_reason or StreamEnd.DETACHED

    async def deliver(self, call_id: str, connection_id: str, event: InboundEvent) -> Delivery:
        """For a remote gateway: apply one event from Retell (parsed once, by the socket's
        session). Dropped when this socket no longer owns the call: the newest socket wins."""
        conversation = self.calls.get(call_id)
        outbox = conversation.outbox if conversation is not None else None
        if outbox is None or outbox.connection_id != connection_id:
            self.counters["dropped_events"] += 1
            return Delivery.SUPERSEDED if outbox is not None else Delivery.DETACHED
        conversation.handle(event)
        return Delivery.OK

    # ------------------------------------------------------------------ commands

    async def command(self, call_id: str, command: CallCommand) -> bool:
        """Act on a call live here. False when it is not live here (or, for the commands that
        speak, has no socket)."""
        conversation = self.calls.get(call_id)
        if conversation is None:
            return False
        match command:
            case Superseded(epoch=epoch):
                if conversation.state.epoch < epoch:
                    conversation.lose()  # which tells _lost
                return True
            case Release():  # a newer socket of the call is activating elsewhere
                return await self.deactivate(call_id, StreamEnd.SUPERSEDED)
            case Ended(reason=reason, call=call):
                conversation.end(reason, call, emit=False)
                if conversation.connected:
                    await conversation.checkpoint()
                else:
                    await self.deactivate(call_id)
                return True
            case TransferCall(line=line, number=number):
                return conversation.interrupt(line, transfer_number=number)
            case HangUp(line=line):
                return conversation.interrupt(line, end_call=True)
            case Say(line=line):
                return conversation.interrupt(line)
        raise TypeError(f"not a call command: {command!r}")

    async def webhook(self, event: Event) -> None:
        """A lifecycle event from Retell's webhook: publish it; ``call.ended`` ends the call."""
        if self.events is not None:
            self.events.emit(event)
        if isinstance(event, CallEnded):
            await self.command(event.call_id, Ended(reason=event.reason, call=event.call))

    # ------------------------------------------------------------------ housekeeping

    async def warm_cache(self) -> int:
        """Answer each agent's ``common_questions`` once and cache what may be shared."""
        if self.cache is None or not self.settings.cache.enabled:
            return 0
        stored = 0
        for agent in self.agents.agents.values():
            for question in agent.common_questions:
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


class LocalLink:
    """Local placement's :class:`~callray.session.CallLink`: the call's actor lives in this
    process's :class:`Host`."""

    retryable = (StoreUnavailableError,)

    def __init__(self, host: Host, call_id: str, agent: str | None):
        self.host, self.call_id, self.agent = host, call_id, agent
        self._conversation: Conversation | None = None
        self._outbox: Outbox | None = None

    async def attach(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._conversation = await self.host.attach(self.call_id, outbox, self.agent)

    def deliver(self, event: InboundEvent) -> None:
        conversation = self._conversation
        if conversation is not None and conversation.outbox is self._outbox:  # else a newer socket owns it
            conversation.handle(event)

    async def detach(self) -> None:
        if self._outbox is not None:
            await self.host.detach(self.call_id, self._outbox.connection_id)
