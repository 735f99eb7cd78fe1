"""The call state machine, in plain asyncio (no Ray)."""

from __future__ import annotations

import asyncio
import json

import pytest

from callray.conversation import Conversation, Phase
from callray.lifecycle import IllegalTransition
from callray.outbox import Outbox, StreamEnd
from callray.protocol import ResponseFrame, parse_event
from callray.settings import TurnSettings
from callray.stores.base import CallState, PendingEndCall, PendingTransfer
from callray.stores.memory import MemoryResponseCache, MemoryStateStore
from tests.scripted_agent import ScriptedAgent


class RecordingSink:
    """An event sink that keeps what it is given, for assertions."""

    def __init__(self) -> None:
        self.events: list = []

    def emit(self, event) -> None:
        self.events.append(event)


def request(rid: int, *user_lines: str, kind: str = "response_required") -> object:
    transcript = []
    for line in user_lines:
        transcript += [{"role": "agent", "content": "..."}, {"role": "user", "content": line}]
    return parse_event({"interaction_type": kind, "response_id": rid, "transcript": transcript})


class Harness:
    def __init__(self, budget_ms: float = 800, timeout_s: float = 5, cache: bool = False):
        self.agent = ScriptedAgent()
        self.store = MemoryStateStore()
        self.events = RecordingSink()
        self.cache = MemoryResponseCache() if cache else None
        self.settings = TurnSettings(latency_budget_ms=budget_ms, agent_timeout_s=timeout_s, holding_phrases=["Hold on."])
        self.conversation = self.make()
        self.frames: list[dict] = []

    def make(self, state: CallState | None = None) -> Conversation:
        return Conversation(state or CallState(call_id="c1"), self.agent, store=self.store, settings=self.settings,
                            cache=self.cache, events=self.events)

    async def attach(self, connection: str = "s1", **kw):
        self.outbox = await self.conversation.attach(Outbox(connection), **kw)
        self.opening = self.drain()  # response 0 (or nothing when resuming)
        return self.outbox

    def drain(self) -> list[dict]:
        new = [json.loads(frame.to_json()) for frame in self.outbox.drain()]
        self.frames += new
        return new

    async def settle(self, seconds: float = 0.05) -> list[dict]:
        await asyncio.sleep(seconds)
        return self.drain()

    def for_id(self, rid: int) -> list[dict]:
        return [f for f in self.frames if f.get("response_id") == rid]


def completes(frames: list[dict], rid: int) -> list[dict]:
    return [f for f in frames if f.get("response_id") == rid and f.get("content_complete")]


async def test_greeting_then_answer_completes_once():
    h = Harness()
    await h.attach()
    assert h.opening == [{"response_type": "response", "response_id": 0, "content": "Hello, this is the test agent.",
                      "content_complete": True}]
    h.conversation.handle(request(1, "hello there"))
    frames = await h.settle()
    assert "".join(f["content"] for f in frames) == "You said: hello there. Anything else?"
    assert len(completes(frames, 1)) == 1 and frames[-1]["content_complete"] is True
    assert len(frames) == 2  # phrases carry completion: no empty trailing frame
    state = await h.store.load("c1")
    assert state.greeted and [t.user for t in state.turns] == ["hello there"]


async def test_supersede_cancels_old_generation_and_only_latest_completes():
    h = Harness()
    await h.attach()
    h.conversation.handle(request(1, "slow first"))
    await asyncio.sleep(0.01)
    h.conversation.handle(request(2, "slow first and more"))
    await h.settle(0.5)
    assert h.agent.cancelled == ["slow first"]
    assert h.for_id(1) == [] and len(completes(h.frames, 2)) == 1
    superseded = [e for e in h.events.events if e.type == "call.superseded"]
    assert [(e.response_id, e.by_response_id) for e in superseded] == [(1, 2)]


async def test_stale_and_repeated_requests_are_ignored():
    h = Harness()
    await h.attach()
    h.conversation.handle(request(3, "three"))
    await h.settle()
    h.conversation.handle(request(2, "two"))
    h.conversation.handle(request(3, "three"))
    await h.settle()
    assert h.for_id(2) == [] and len(completes(h.frames, 3)) == 1


async def test_update_only_does_not_supersede():
    h = Harness()
    await h.attach()
    h.conversation.handle(request(1, "slow please"))
    await asyncio.sleep(0.01)
    h.conversation.handle(parse_event({"interaction_type": "update_only", "turntaking": "user_turn",
                                       "transcript": [{"role": "user", "content": "slow please and"}]}))
    await h.settle(0.5)
    assert len(completes(h.frames, 1)) == 1 and h.agent.cancelled == []


async def test_agent_failure_mid_stream_speaks_fallback_and_completes():
    h = Harness()
    await h.attach()
    h.conversation.handle(request(1, "please fail"))
    frames = await h.settle()
    assert frames[0]["content"] == "You said: please fail."
    assert frames[-1] == {"response_type": "response", "response_id": 1, "content": " Sorry, something went wrong.",
                          "content_complete": True}
    turn = [e for e in h.events.events if e.type == "call.turn"][-1]
    assert turn.fallback is True


async def test_agent_timeout_speaks_holding_phrase_then_fallback():
    h = Harness(budget_ms=50, timeout_s=0.3)
    await h.attach()
    h.conversation.handle(request(1, "hang"))
    frames = await h.settle(0.5)
    assert [f["content"].strip() for f in frames] == ["Hold on.", "Sorry, something went wrong."]
    assert [f["content_complete"] for f in frames] == [False, True]


async def test_latency_budget_sends_holding_phrase_then_answer():
    h = Harness(budget_ms=100)
    await h.attach()
    h.conversation.handle(request(1, "slow one"))
    frames = await h.settle(0.5)
    assert frames[0]["content"] == "Hold on." and frames[0]["content_complete"] is False
    assert "You said: slow one." in "".join(f["content"] for f in frames)
    assert len(completes(frames, 1)) == 1
    assert [e.budget_miss for e in h.events.events if e.type == "call.turn"] == [True]


async def test_reconnect_gets_empty_response_zero_and_keeps_history():
    h = Harness()
    await h.attach("s1")
    h.conversation.handle(request(1, "remember blue"))
    await h.settle()
    old = h.outbox
    await h.attach("s2")
    assert old.closed and "superseded" in old.close_reason
    assert h.opening == [{"response_type": "response", "response_id": 0, "content": "", "content_complete": True}]
    # a new activation from the stored state (another host) also does not greet again
    await asyncio.sleep(0.01)
    stored = await h.store.load("c1")
    h.conversation = h.make(stored)
    await h.attach("s3")
    assert h.opening[0]["content"] == ""
    assert h.conversation.state.agent_state == {"memory": "blue"}


async def test_resume_sends_nothing():
    h = Harness()
    await h.attach("s1", resume=True)
    assert h.opening == [] and h.conversation.state.greeted


async def test_resume_of_a_socket_that_never_heard_response_zero_greets_it():
    """Issue 11 §4: the store says greeted (the old host sent it, then died before it reached
    the socket); the same socket resumed without having heard it must get the greeting."""
    h = Harness()
    await h.attach("s1")
    await asyncio.sleep(0.01)
    stored = await h.store.load("c1")
    assert stored.greeted
    h.conversation = h.make(stored)
    await h.attach("s1", resume=True, heard_greeting=False)
    assert h.opening[0]["content"] == "Hello, this is the test agent." and h.conversation.state.greeted


async def test_end_call_and_transfer_ride_on_the_completing_frame_once():
    h = Harness()
    await h.attach()
    h.conversation.handle(request(1, "transfer me"))
    frames = await h.settle()
    assert [f.get("transfer_number") for f in frames] == [None, "+15550001111"]
    assert frames[-1]["content_complete"] is True
    h.conversation.handle(request(2, "bye then"))
    frames = await h.settle()
    ends = [f for f in frames if f.get("end_call")]
    assert len(ends) == 1 and ends[0]["content_complete"] is True
    assert any(f.get("no_interruption_allowed") for f in frames)
    assert h.conversation.ended


async def test_tool_frames_are_bookkeeping_between_phrases():
    h = Harness()
    await h.attach()
    h.conversation.handle(request(1, "use a tool"))
    frames = await h.settle()
    assert [f["response_type"] for f in frames] == ["response", "tool_call_invocation", "tool_call_result", "response"]
    assert frames[1]["arguments"] == '{"q": "x"}' and frames[2]["successful"] is True


async def test_digit_action():
    h = Harness()
    await h.attach()
    h.conversation.handle(request(1, "digit"))
    frames = await h.settle()
    assert frames[-1]["digit_to_press"] == "1" and frames[-1]["content_complete"] is True


async def test_reminder_uses_reminder_turn():
    h = Harness()
    await h.attach()
    h.conversation.handle(request(1, "x", kind="reminder_required"))
    frames = await h.settle()
    assert frames == [{"response_type": "response", "response_id": 1, "content": "Are you still there?",
                       "content_complete": True}]


async def test_agent_interrupt_cancels_and_transfers():
    h = Harness()
    await h.attach()
    h.conversation.handle(request(1, "slow"))
    await asyncio.sleep(0.01)
    assert h.conversation.interrupt("Let me get you a person.", transfer_number="+15550002222")
    frames = await h.settle(0.4)
    assert frames == [{"response_type": "agent_interrupt", "interrupt_id": 1, "content": "Let me get you a person.",
                       "content_complete": True, "no_interruption_allowed": True, "transfer_number": "+15550002222"}]
    assert h.agent.cancelled == ["slow"]


async def test_detach_cancels_work_but_keeps_the_call():
    h = Harness()
    await h.attach("s1")
    h.conversation.handle(request(1, "slow"))
    await asyncio.sleep(0.01)
    assert h.conversation.detach("s1") and not h.conversation.connected
    await asyncio.sleep(0.05)
    assert h.agent.cancelled == ["slow"]
    assert not h.conversation.detach("s1")


async def test_cache_serves_repeated_cacheable_answer_and_skips_stateful_turns():
    h = Harness(cache=True)
    await h.attach()
    h.conversation.handle(request(1, "cache me"))
    await h.settle()
    h.conversation.handle(request(2, "cache me"))
    frames = await h.settle()
    assert "".join(f["content"] for f in frames) == "You said: cache me. Anything else?"
    turns = [e for e in h.events.events if e.type == "call.turn"]
    assert [t.cache_hit for t in turns] == [False, True]
    assert h.cache.stats()["scripted"] == {"hits": 1, "misses": 1}
    h.conversation.handle(request(3, "cache remember red"))  # changes state: never cached
    await h.settle()
    h.conversation.handle(request(4, "cache remember red"))
    await h.settle()
    assert [t.cache_hit for t in h.events.events if t.type == "call.turn"][2:] == [False, False]


class CancelSwallowingCache(MemoryResponseCache):
    """A cache whose ``get`` finishes even when its task is cancelled meanwhile: redis-py's async
    client does this for about 1 in 100 GETs cancelled in flight (redis/redis-py#2028, #2551)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def get(self, agent: str, version: str, key: str):
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                pass  # the library's bug: the cancel is lost
        return None


async def test_a_superseded_answer_never_reaches_the_socket_even_if_its_cancel_was_swallowed():
    """Seen in the benchmark at 200 calls with the Redis cache: a frame for response 1 after
    the frames for response 2, because request 1's generation kept running past its cancel."""
    h = Harness()
    h.cache = CancelSwallowingCache()
    h.conversation = h.make()
    await h.attach()
    h.conversation.handle(request(1, "cache me"))
    await h.settle()
    h.conversation.handle(request(2, "something else"))
    await h.settle()
    h.cache.release.set()  # request 1's lookup returns after all (a miss): its answer must not follow
    await h.settle()
    assert h.for_id(1) == [] and len(completes(h.frames, 2)) == 1
    ids = [f["response_id"] for f in h.frames if "response_id" in f]
    assert ids == sorted(ids)


async def test_event_sequence_numbers_are_per_call_and_increasing():
    h = Harness()
    await h.attach()
    for rid in (1, 2, 3):
        h.conversation.handle(request(rid, f"turn {rid}"))
        await h.settle()
    seqs = [e.seq for e in h.events.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [e.type for e in h.events.events] == ["call.started"] + ["call.turn"] * 3


@pytest.mark.parametrize("payload", [{"interaction_type": "brand_new_type", "x": 1}, {"interaction_type": "update_only"}])
async def test_unknown_and_minimal_events_are_tolerated(payload):
    h = Harness()
    await h.attach()
    h.conversation.handle(parse_event(payload))
    assert await h.settle() == [] and h.opening[0]["response_id"] == 0


class OtherAgent(ScriptedAgent):
    name = "other"

    def begin_message(self, state, call) -> str:
        return f"Hello {call.get('retell_llm_dynamic_variables', {}).get('customer_name', 'there')}, other agent here."


async def test_greeting_waits_for_call_details_and_routes_by_agent_id():
    h = Harness()
    h.settings.greeting_wait_ms = 500
    other = OtherAgent()
    h.conversation = Conversation(CallState(call_id="c1"), h.agent, store=h.store, settings=h.settings,
                                  events=h.events, route_agent=lambda call: other if call.get("agent_id") == "a2" else None)
    await h.attach()
    assert h.opening == []  # held for call_details
    h.conversation.handle(parse_event({"interaction_type": "call_details", "call": {
        "agent_id": "a2", "retell_llm_dynamic_variables": {"customer_name": "Ada"}}}))
    frames = await h.settle()
    assert frames == [{"response_type": "response", "response_id": 0, "content": "Hello Ada, other agent here.",
                       "content_complete": True}]
    assert h.conversation.state.agent == "other"


async def test_greeting_wait_is_bounded():
    h = Harness()
    h.settings.greeting_wait_ms = 50
    await h.attach()
    assert h.opening == []
    frames = await h.settle(0.2)
    assert frames[0]["content"] == "Hello, this is the test agent."


async def test_one_span_per_turn_when_tracing_is_on():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from callray import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing._tracer = provider.get_tracer("callray")
    try:
        h = Harness()
        await h.attach()
        h.conversation.handle(request(1, "hello"))
        await h.settle()
    finally:
        tracing.enable(False)
    (span,) = exporter.get_finished_spans()
    assert span.name == "callray.turn" and span.attributes["response_id"] == 1
    assert span.attributes["first_chunk_ms"] >= 0 and span.attributes["cache_hit"] is False


async def test_a_save_refused_again_and_again_keeps_the_call_in_memory():
    """The store keeps refusing the save as stale and cannot be read: checkpoint gives up after a
    few attempts without raising (on deactivation it would have lost the call's save path) and
    never replaces the live state."""
    from callray.stores.base import StaleStateError, StoreUnavailableError

    class Flaky(MemoryStateStore):
        async def save(self, state, events=None):
            raise StaleStateError(state.call_id, state.version, state.version + 1)

        async def load(self, call_id):
            raise StoreUnavailableError("redis is down")

    h = Harness()
    h.store = Flaky()
    h.conversation = h.make()
    await h.attach()
    before = h.conversation.state
    await h.conversation.checkpoint()  # no exception
    assert h.conversation.state is before
    await h.conversation.deactivate()


async def test_a_transfer_command_repeated_for_a_call_already_transferring_says_nothing_again():
    """Escalation acts before it records, so a transfer can arrive twice: once is spoken."""
    h = Harness()
    await h.attach()
    assert h.conversation.interrupt("Connecting you.", transfer_number="+15550009999")
    assert h.conversation.interrupt("Connecting you.", transfer_number="+15550009999")
    interrupts = [f for f in h.drain() if f["response_type"] == "agent_interrupt"]
    assert len(interrupts) == 1 and interrupts[0]["transfer_number"] == "+15550009999"


def test_a_pending_action_is_typed_and_keeps_the_shape_states_were_stored_in():
    """States saved before the action was typed (a dict with its "type") load as the model."""
    stored = {"call_id": "c1", "pending_action": {"type": "Transfer", "number": "+15550100",
                                                  "show_transferee_as_caller": None}}
    state = CallState.model_validate_json(json.dumps(stored))
    assert state.pending_action == PendingTransfer(number="+15550100")
    again = json.loads(state.model_dump_json())["pending_action"]
    assert again["type"] == "Transfer" and again["number"] == "+15550100"
    assert CallState.model_validate({"call_id": "c2", "pending_action": {"type": "EndCall"}}).pending_action == PendingEndCall()


async def test_an_activation_lives_one_way_and_a_dropped_one_never_serves_again():
    h = Harness()
    assert h.conversation.phase is Phase.DETACHED
    await h.attach("s1")
    assert h.conversation.phase is Phase.ATTACHED and h.conversation.connected
    await h.attach("s2")  # a newer socket takes over
    assert h.conversation.phase is Phase.ATTACHED
    assert h.conversation.detach("s2") and h.conversation.phase is Phase.DETACHED
    await h.conversation.deactivate()
    assert h.conversation.phase is Phase.DEACTIVATED
    assert (await h.store.load("c1")).greeted  # saved on the way out
    with pytest.raises(IllegalTransition, match="call c1 cannot go from deactivated to attached"):
        await h.conversation.attach(Outbox("s3"))
    with pytest.raises(IllegalTransition, match="deactivated to deactivating"):
        await h.conversation.deactivate()
    h.conversation.lose()  # already dropped: nothing to do
    assert h.conversation.phase is Phase.DEACTIVATED


async def test_a_lost_activation_closes_its_socket_and_writes_nothing_more():
    h = Harness()
    await h.attach("s1")
    await h.settle()
    saved = (await h.store.load("c1")).version
    h.conversation.lose()
    assert h.conversation.phase is Phase.LOST and h.outbox.close_reason is StreamEnd.SUPERSEDED
    h.conversation.state.agent_state["after"] = True
    await h.conversation.checkpoint()
    assert (await h.store.load("c1")).version == saved
    with pytest.raises(IllegalTransition, match="lost to attached"):
        await h.conversation.attach(Outbox("s2"))


class SaveWatcher(MemoryStateStore):
    """A memory store that notes, at each save, the frames the socket's writer had taken."""

    def __init__(self, taken: list) -> None:
        super().__init__()
        self.taken, self.seen_at_save = taken, []

    async def save(self, state, events=None):
        self.seen_at_save.append(list(self.taken))
        return await super().save(state, events)


async def test_the_completing_frame_reaches_the_writer_before_the_turn_is_saved():
    """Before, the turn's save (its serialising: tens of µs, hundreds with Redis) ran before the
    writer got the frame the caller was waiting for."""
    taken: list = []
    store = SaveWatcher(taken)
    conversation = Conversation(CallState(call_id="w"), ScriptedAgent(), store=store, settings=TurnSettings())
    outbox = await conversation.attach(Outbox("s1"))

    async def writer() -> None:
        async for frame in outbox.frames():
            taken.append((frame.response_id, frame.content_complete))

    writing = asyncio.create_task(writer())
    await asyncio.sleep(0.01)
    store.seen_at_save.clear()
    conversation.handle(request(1, "hello"))
    await asyncio.sleep(0.05)
    writing.cancel()
    assert store.seen_at_save and (1, True) in store.seen_at_save[0]


class AtOnce(ScriptedAgent):
    answers_at_once = True


async def test_an_agent_that_answers_at_once_is_answered_alike_and_still_timed():
    """It runs inline in the turn (no task of its own); if it waits after all, the agent timeout
    still gives the caller the fallback line."""
    h = Harness(timeout_s=0.3)
    h.agent = AtOnce()
    h.conversation = h.make()
    await h.attach()
    h.conversation.handle(request(1, "hello there"))
    frames = await h.settle()
    assert "".join(f["content"] for f in frames) == "You said: hello there. Anything else?"
    h.conversation.handle(request(2, "hang on"))
    frames = await h.settle(0.6)
    assert [f["content"] for f in completes(frames, 2)] == ["Sorry, something went wrong."]


class Socket:
    """A socket's send for ``Outbox.write``: records each frame with the task that sent it, and
    can be held (a slow client) to show that writes never overlap or reorder."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []  # (frame text, sending task's name)
        self.open = asyncio.Event()
        self.open.set()
        self.alive = True

    async def send(self, text: str) -> bool:
        await self.open.wait()
        self.sent.append((text, asyncio.current_task().get_name()))
        return self.alive


async def test_a_turn_s_frames_are_written_by_its_own_task_without_waiting_for_the_writer():
    """Before, the answer queued its frames and the socket's writer sent them a loop turn later
    (0.3 ms of first-chunk time on a quiet box, and more the busier the loop)."""
    socket = Socket()
    conversation = Conversation(CallState(call_id="f"), ScriptedAgent(), store=MemoryStateStore(), settings=TurnSettings())
    outbox = await conversation.attach(Outbox("s1"))
    writer = asyncio.create_task(outbox.write(socket.send), name="writer")
    await asyncio.sleep(0.01)
    assert [task for _, task in socket.sent] == ["writer"]  # response 0, queued before the writer ran
    conversation.handle(request(1, "hello"))
    await asyncio.sleep(0.05)
    answer = [(json.loads(text), task) for text, task in socket.sent[1:]]
    assert "".join(f["content"] for f, _ in answer) == "You said: hello. Anything else?"
    assert answer[-1][0]["content_complete"] and {task for _, task in answer} == {"answer-f-1"}
    outbox.close(StreamEnd.DETACHED)
    assert await writer is True


async def test_a_flush_while_the_writer_is_sending_leaves_the_frames_to_it_in_order():
    socket = Socket()
    outbox = Outbox("s1")
    writer = asyncio.create_task(outbox.write(socket.send), name="writer")
    socket.open.clear()  # the client stops reading: the writer's send waits
    outbox.put(ResponseFrame(response_id=1, content="one", content_complete=False))
    await asyncio.sleep(0.01)  # the writer is inside its send
    outbox.put(ResponseFrame(response_id=1, content="two", content_complete=False))
    outbox.put(ResponseFrame(response_id=1, content="three", content_complete=True))
    flushing = asyncio.create_task(outbox.flush(), name="flusher")
    await asyncio.sleep(0.01)
    assert flushing.done() and socket.sent == []  # it did not write beside the writer
    socket.open.set()
    await asyncio.sleep(0.01)
    assert [(json.loads(text)["content"], task) for text, task in socket.sent] == [
        ("one", "writer"), ("two", "writer"), ("three", "writer")]
    socket.alive = False  # the socket is gone: the writer stops at its next frame
    outbox.put(ResponseFrame(response_id=2, content="lost", content_complete=True))
    assert await writer is False


async def test_a_frame_queued_while_a_flush_waits_for_a_slow_client_follows_it():
    """Before, the writer took that frame and wrote beside the waiting flush (an assertion
    failed and the writer died)."""
    socket = Socket()
    outbox = Outbox("s1")
    writer = asyncio.create_task(outbox.write(socket.send), name="writer")
    await asyncio.sleep(0)
    socket.open.clear()

    async def answer() -> None:  # as a turn does: queue its frame, flush it
        outbox.put(ResponseFrame(response_id=1, content="first", content_complete=True))
        await outbox.flush()

    flushing = asyncio.create_task(answer(), name="flusher")
    await asyncio.sleep(0.01)  # the flush took the frame and waits in its send
    outbox.put(ResponseFrame(response_id=2, content="second", content_complete=True))
    await asyncio.sleep(0.01)
    assert not writer.done() and socket.sent == []
    socket.open.set()
    await asyncio.sleep(0.01)
    assert flushing.done() and not writer.done()
    assert [(json.loads(text)["content"], task) for text, task in socket.sent] == [("first", "flusher"), ("second", "writer")]
    outbox.close(StreamEnd.DETACHED)
    assert await writer is True


async def test_a_flush_without_a_writer_leaves_the_frames_queued():
    outbox = Outbox("s1")
    outbox.put(ResponseFrame(response_id=1, content="kept", content_complete=True))
    await outbox.flush()
    assert [frame.content for frame in outbox.drain()] == ["kept"]


async def test_a_closed_outbox_s_last_frames_are_left_to_its_writer():
    """A superseded socket's writer sends what was queued before the close, then ends; a flush
    of that outbox (its call's late turn) writes nothing itself."""
    socket = Socket()
    outbox = Outbox("s1")
    writer = asyncio.create_task(outbox.write(socket.send), name="writer")
    await asyncio.sleep(0)

    async def answer() -> None:
        outbox.put(ResponseFrame(response_id=1, content="last", content_complete=True))
        outbox.close(StreamEnd.SUPERSEDED)
        await outbox.flush()

    await asyncio.create_task(answer(), name="flusher")
    assert await writer is True
    assert [(json.loads(text)["content"], task) for text, task in socket.sent] == [("last", "writer")]
