"""The live calls view: what the operator's page shows, batched and bounded."""

from __future__ import annotations

import asyncio
import contextlib

from callray import live
from callray.events import CallEnded, CallStarted, CallSuperseded, CallTurn, EscalationPerformed
from callray.events.memory import MemoryBus
from callray.live import LiveCalls
from tests.test_bus import until


def turn(call_id: str, rid: int, **kw) -> CallTurn:
    return CallTurn(call_id=call_id, seq=rid + 1, response_id=rid, agent="clinic", host="replica-a",
                    caller_text=f"question {rid}", agent_text=f"answer {rid}", first_sentence_ms=40.0 + rid,
                    complete_ms=90.0, **kw)


async def test_the_view_follows_a_call_from_its_first_event_to_the_ended_list():
    view = LiveCalls(interval_s=0.01)
    view.handle(CallStarted(call_id="c1", seq=1, agent="clinic", host="replica-a"))
    view.handle(turn("c1", 1, budget_miss=True, tools=["check_availability"]))
    view.handle(CallSuperseded(call_id="c1", seq=3, response_id=2, by_response_id=3))
    view.handle(turn("c1", 3, cache_hit=True, action="Transfer"))
    view.handle(EscalationPerformed(call_id="c1", seq=2_000_000_000_001, rule="keywords"))
    call = view.snapshot()["calls"][0]
    assert call["host"] == "replica-a" and call["turn_count"] == 2 and call["superseded"] == 1
    assert (call["holding"], call["cache_hits"], call["tools"], call["transferred"]) == (1, 1, ["check_availability"], True)
    assert call["escalation"] == {"rule": "keywords", "performed": True}
    assert [t["response_id"] for t in call["turns"]] == [1, 3] and len(view.snapshot()["latencies"]) == 2
    view.handle(CallEnded(call_id="c1", seq=9, reason="agent_hangup"))
    view.handle(CallEnded(call_id="c1", seq=1_000_000_000_001, reason="user_hangup"))  # Retell's webhook after ours
    snap = view.snapshot()
    assert snap["calls"] == [] and [(e["call_id"], e["reason"], e["turn_count"]) for e in snap["ended"]] == [
        ("c1", "agent_hangup", 2)]


async def test_pages_get_batches_of_what_changed_and_a_slow_page_is_told_to_reload():
    view = LiveCalls(interval_s=0.01)
    page = view.updates()
    first = asyncio.ensure_future(anext(page))
    await asyncio.sleep(0)
    for rid in range(1, 6):  # five turns of two calls in one interval: one batch
        view.handle(turn("c1", rid))
        view.handle(turn("c2", rid))
    batch = await asyncio.wait_for(first, 2)
    assert sorted(c["call_id"] for c in batch["calls"]) == ["c1", "c2"] and len(batch["latencies"]) == 10
    slow = view.updates()
    waiting = asyncio.ensure_future(anext(slow))
    await asyncio.sleep(0.02)
    await waiting  # it took one batch, then stops reading
    for rid in range(6, 40):
        view.handle(turn("c1", rid))
        await asyncio.sleep(0.015)
        await asyncio.wait_for(anext(page), 2)  # the reading page keeps up
    assert (await asyncio.wait_for(anext(slow), 2)).get("reload") is True


async def test_what_changes_between_a_pages_snapshot_and_its_stream_reaches_the_page():
    """A page loads its snapshot, then opens its stream. A call that started in between was
    never sent (changes were kept only while a stream was open): the page did not show it until
    it changed again, and the browser test waited for it in vain (a CI run failed so)."""
    view = LiveCalls(interval_s=0.01)
    view.snapshot()  # the page's first load
    view.handle(turn("c1", 1))  # the call starts before the page's stream is open
    batch = await asyncio.wait_for(anext(view.updates()), 2)
    assert [c["call_id"] for c in batch["calls"]] == ["c1"] and len(batch["latencies"]) == 1


async def test_everything_the_view_keeps_is_bounded():
    view = LiveCalls()
    for i in range(live.MAX_CALLS + 50):
        view.handle(turn(f"c{i}", 1))
    for rid in range(live.MAX_TURNS + 20):
        view.handle(turn("busy", rid))
    for i in range(live.MAX_ENDED + 30):
        view.handle(CallEnded(call_id=f"c{i}", seq=5, reason="user_hangup"))
    snap = view.snapshot()
    assert len(snap["calls"]) <= live.MAX_CALLS and len(snap["ended"]) == live.MAX_ENDED
    assert len(next(c for c in snap["calls"] if c["call_id"] == "busy")["turns"]) == live.MAX_TURNS
    assert len(snap["latencies"]) == live.MAX_LATENCIES


async def test_with_no_page_open_nothing_waits_to_be_sent():
    """200k turns with nobody watching: the view holds its bounded snapshot and no backlog
    (before, every change waited for a page that never came: ~58 MB, sent whole to the first)."""
    view = LiveCalls()
    for i in range(200_000):
        view.handle(turn(f"c{i % 3000}", i))
    for i in range(500):
        view.handle(CallEnded(call_id=f"c{i}", seq=5, reason="user_hangup"))
    assert not view._changed and not view._new_latencies and not view._new_ended


async def test_the_view_reads_the_events_only_while_someone_looks():
    """Unwatched, a replica does not parse every call's events: a page's first load replays the
    recent ones, and the view stops following ``idle_s`` after the last look."""
    bus = MemoryBus()
    view = LiveCalls(bus, interval_s=0.01, idle_s=0.2)
    await bus.publish(turn("c1", 1))
    await bus.publish(turn("c2", 1))
    assert not view.following
    await view.watch()  # a page's first load: the recent events are in the view
    assert view.following and sorted(c["call_id"] for c in view.snapshot()["calls"]) == ["c1", "c2"]
    await bus.publish(turn("c1", 2))
    await until(lambda: view.snapshot()["calls"] and max(c["turn_count"] for c in view.snapshot()["calls"]) == 2,
                timeout=2)
    await until(lambda: not view.following, timeout=3)  # nobody looked for idle_s
    await bus.publish(CallEnded(call_id="c2", seq=9, reason="user_hangup"))  # while nobody looks
    await view.watch()  # the next look rebuilds from the events: c2 ended meanwhile
    snap = view.snapshot()
    assert [c["call_id"] for c in snap["calls"]] == ["c1"] and [e["call_id"] for e in snap["ended"]] == ["c2"]
    page = view.updates()  # an open page keeps it following past idle_s
    waiting = asyncio.ensure_future(anext(page))
    await asyncio.sleep(0.5)
    assert view.following
    waiting.cancel()  # the page closes
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await view.close()
    assert not view.following
