"""Property-based fuzzing of the two places untrusted input enters: frame parsing and the
call state machine. Examples are kept few (the file runs in seconds); hypothesis shrinks any
failure to a minimal event sequence."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from callray.agents.base import Agent, AgentOutput, EndCall, PressDigit, Speech, ToolCall, ToolResult, Transfer, Turn, normalise
from callray.conversation import Conversation
from callray.outbox import Outbox
from callray.protocol import (
    CallDetails, PingPong, ProtocolError, ReminderRequired, ResponseRequired, UnknownInteraction, UpdateOnly, parse_event,
    parse_frame,
)
from callray.settings import TurnSettings
from callray.stores.base import CallState
from callray.stores.memory import MemoryResponseCache, MemoryStateStore

INBOUND = (PingPong, CallDetails, UpdateOnly, ResponseRequired, ReminderRequired, UnknownInteraction)
KNOWN_TYPES = ["ping_pong", "call_details", "update_only", "response_required", "reminder_required"]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------- parse_frame

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=25)
ids = st.one_of(st.integers(min_value=-5, max_value=50), st.just(2**70), st.just(-(2**70)), st.floats(), st.text(max_size=4),
                st.booleans(), st.none(), st.lists(st.integers(), max_size=2))
utterances = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "agent", "transfer_target"]) | st.text(max_size=6)},
        optional={"content": st.text(max_size=200) | json_values, "words": st.lists(json_values, max_size=3), "x": json_values},
    ),
    json_values,
)
messages = st.fixed_dictionaries(
    {"interaction_type": st.sampled_from(KNOWN_TYPES) | st.text(max_size=12) | json_values},
    optional={
        "response_id": ids, "timestamp": ids, "transcript": st.lists(utterances, max_size=6) | json_values,
        "transcript_with_tool_calls": json_values, "call": json_values, "turntaking": json_values, "extra": json_values,
    },
)


def frames_from(value: Any) -> st.SearchStrategy:
    return st.sampled_from([json.dumps(value), json.dumps(value).encode()])


frames = st.one_of(
    st.text(), st.binary(), messages.flatmap(frames_from), json_values.flatmap(frames_from),
    st.text(alphabet="{}[]\":,0123456789 truefalsn", max_size=40),  # near-JSON garbage
)


def check_parsed(result: Any) -> None:
    assert isinstance(result, (*INBOUND, ProtocolError)), type(result)
    if isinstance(result, ProtocolError):
        assert str(result)
        return
    json.loads(result.model_dump_json())  # anything accepted can be stored and logged again
    if isinstance(result, (ResponseRequired, ReminderRequired)):
        assert type(result.response_id) is int and result.response_id >= 0


@FAST
@given(frames)
@example('{"interaction_type": "response_required", "response_id": 1180591620717411303424, "transcript": []}')
@example('{"interaction_type": "response_required", "response_id": -1}')
@example('{"interaction_type": "response_required", "response_id": 1e400}')
@example('{"interaction_type": "ping_pong", "timestamp": NaN}')
@example('{"interaction_type": null}')
@example("1" * 5000)
@example(b"\xff\xfe")
def test_parse_frame_never_raises(frame):
    check_parsed(parse_frame(frame))


@FAST
@given(st.integers(min_value=0, max_value=2**70), st.lists(st.tuples(st.sampled_from(["user", "agent", "odd"]), st.text()), max_size=5),
       st.sampled_from(["response_required", "reminder_required"]))
def test_well_formed_requests_keep_their_id_and_text(rid, lines, kind):
    raw = {"interaction_type": kind, "response_id": rid, "transcript": [{"role": r, "content": c} for r, c in lines]}
    event = parse_frame(json.dumps(raw))
    assert isinstance(event, ResponseRequired if kind == "response_required" else ReminderRequired)
    assert event.response_id == rid and [(u["role"], u["content"]) for u in event.transcript] == lines


@FAST
@given(st.text(min_size=1).filter(lambda t: t not in KNOWN_TYPES), st.dictionaries(st.text(max_size=5), json_values, max_size=3))
def test_unknown_interaction_types_are_tolerated(kind, extra):
    event = parse_event({**extra, "interaction_type": kind})
    assert isinstance(event, UnknownInteraction) and event.interaction_type == kind


@given(st.integers(max_value=-1))
@settings(max_examples=30, deadline=None)
def test_negative_ids_are_protocol_errors(rid):
    event = parse_event({"interaction_type": "response_required", "response_id": rid})
    assert isinstance(event, ProtocolError) and event.kind == "invalid" and "response_id" in event.detail


def test_huge_transcript_parses():
    transcript = [{"role": "user" if i % 2 else "agent", "content": "word " * 100} for i in range(2000)]
    event = parse_frame(json.dumps({"interaction_type": "response_required", "response_id": 9, "transcript": transcript}))
    assert isinstance(event, ResponseRequired) and len(event.transcript) == 2000


def nested(depth: int) -> str:
    return json.dumps({"interaction_type": "call_details", "call": {"x": json.loads("[" * depth + "]" * depth)}})


@pytest.mark.parametrize("frame", ["[" * 100_000, '{"a":' * 5000], ids=["arrays", "objects"])
def test_deeply_nested_frame_is_a_protocol_error(frame):
    assert isinstance(parse_frame(frame), ProtocolError)


@pytest.mark.parametrize("frame", [
    '{"interaction_type": "response_required", "response_id": 1, "transcript": [{"role": "user", "content": "a\\ud800"}]}',
    nested(300),
], ids=["lone_surrogate", "depth_300"])
def test_accepted_frames_can_be_serialised_again(frame):
    check_parsed(parse_frame(frame))


# --------------------------------------------------------------------------- conversation


class FastAgent(Agent):
    """Like tests/scripted_agent.py but quick, yielding to the loop between outputs so events
    interleave with answers. Words: ``pause`` (misses the latency budget), ``stall`` (times out),
    ``empty``, ``fail``, ``tool``, ``bye``, ``transfer``, ``digit``, ``remember``, ``cache``."""

    name, version = "fast", "1"
    greeting_uses_call = False
    fallback_line, reminder_line = "Sorry, something went wrong.", "Still there?"

    def begin_message(self, state: dict[str, Any], call: dict[str, Any]) -> str:
        return "Hello."

    def cache_key(self, turn: Turn) -> str | None:
        return normalise(turn.last_user_text) if "cache" in turn.last_user_text else None

    async def respond(self, turn: Turn) -> AsyncIterator[AgentOutput]:
        words = normalise(turn.last_user_text).split()
        if turn.kind == "reminder":
            yield Speech(self.reminder_line)
            return
        if "stall" in words:
            await asyncio.sleep(30)
        if "pause" in words:
            await asyncio.sleep(0.03)
        if "empty" in words:
            return
        if "remember" in words:
            turn.state["n"] = turn.state.get("n", 0) + 1
        yield Speech(f"Heard {len(words)} words.")
        await asyncio.sleep(0)
        if "fail" in words:
            raise RuntimeError("agent broke")
        if "tool" in words:
            yield ToolCall("t1", "lookup", "{}")
            await asyncio.sleep(0)
            yield ToolResult("t1", "ok")
        if "bye" in words:
            yield Speech("Goodbye.", no_interruption_allowed=True)
            yield EndCall()
        if "transfer" in words:
            yield Transfer("+15550001111")
        if "digit" in words:
            yield PressDigit("1")
        await asyncio.sleep(0)
        yield Speech("Next?")


VOCAB = ["hello", "pause", "stall", "empty", "fail", "tool", "bye", "transfer", "digit", "remember", "cache", "é", "（全角）"]

requests = st.tuples(
    st.just("request"), st.sampled_from(["response_required", "response_required", "reminder_required"]),
    st.one_of(st.integers(min_value=1, max_value=12), st.just("next"), st.just("same")),
    st.lists(st.sampled_from(VOCAB), max_size=3),
)
operations = st.lists(st.one_of(
    requests, requests,
    st.tuples(st.just("update_only"), st.lists(st.sampled_from(VOCAB), max_size=2)),
    st.tuples(st.just("call_details"), st.sampled_from(["a", "b"])), st.just(("unknown",)),
    st.just(("attach",)), st.just(("detach",)), st.just(("detach_stale",)), st.just(("deactivate",)),
    st.tuples(st.just("interrupt"), st.booleans()),
    st.tuples(st.just("sleep"), st.sampled_from([0, 0, 0, 1, 5, 20])),
), max_size=30)


class RecordingSink:
    """The events a conversation emitted, in order."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def emit(self, event: Any) -> None:
        self.events.append(event)


@dataclass
class Stream:
    """One socket's outbound stream and the requests/interrupts delivered while it was current."""

    connection_id: str
    outbox: Outbox
    log: list[tuple[str, int | None]] = field(default_factory=list)

    def frames(self) -> list[str]:
        return [frame.to_json() for frame in self.outbox.drain()]


def transcript(words: list[str]) -> list[dict[str, str]]:
    return [{"role": "agent", "content": "Hello."}, {"role": "user", "content": " ".join(words)}]


class RoundTripStore(MemoryStateStore):
    """Saves like a network store: the write is applied, then the reply travels back, so other
    tasks run (and cancellations land) while a save is in flight."""

    async def save(self, state: CallState, events=None) -> int:
        sent = state.model_copy(deep=True)
        await asyncio.sleep(0)  # request in flight
        version = await super().save(sent, events)
        await asyncio.sleep(0)  # reply in flight
        state.version, state.updated_at = sent.version, sent.updated_at
        return version


class RoutedAgent(FastAgent):
    name = "routed"


def route(call: dict[str, Any]) -> FastAgent | None:
    return RoutedAgent() if call.get("agent_id") == "b" else None


async def drive(ops: list[tuple], store: MemoryStateStore | None = None) -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    store, sink, cache = store or MemoryStateStore(), RecordingSink(), MemoryResponseCache()
    turn_settings = TurnSettings(latency_budget_ms=15, agent_timeout_s=0.06, holding_phrases=["Hold on."],
                                 greeting_wait_ms=20)

    def activate(state: CallState | None) -> Conversation:
        return Conversation(state or CallState(call_id="fuzz"), FastAgent(), store=store, settings=turn_settings,
                            cache=cache, events=sink, route_agent=route)

    conv = activate(None)
    streams: list[Stream] = []
    current: Stream | None = None
    latest, last_rid = 0, 1

    async def attach() -> Stream:
        cid = f"s{len(streams)}"
        stream = Stream(cid, await conv.attach(Outbox(cid)))
        streams.append(stream)
        return stream

    current = await attach()
    for op in ops:
        kind = op[0]
        if kind == "request":
            _, interaction, rid, words = op
            rid = latest + 1 if rid == "next" else last_rid if rid == "same" else rid
            event = parse_event({"interaction_type": interaction, "response_id": rid, "transcript": transcript(words)})
            assert not isinstance(event, ProtocolError), event
            conv.handle(event)
            latest, last_rid = max(latest, rid), rid
            if current:
                current.log.append(("req", rid))
        elif kind == "update_only":
            conv.handle(parse_event({"interaction_type": "update_only", "transcript": transcript(op[1]), "turntaking": "user_turn"}))
        elif kind == "call_details":
            conv.handle(parse_event({"interaction_type": "call_details", "call": {"from_number": "+15551234567", "agent_id": op[1]}}))
        elif kind == "unknown":
            conv.handle(parse_event({"interaction_type": "brand_new", "payload": [1, {"x": None}]}))
        elif kind == "attach":
            current = await attach()
        elif kind == "detach":
            if current:
                assert conv.detach(current.connection_id)
                current = None
        elif kind == "detach_stale":
            stale = [s.connection_id for s in streams if s is not current]
            assert not conv.detach(stale[0] if stale else "never-attached")
        elif kind == "interrupt":
            sent = conv.interrupt("One moment.", transfer_number="+15550002222" if op[1] else None)
            assert sent == (current is not None)
            if current:
                current.log.append(("interrupt", None))
        elif kind == "deactivate":  # the host saves and drops the call; the next event re-activates it
            await conv.deactivate()
            conv, current = activate(await store.load("fuzz")), None
        elif kind == "sleep":
            await asyncio.sleep(op[1] / 1000)

    for _ in range(400):  # settle: every answer, timeout and checkpoint has finished
        if all(task.done() for task in asyncio.all_tasks() if task is not asyncio.current_task()):
            break
        await asyncio.sleep(0.01)

    assert conv._generation is None, "an answer task ended with an exception instead of completing"
    assert not loop_errors, loop_errors
    assert conv.state.latest_response_id == latest, f"latest id {conv.state.latest_response_id} in memory, {latest} sent"
    await conv.checkpoint()
    stored = (await store.load("fuzz")).latest_response_id
    assert stored == latest, f"latest id {stored} stored, {latest} sent"

    interrupt_ids: list[int] = []
    for stream in streams:
        frames = [json.loads(text) for text in stream.frames()]  # every frame is JSON
        assert stream.outbox.closed == (stream is not current)
        if not frames:  # only a socket that went away while its greeting waited for call_details
            assert stream is not current
            continue
        assert frames[0]["response_type"] == "response" and frames[0]["response_id"] == 0
        assert frames[0]["content_complete"] is True
        completed: dict[int, int] = {}
        last_id = 0
        for frame in frames:
            assert isinstance(frame, dict) and isinstance(frame.get("response_type"), str), frame
            if frame["response_type"] == "agent_interrupt":
                interrupt_ids.append(frame["interrupt_id"])
                assert frame["content_complete"] is True
                continue
            if frame["response_type"] != "response":
                assert frame["response_type"] in ("tool_call_invocation", "tool_call_result"), frame
                continue
            rid = frame["response_id"]
            assert type(rid) is int and type(frame["content_complete"]) is bool and isinstance(frame["content"], str)
            assert rid >= last_id, f"{stream.connection_id}: frame for {rid} after a frame for {last_id}"
            assert rid not in completed, f"{stream.connection_id}: frame for {rid} after its completion"
            last_id = rid
            if frame["content_complete"]:
                completed[rid] = completed.get(rid, 0) + 1
        if stream is current:  # the latest request, unless superseded or interrupted, ends with one completion
            asked = [rid for what, rid in stream.log if what == "req"]
            if asked and max(asked) == latest:
                last = [what for what, rid in stream.log if what == "interrupt" or rid == latest][-1]
                if last == "req":
                    assert completed.get(latest) == 1, f"{stream.connection_id}: request {latest} never completed"
    assert interrupt_ids == sorted(set(interrupt_ids))
    seqs = [e.seq for e in sink.events]
    assert seqs == sorted(set(seqs))
    greetings = [e for e in sink.events if e.type == "call.started" and not e.reconnect]
    assert len(greetings) == int(conv.state.greeted)  # greeted once, or (every socket left before it) never


# Regression: Python 3.11's asyncio.wait_for returns the result and drops a cancel() that lands in the loop
# iteration where the awaited future completed (CPython gh-86296, fixed in 3.12). Conversation.
# _next_output awaits the agent's queue with wait_for, so a superseded, detached or deactivated
# answer can keep running: it sends frames for its old id after the newer id's (or to the new
# socket), and its _complete() clears _generation/_request of the *newer* answer, which then
# can no longer be cancelled. Fix: `async with asyncio.timeout(t): return await queue.get()`
# (and let _complete clear the fields only when they still belong to its request).
SUPERSEDE_RACE = [("request", "response_required", "next", []), ("sleep", 0), ("request", "response_required", "next", [])]


def test_superseded_answer_sends_nothing_more():
    asyncio.run(drive(SUPERSEDE_RACE))  # "s0: frame for 1 after a frame for 2"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
@example(SUPERSEDE_RACE)  # the wait_for regression, deterministically
@example([("request", "response_required", 2, ["hello"]), ("request", "response_required", 1, []),
          ("request", "response_required", 2, [])])
@example([("request", "response_required", 1, ["pause"]), ("attach",), ("request", "response_required", 1, ["hello"])])
@example([("request", "response_required", 1, ["stall"]), ("sleep", 20), ("interrupt", True),
          ("request", "response_required", 1, ["hello"])])
@example([("detach",), ("request", "response_required", 3, ["tool"]), ("attach",), ("request", "response_required", 3, [])])
def test_conversation_survives_random_event_sequences(ops):
    asyncio.run(drive(ops))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
@example(SUPERSEDE_RACE)
def test_conversation_with_a_round_trip_store(ops):
    asyncio.run(drive(ops, RoundTripStore()))


# --------------------------------------------------------------------------- findings (regressions)


def test_request_with_id_zero_does_not_complete_response_zero_twice():
    asyncio.run(drive([("request", "response_required", 0, ["hello"])]))


class EchoLastAgent(FastAgent):
    """Names the caller in its final phrase, as a flow agent confirming a captured slot does."""

    async def respond(self, turn: Turn) -> AsyncIterator[AgentOutput]:
        yield Speech("Okay.")
        yield Speech(f"Thanks, {turn.last_user_text}.")


async def test_unserialisable_final_phrase_still_completes():
    conv = Conversation(CallState(call_id="s"), EchoLastAgent(), store=MemoryStateStore(), settings=TurnSettings())
    outbox = await conv.attach(Outbox("s0"))
    # parse_frame now refuses lone surrogates; an event built another way must still complete
    conv.handle(ResponseRequired(interaction_type="response_required", response_id=1,
                                 transcript=[{"role": "user", "content": "Bob \ud800"}]))
    await asyncio.sleep(0.05)
    task = conv._generation
    if task is not None and task.done():
        task.exception()  # retrieved here: the assertion below reports the missing completion
    sent = [json.loads(f) for f in Stream("s0", outbox).frames()]
    assert [f["content_complete"] for f in sent if f["response_id"] == 1][-1:] == [True]


async def test_deactivate_keeps_changes_made_while_a_save_was_in_flight():
    store = RoundTripStore()
    conv = Conversation(CallState(call_id="d"), FastAgent(), store=store, settings=TurnSettings())
    await conv.attach(Outbox("s0"))
    await asyncio.sleep(0.01)
    conv.interrupt("Transferring you now.", transfer_number="+15550002222")  # spawns a checkpoint
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # that save is applied; its reply is in flight
    conv.end("user_hangup")  # what an "ended" command does, then the host deactivates at once
    await conv.deactivate()
    assert (await store.load("d")).ended
