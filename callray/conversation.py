"""One call's conversation: the state machine between Retell's requests and an agent.

A ``Conversation`` owns a call's ``CallState`` and at most one running generation. Its
contract with Retell (protocol §1):

* response 0 (the greeting) is spoken once per call; a reconnect gets an empty, complete
  response 0 instead;
* a newer ``response_required``/``reminder_required`` cancels the running generation, and
  only the latest id is answered;
* every request that is not superseded ends with exactly one ``content_complete: true``, on
  every exit path: success, agent error, agent timeout (then the fallback line is spoken);
* if no speech is ready within the latency budget, a holding phrase goes out under the same id;
* actions (end call > transfer > digit) ride on the completing frame, at most one per id.

Its activation's life is an explicit :class:`Phase` (DETACHED <-> ATTACHED -> DEACTIVATING ->
DEACTIVATED, or LOST from any live phase), each transition checked. It knows nothing about Ray
or sockets: frames go to the attached :class:`Outbox`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine

from callray import events as ev
from callray.events import Event
from callray import tracing
from callray.agents.base import (
    FALLBACK_LINE,
    OUTPUT_TYPES,
    Agent,
    EndCall,
    Metadata,
    PressDigit,
    Speech,
    ToolCall,
    ToolResult,
    Transfer,
    Turn,
    UpdateAgent,
    Usage,
)
from callray.protocol import (
    AgentConfigBody,
    AgentInterruptFrame,
    CallDetails,
    InboundEvent,
    MetadataFrame,
    OutboundFrame,
    ReminderRequired,
    RequestEvent,
    ResponseFrame,
    ResponseRequired,
    ToolCallInvocationFrame,
    ToolCallResultFrame,
    UpdateAgentFrame,
)
from callray.lifecycle import Lifecycle
from callray.outbox import Outbox, StreamEnd
from callray.settings import TurnSettings
from callray.stores.base import (
    CallFencedError,
    CallState,
    EventSink,
    PendingAction,
    PendingDigit,
    PendingEndCall,
    PendingTransfer,
    ResponseCache,
    StaleStateError,
    StateStore,
    TurnRecord,
)

log = logging.getLogger("callray.conversation")

_SENTENCE_END = (".", "!", "?")
#: Events kept for the next checkpoint, at most (a store down for long drops the oldest, logged).
MAX_UNSAVED_EVENTS = 1000
#: Saves of one checkpoint, at most (a save refused by the call's own late write is sent again).
MAX_SAVE_ATTEMPTS = 4
#: Without a configured ``turns.greeting_wait_ms``: how long a greeting that uses call data
#: waits for call_details (Retell sends it right after the config frame asks for it).
GREETING_WAIT_MS = 1000.0


class AgentOutputError(TypeError):
    """The agent yielded something that is not an agent output (the caller hears the fallback)."""


def checked_output(item: Any) -> Any:
    """An agent's output as the conversation takes it: a ``str`` is ``Speech``; anything that is
    not an output, or speech that is not text, raises ``AgentOutputError``."""
    if isinstance(item, str):
        return Speech(item)
    if not isinstance(item, OUTPUT_TYPES):
        names = ", ".join(t.__name__ for t in OUTPUT_TYPES)
        raise AgentOutputError(f"agent yielded {type(item).__name__} {item!r:.80}; expected str or one of {names}")
    if isinstance(item, Speech) and not isinstance(item.text, str):
        raise AgentOutputError(f"Speech.text must be str, got {type(item.text).__name__}")
    return item


class Phase(enum.Enum):
    """Where one activation of a call is in its life. It runs one way: a dropped activation
    (deactivated, or lost to a newer one) never serves again; the next socket activates anew."""

    DETACHED = "detached"  # in memory, no socket (Retell may reconnect)
    ATTACHED = "attached"  # in memory, its newest socket bound
    DEACTIVATING = "deactivating"  # stopping: saving its state for the next activation
    DEACTIVATED = "deactivated"  # saved and dropped from memory
    LOST = "lost"  # a newer activation owns the call: nothing more is sent or written


_PHASES = {
    Phase.DETACHED: frozenset({Phase.ATTACHED, Phase.DEACTIVATING, Phase.LOST}),
    Phase.ATTACHED: frozenset({Phase.ATTACHED, Phase.DETACHED, Phase.DEACTIVATING, Phase.LOST}),
    Phase.DEACTIVATING: frozenset({Phase.DEACTIVATED, Phase.LOST}),
    Phase.DEACTIVATED: frozenset(),
    Phase.LOST: frozenset(),
}


#: The fields of Retell's call object a call's state keeps (what agents, routing and the
#: archive's own records use); the rest (transcripts, recordings) stays with Retell and the
#: archive, which receives the whole object with the webhook.
CALL_FIELDS = frozenset({
    "call_id", "agent_id", "agent_version", "call_type", "call_status", "direction", "from_number", "to_number",
    "start_timestamp", "end_timestamp", "duration_ms", "disconnection_reason", "metadata",
    "retell_llm_dynamic_variables",
})


def kept_call(*objects: dict[str, Any]) -> dict[str, Any]:
    """The call objects merged (later ones win), reduced to ``CALL_FIELDS``."""
    return {k: v for obj in objects for k, v in obj.items() if k in CALL_FIELDS}


@dataclass
class _Request:
    """One request being answered, with the measurements that become a ``call.turn`` event."""

    response_id: int
    kind: str
    turn: Turn
    connection_id: str | None
    started: float = field(default_factory=time.perf_counter)
    text: list[str] = field(default_factory=list)
    first_chunk_ms: float | None = None
    first_sentence_ms: float | None = None
    tools: list[str] = field(default_factory=list)
    action: EndCall | Transfer | PressDigit | None = None
    side_effects: bool = False  # update_agent or metadata sent: not an answer to share
    usage: Usage = field(default_factory=Usage)
    error: str | None = None  # why the agent failed (its exception's type), if it did
    cache_key: str | None = None
    cache_hit: bool = False
    budget_miss: bool = False
    fallback: bool = False
    last_no_interrupt: bool = False

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


_END = object()


@dataclass(frozen=True)
class _AgentFailed:
    error: BaseException


_ACTION_RANK = {EndCall: 3, Transfer: 2, PressDigit: 1}


def pending(action: EndCall | Transfer | PressDigit | None) -> PendingAction | None:
    """An agent's action as the call's state keeps it."""
    if isinstance(action, EndCall):
        return PendingEndCall()
    if isinstance(action, Transfer):
        return PendingTransfer(number=action.number, show_transferee_as_caller=action.show_transferee_as_caller)
    if isinstance(action, PressDigit):
        return PendingDigit(digit=action.digit)
    return None


def shareable(turn: Turn, state_changed: bool, tools: list[str], action: Any) -> bool:
    """May this answer be served to other callers? Only if the agent allows it and it used no
    tool, took no action and changed nothing the agent remembers about the call."""
    return turn.cacheable and not state_changed and not tools and action is None


class Conversation:
    """The state machine of one call (see the module docstring for the contract)."""

    def __init__(
        self,
        state: CallState,
        agent: Agent,
        *,
        store: StateStore,
        settings: TurnSettings,
        cache: ResponseCache | None = None,
        events: EventSink | None = None,
        route_agent: Callable[[dict[str, Any]], Agent | None] | None = None,
        on_lost: Callable[[Conversation], None] | None = None,
        host: str = "",
        redact: Callable[[ev.Event], ev.Event] | None = None,
    ):
        self.state = state
        self._redact = redact
        self.host = host
        self.agent = agent
        self.state.agent = agent.name
        self.store, self.settings, self.cache, self.events = store, settings, cache, events
        self._route_agent = route_agent
        self.outbox: Outbox | None = None
        self.last_activity = time.monotonic()
        self._generation: asyncio.Task | None = None
        self._request: _Request | None = None
        self._completed: tuple[str | None, int] | None = None  # (connection, id) last completed
        self._save_lock = asyncio.Lock()
        # Checkpoints asked for, and the latest ask a landed save carried: a save carries every
        # change made before it started, so an ask it covered need not save again.
        self._asked = self._carried = 0
        self._background: set[asyncio.Task] = set()
        self._call_details = asyncio.Event()
        self._on_lost = on_lost
        self.life = Lifecycle(f"call {state.call_id}", Phase.DETACHED, _PHASES)
        # Events not yet written, when the store writes them with the state (the outbox): the
        # store empties this list as its writes land, so a crash loses no event of a saved turn.
        self.unsaved_events: list[Event] | None = [] if store.carries_events else None

    @property
    def call_id(self) -> str:
        return self.state.call_id

    @property
    def phase(self) -> Phase:
        return self.life.state

    @property
    def lost(self) -> bool:
        return self.phase is Phase.LOST

    # ------------------------------------------------------------------ connections

    async def attach(self, outbox: Outbox, *, resume: bool = False, heard_greeting: bool = True) -> Outbox:
        """Bind a socket's outbound stream; the newest socket wins.

        ``resume`` re-binds the *same* socket after its host restarted: nothing is re-sent if
        it ``heard_greeting`` (a response 0 reached it), else it is greeted now, whatever the
        store says. Otherwise this is a new socket: the greeting once per call, else an empty
        response 0.
        """
        self.life.move(Phase.ATTACHED)  # raises on an activation that was dropped
        self.last_activity = time.monotonic()
        if self.outbox is not None:
            self.outbox.close(StreamEnd.SUPERSEDED)
            self._cancel_generation()
        self.outbox = outbox
        if resume and heard_greeting:
            self.state.greeted = True
            return self.outbox
        if resume:  # its host died before response 0 reached this socket: Retell is still waiting for it
            self.state.greeted = False
        if self.state.greeted:
            self._send(ResponseFrame(response_id=0, content="", content_complete=True))
            self._emit(ev.CallStarted, reconnect=True)
            self._spawn(self.checkpoint())
        elif (wait_ms := self._greeting_wait_ms()) and not self.state.call:
            self._spawn(self._greet(self.outbox, wait_s=wait_ms / 1000))
        else:
            await self._greet(self.outbox)
        return self.outbox

    def _greeting_wait_ms(self) -> float:
        """How long response 0 may wait for call_details: as configured, else only as long as
        the greeting needs call data or the call may be routed to another agent by it."""
        if self.settings.greeting_wait_ms is not None:
            return self.settings.greeting_wait_ms
        try:
            needs_call = bool(self.agent.greeting_uses_call)
        except Exception:  # an agent's own property: if it breaks, waiting is the safe side
            needs_call = True
        return GREETING_WAIT_MS if needs_call or self._route_agent is not None else 0.0

    async def _greet(self, outbox: Outbox, wait_s: float = 0.0) -> None:
        """Response 0, once per call; optionally after call_details (bounded wait)."""
        if wait_s:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._call_details.wait()
        if outbox is self.outbox:
            self._say_greeting(outbox)

    def _say_greeting(self, outbox: Outbox) -> None:
        """Response 0 on ``outbox`` now, unless the call was greeted already."""
        if self.state.greeted:
            return
        try:
            greeting = self.agent.begin_message(self.state.agent_state, self.state.call)
            if not isinstance(greeting, str):
                raise AgentOutputError(f"begin_message returned {type(greeting).__name__}, not str")
        except Exception as exc:  # a broken greeting must not leave Retell waiting for response 0
            log.error("call %s: agent %s: begin_message failed; the caller speaks first", self.call_id,
                      self.agent.name, exc_info=exc, extra={"call_id": self.call_id})
            greeting = ""
        self._send(ResponseFrame(response_id=0, content=greeting, content_complete=True))
        self.state.greeted = True
        self._emit(ev.CallStarted, reconnect=False)
        self._spawn(self.checkpoint())

    def detach(self, connection_id: str) -> bool:
        """The socket went away. The call lives on (Retell may reconnect). True if it was current."""
        if self.outbox is None or self.outbox.connection_id != connection_id:
            return False
        self.life.move(Phase.DETACHED)
        self.outbox.close(StreamEnd.DETACHED)
        self.outbox = None
        self._cancel_generation()
        self.last_activity = time.monotonic()
        return True

    @property
    def connected(self) -> bool:
        return self.phase is Phase.ATTACHED

    # ------------------------------------------------------------------ inbound events

    def handle(self, event: InboundEvent) -> None:
        """Apply one event from Retell. Never blocks: generations run as a tracked task."""
        self.last_activity = time.monotonic()
        if isinstance(event, (ResponseRequired, ReminderRequired)):
            self._on_request(event)
        elif isinstance(event, CallDetails):
            self._on_call_details(event.call)
        # update_only asks for nothing (it does not supersede a request); ping_pong is answered
        # by the gateway; unknown interaction types are ignored.

    def _on_call_details(self, call: dict[str, Any]) -> None:
        self.state.call = kept_call(self.state.call, call)
        if self._route_agent is not None and not self.state.turns and self._generation is None:
            routed = self._route_agent(self.state.call)
            if routed is not None and routed.name != self.agent.name:
                log.info("call %s routed to agent %s by agent_id", self.call_id, routed.name, extra={"call_id": self.call_id})
                self.agent, self.state.agent = routed, routed.name
        self._call_details.set()
        self._spawn(self.checkpoint())

    def _on_request(self, req: RequestEvent) -> None:
        rid = req.response_id
        connection = self.outbox.connection_id if self.outbox else None
        running = self._request.response_id if self._request else None
        if (rid == 0 or rid < self.state.latest_response_id or rid == running
                or self._completed == (connection, rid)):  # 0 is the greeting, never a request
            log.debug("call %s: ignoring stale or repeated request %d", self.call_id, rid, extra={"call_id": self.call_id})
            return
        if self._request is not None:
            self._emit(ev.CallSuperseded, response_id=self._request.response_id, by_response_id=rid)
        self._cancel_generation()
        self.state.latest_response_id = rid
        kind = "reminder" if isinstance(req, ReminderRequired) else "response"
        turn = Turn(
            call_id=self.call_id,
            kind=kind,
            transcript=req.transcript,
            state=copy.deepcopy(self.state.agent_state),
            call=self.state.call,
            tool_results=self.state.tool_results,
            response_id=rid,
            transcript_with_tool_calls=req.transcript_with_tool_calls,
        )
        self._request = request = _Request(rid, kind, turn, connection)
        self._generation = asyncio.create_task(self._answer(request), name=f"answer-{self.call_id}-{rid}")

    def _cancel_generation(self) -> None:
        if self._generation is not None and not self._generation.done():
            self._generation.cancel()
        self._generation, self._request = None, None

    # ------------------------------------------------------------------ answering

    async def _answer(self, request: _Request) -> None:
        """Stream one answer; complete it exactly once whatever happens (unless cancelled)."""
        with tracing.span("callray.turn", call_id=self.call_id, response_id=request.response_id,
                          kind=request.kind, agent=self.agent.name) as span:
            await self._answer_once(request)
            if span is not None:
                span.set_attributes({k: v for k, v in (
                    ("first_chunk_ms", request.first_chunk_ms), ("first_sentence_ms", request.first_sentence_ms),
                    ("cache_hit", request.cache_hit), ("budget_miss", request.budget_miss),
                    ("fallback", request.fallback)) if v is not None})

    async def _answer_once(self, request: _Request) -> None:
        held: Speech | None = None
        try:
            held = await self._stream(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the agent failed or timed out: speak the fallback, complete
            log.warning("call %s response %d: agent %s failed: %r", self.call_id, request.response_id,
                        self.agent.name, exc, exc_info=exc, extra={"call_id": self.call_id})
            request.fallback, request.action, held = True, None, Speech(self._fallback_line())
            request.error = type(exc).__name__
        try:
            self._complete(request, held)
        except Exception as exc:  # the completing frame itself failed: never leave the id open
            log.error("call %s response %d: completing failed: %r", self.call_id, request.response_id, exc,
                      extra={"call_id": self.call_id})
            request.fallback, request.action = True, None
            request.error = request.error or type(exc).__name__
            self._complete(request, Speech(self._fallback_line()))
        await self._finish_turn(request)

    def _fallback_line(self) -> str:
        try:
            line = self.agent.fallback_line
            if isinstance(line, str):
                return line
        except Exception:
            log.exception("call %s: agent %s: fallback_line failed", self.call_id, self.agent.name,
                          extra={"call_id": self.call_id})
        return FALLBACK_LINE

    async def _stream(self, request: _Request) -> Speech | None:
        """Send the answer's frames; return the last phrase, held back to carry completion."""
        cached = await self._cached_answer(request)
        if cached is not None:
            request.cache_hit = True
            for phrase in cached[:-1]:
                self._speak(request, Speech(phrase))
            return Speech(cached[-1])
        queue: asyncio.Queue = asyncio.Queue()
        if self.agent.answers_at_once:  # the whole answer now, without a task and a hop per output
            async with asyncio.timeout(self.settings.agent_timeout_s):  # in case it waits after all
                await self._pump(request.turn, queue)
            pump = None
        else:
            pump = asyncio.create_task(self._pump(request.turn, queue))
        held: Speech | None = None
        try:
            while True:
                item = queue.get_nowait() if not queue.empty() else await self._next_output(request, queue)
                if item is _END:
                    return held
                if isinstance(item, _AgentFailed):
                    if held is not None:
                        self._speak(request, held)
                    raise item.error
                if isinstance(item, Speech):
                    if held is not None:
                        self._speak(request, held)
                        held = None
                    if queue.empty():  # nothing known after it: say it now, never delay
                        self._speak(request, item)
                    else:
                        held = item
                    continue
                if held is not None:
                    self._speak(request, held)
                    held = None
                self._apply_output(request, item)
        finally:
            if pump is not None:
                pump.cancel()

    async def _next_output(self, request: _Request, queue: asyncio.Queue) -> Any:
        """Wait for the agent; on a missed budget say a holding phrase; on timeout raise."""
        while True:
            elapsed = request.elapsed_ms() / 1000
            total_left = self.settings.agent_timeout_s - elapsed
            if total_left <= 0:
                raise TimeoutError(f"agent gave no complete answer within {self.settings.agent_timeout_s} s")
            budget_left = self.settings.latency_budget_ms / 1000 - elapsed
            waiting_for_first = request.first_chunk_ms is None and not request.budget_miss
            timeout = min(total_left, budget_left) if waiting_for_first else total_left
            try:  # asyncio.timeout, not wait_for: wait_for can swallow a cancel on 3.11 (gh-86296)
                async with asyncio.timeout(max(timeout, 0)):
                    return await queue.get()
            except TimeoutError:
                if waiting_for_first and budget_left <= total_left:
                    request.budget_miss = True
                    phrases = self.settings.holding_phrases
                    self._speak(request, Speech(phrases[self.state.latest_response_id % len(phrases)]))

    async def _pump(self, turn: Turn, queue: asyncio.Queue) -> None:
        """Run the agent into a queue so budget and timeout can be watched while it works."""
        try:
            async with contextlib.aclosing(self.agent.respond(turn)) as outputs:  # closes upstream streams at once
                async for item in outputs:
                    queue.put_nowait(checked_output(item))
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait(_AgentFailed(exc))

    def _apply_output(self, request: _Request, item: Any) -> None:
        self._current(request)
        if isinstance(item, ToolCall):
            request.tools.append(item.name)
            self._send(ToolCallInvocationFrame(tool_call_id=item.tool_call_id, name=item.name, arguments=item.arguments))
        elif isinstance(item, ToolResult):
            self._send(ToolCallResultFrame(tool_call_id=item.tool_call_id, content=item.content, successful=item.successful))
        elif isinstance(item, (EndCall, Transfer, PressDigit)):
            current = _ACTION_RANK[type(request.action)] if request.action else 0
            if _ACTION_RANK[type(item)] > current:
                request.action = item
        elif isinstance(item, UpdateAgent):
            request.side_effects = True
            self._send(UpdateAgentFrame(agent_config=AgentConfigBody(**vars(item))))
        elif isinstance(item, Metadata):
            request.side_effects = True
            self._send(MetadataFrame(metadata=item.data))
        elif isinstance(item, Usage):
            request.usage = Usage(request.usage.prompt_tokens + item.prompt_tokens,
                                  request.usage.completion_tokens + item.completion_tokens)

    def _current(self, request: _Request) -> None:
        """End a generation whose request is no longer the one being answered. Cancelling it is
        not enough: a library can swallow the cancel (redis-py's async client loses about 1 in 100
        cancels of a GET in flight), and its frames would reach Retell after the newer answer's."""
        if self._request is not request:
            raise asyncio.CancelledError(f"response {request.response_id} was superseded")

    def _speak(self, request: _Request, speech: Speech, *, complete: bool = False) -> None:
        self._current(request)
        text = speech.text
        if request.text and text and not text[0].isspace() and not request.text[-1][-1:].isspace():
            text = " " + text
        if text:
            request.text.append(text)
            if request.first_chunk_ms is None:
                request.first_chunk_ms = request.elapsed_ms()
            if request.first_sentence_ms is None and text.rstrip().endswith(_SENTENCE_END):
                request.first_sentence_ms = request.elapsed_ms()
        request.last_no_interrupt = speech.no_interruption_allowed
        frame = ResponseFrame(
            response_id=request.response_id,
            content=text,
            content_complete=complete,
            no_interruption_allowed=True if speech.no_interruption_allowed else None,
        )
        if complete:
            self._decorate_with_action(frame, request.action)
        self._send(frame)

    @staticmethod
    def _decorate_with_action(frame: ResponseFrame | AgentInterruptFrame, action: Any) -> None:
        if isinstance(action, EndCall):
            frame.end_call = True
        elif isinstance(action, Transfer):
            frame.transfer_number = action.number
            frame.no_interruption_allowed = True  # a barge-in would cancel the transfer
            if isinstance(frame, ResponseFrame) and action.show_transferee_as_caller is not None:
                frame.show_transferee_as_caller = action.show_transferee_as_caller
        elif isinstance(action, PressDigit):
            frame.digit_to_press = action.digit

    def _complete(self, request: _Request, held: Speech | None) -> None:
        if held is None:
            held = Speech("", no_interruption_allowed=request.last_no_interrupt)
        self._speak(request, held, complete=True)
        if request.first_sentence_ms is None:
            request.first_sentence_ms = request.elapsed_ms()
        self._completed = (request.connection_id, request.response_id)
        if self._request is request:
            self._generation, self._request = None, None

    async def _cached_answer(self, request: _Request) -> list[str] | None:
        if self.cache is None or request.kind != "response":
            return None
        key = self.agent.cache_key(request.turn)
        if key is None:
            return None
        request.cache_key = key
        phrases = await self.cache.get(self.agent.name, self.agent.version, key)
        return phrases or None

    async def _finish_turn(self, request: _Request) -> None:
        """After completion: history, agent state, action, checkpoint, event, cache fill."""
        turn = request.turn
        state_changed = turn.state != self.state.agent_state
        if state_changed and not self._storable(turn.state):
            state_changed = False  # the agent's change is refused; the call keeps its last good state
        else:
            self.state.agent_state = turn.state
        self.state.tool_results.clear()  # answered: a later turn calls its tools afresh
        agent_text = "".join(request.text).strip()
        self.state.turns.append(TurnRecord(response_id=request.response_id, kind=request.kind,
                                           user=turn.last_user_text, agent=agent_text))
        del self.state.turns[:-self.settings.turns_kept]  # the archive keeps every turn
        action = request.action
        self.state.pending_action = pending(action)
        complete_ms = request.elapsed_ms()
        # The turn is in the state (a next request sees it); its completing frame is queued.
        # Send the frames now, before the rest: the event (redacted), the cache fill and the
        # save's serialising (tens of µs, hundreds with Redis) would hold the loop.
        await self._flush()
        key = request.cache_key
        if (key and self.cache and not request.cache_hit and not request.fallback and not request.budget_miss
                and not request.side_effects and shareable(turn, state_changed, request.tools, action)):
            # in the background: the checkpoint below must not wait on the cache
            self._spawn(self.cache.put(self.agent.name, self.agent.version, key, [t.strip() for t in request.text],
                                       call_id=self.call_id))
        self._emit(
            ev.CallTurn, response_id=request.response_id, kind=request.kind, caller_text=turn.last_user_text,
            agent_text=agent_text, first_chunk_ms=request.first_chunk_ms, first_sentence_ms=request.first_sentence_ms,
            complete_ms=complete_ms, cache_hit=request.cache_hit, budget_miss=request.budget_miss,
            fallback=request.fallback, tools=request.tools,
            action=type(action).__name__ if action else None, agent_error=request.error,
            prompt_tokens=request.usage.prompt_tokens, completion_tokens=request.usage.completion_tokens,
        )
        await self.checkpoint()

    def _storable(self, state: dict[str, Any]) -> bool:
        """Whether an agent's ``turn.state`` can be saved (JSON, within ``max_agent_state_bytes``);
        a state that cannot would fail every later checkpoint and lose the call on a restart."""
        try:
            size = len(json.dumps(state, allow_nan=False))
        except (TypeError, ValueError) as exc:
            log.error("call %s: agent %s left turn.state that is not JSON (%s); its change is dropped",
                      self.call_id, self.agent.name, exc, extra={"call_id": self.call_id})
            return False
        if size > self.settings.max_agent_state_bytes:
            log.error("call %s: agent %s left turn.state of %d bytes (turns.max_agent_state_bytes is %d); "
                      "its change is dropped", self.call_id, self.agent.name, size,
                      self.settings.max_agent_state_bytes, extra={"call_id": self.call_id})
            return False
        return True

    # ------------------------------------------------------------------ commands

    def interrupt(self, line: str, *, transfer_number: str | None = None, end_call: bool = False) -> bool:
        """Speak now (``agent_interrupt``), cancelling any in-flight response. False if no socket."""
        if self.outbox is None:
            return False
        under_way = self.state.pending_action
        if transfer_number and isinstance(under_way, PendingTransfer) and under_way.number == transfer_number:
            return True  # this transfer is under way already (an escalation acted twice): say nothing again
        self._cancel_generation()
        self.state.interrupt_id += 1
        frame = AgentInterruptFrame(interrupt_id=self.state.interrupt_id, content=line, content_complete=True,
                                    no_interruption_allowed=True, transfer_number=transfer_number,
                                    end_call=True if end_call else None)
        self._send(frame)
        if transfer_number:
            self.state.pending_action = PendingTransfer(number=transfer_number)
        self._spawn(self.checkpoint())
        return True

    # ------------------------------------------------------------------ lifecycle

    @property
    def ended(self) -> bool:
        """The agent hung up or the platform reported the call over."""
        return self.state.ended or isinstance(self.state.pending_action, PendingEndCall)

    def end(self, reason: str = "", call: dict[str, Any] | None = None, *, emit: bool = True) -> None:
        """The call is over (hang-up or Retell's webhook): remember it, emit ``call.ended``
        unless the caller already published Retell's own."""
        if call:
            self.state.call = kept_call(self.state.call, call)
        if not self.state.ended:
            self.state.ended = True
            if emit:
                self._emit(ev.CallEnded, reason=reason, call=self.state.call)

    async def deactivate(self, end: StreamEnd = StreamEnd.DEACTIVATED) -> None:
        """Stop work, close the stream (``end`` says why), write the state for the next
        activation (unless a newer activation owns the call: then it is only dropped)."""
        self.life.move(Phase.DEACTIVATING)  # raises when it was dropped already
        self._cancel_generation()
        if self.outbox is not None:
            self.outbox.close(end)
            self.outbox = None
        await asyncio.gather(*self._background, return_exceptions=True)  # let in-flight saves land
        await self.checkpoint()
        if not self.lost:  # its last save may have found a newer activation
            self.life.move(Phase.DEACTIVATED)

    def lose(self) -> None:
        """A newer activation owns the call: close the socket (4001), stop, never write again.
        Nothing to do for an activation already dropped."""
        if self.phase in (Phase.LOST, Phase.DEACTIVATED):
            return
        self.life.move(Phase.LOST)
        self._cancel_generation()
        if self.outbox is not None:
            self.outbox.close(StreamEnd.SUPERSEDED)
            self.outbox = None
        if self._on_lost is not None:
            self._on_lost(self)

    def checkpoint(self) -> Coroutine[Any, Any, None]:
        """Write the state. Saves of one call are serialised (versions are compare-and-set), and
        one save writes every change asked for before it started: a call's start asks twice
        (greeting, call_details) and saves once. The ask counts when made, not when awaited."""
        self._asked += 1
        return self._checkpoint(self._asked)

    async def _checkpoint(self, asked: int) -> None:
        async with self._save_lock:
            for _ in range(MAX_SAVE_ATTEMPTS):
                if self.lost or self._carried >= asked or not await self._save():
                    return
            log.error("call %s: not saved after %d attempts", self.call_id, MAX_SAVE_ATTEMPTS,
                      extra={"call_id": self.call_id})

    async def _save(self) -> bool:
        """One save; True when it must be sent again, because its refusal was no other writer's
        doing: it went out under an epoch this activation itself replaced meanwhile (a reconnect
        claimed the call here), or the store holds a version of this activation's own that
        landed late (a stall). The live state is never replaced by a stored one: under its owner
        epoch a call has no other writer, and a newer activation elsewhere fences this one off."""
        epoch, asked = self.state.epoch, self._asked
        try:
            await self.store.save(self.state, self.unsaved_events)
            self._carried = max(self._carried, asked)
        except CallFencedError as exc:
            if self.state.epoch > epoch:
                log.info("call %s: a save under epoch %d met this activation's own epoch %d; saving again",
                         self.call_id, epoch, self.state.epoch, extra={"call_id": self.call_id})
                return True
            log.warning("call %s: %s; dropping it", self.call_id, exc, extra={"call_id": self.call_id})
            self.lose()
        except StaleStateError as exc:
            log.warning("call %s: %s (a save of its own that landed late); saving the live state over it",
                        self.call_id, exc, extra={"call_id": self.call_id})
            self.state.version = exc.found or 0
            return True
        except Exception as exc:  # a store outage must never break a call
            log.error("call %s: checkpoint failed: %r", self.call_id, exc, extra={"call_id": self.call_id})
        return False

    # ------------------------------------------------------------------ plumbing

    def _send(self, frame: OutboundFrame) -> None:
        if self.outbox is not None:
            if not self.state.greeted and not (isinstance(frame, ResponseFrame) and frame.response_id == 0):
                self._say_greeting(self.outbox)  # response 0 comes first, even while the greeting waits
            frame.to_json()  # serialised here, where an answer that cannot be is still caught
            self.outbox.put(frame)

    async def _flush(self) -> None:
        if self.outbox is not None:
            await self.outbox.flush()
        else:
            await asyncio.sleep(0)

    def _emit(self, cls: type, **fields: Any) -> None:
        if self.events is None and self.unsaved_events is None:
            return
        self.state.event_seq += 1
        try:
            event = cls(call_id=self.call_id, seq=self.state.event_seq, epoch=self.state.epoch,
                        agent=self.agent.name, host=self.host, **fields)
            if self._redact is not None:  # what leaves the call carries no caller identifiers
                event = self._redact(event)
            if self.unsaved_events is not None:
                if len(self.unsaved_events) >= MAX_UNSAVED_EVENTS:
                    dropped = self.unsaved_events.pop(0)
                    log.error("call %s: %d events wait for a checkpoint; dropping %s (seq %d)", self.call_id,
                              MAX_UNSAVED_EVENTS, dropped.type, dropped.seq, extra={"call_id": self.call_id})
                self.unsaved_events.append(event)
            if self.events is not None:
                self.events.emit(event)
        except Exception as exc:  # an event must never fail the turn
            log.error("call %s: emitting %s failed: %r", self.call_id, cls.__name__, exc, extra={"call_id": self.call_id})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
