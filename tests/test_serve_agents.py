"""A Python agent from a folder (examples/echo) on Serve, two replicas with Redis state: Retell's
contract holds for user code as for callray's own agents, and its state follows the call."""

from __future__ import annotations

import json

import pytest

from callray.sim.client import RetellClient
from tests.test_serve_durable import reconnected_on_the_other_replica, replicas_running
from tests.test_serve_single import new_call_id

pytestmark = pytest.mark.ray


async def test_a_python_agent_from_a_folder_keeps_retells_contract_and_its_state_across_replicas(
        durable_app, redis_server):
    url = durable_app + "/echo"
    await replicas_running("durable", 2)
    n = 0

    async def start() -> RetellClient:
        nonlocal n
        first = await RetellClient(url, new_call_id()).connect()
        assert await first.complete(0) == "Hi, I'm the echo agent. Say something!"
        assert await first.turn(1, "hello") == "You said: hello. That was message 1."
        # supersede: the caller kept talking, Retell asks again before the first answer is spoken
        await first.say(2, "I want")
        first.transcript[-1]["content"] = "I want a table"
        answer = await first.turn(3, "")
        # a superseded answer's change to turn.state is dropped with it: only answered turns count
        answered = [f["response_id"] for f in first.frames if f.get("content_complete")]
        n = 3 if 2 in answered else 2
        assert answered in ([0, 1, 3], [0, 1, 2, 3]) and answer == f"You said: I want a table. That was message {n}."
        reminder = await first.turn(4, "", kind="reminder_required")
        assert reminder == f"You said: I want a table. That was message {n + 1}."
        return first

    first, second, _, _ = await reconnected_on_the_other_replica(url, redis_server.url, start)
    try:
        second.transcript = list(first.transcript)
        answer = await second.turn(5, "still there? bye")
        assert answer == f"You said: still there? bye. That was message {n + 2}."  # the count moved with the call
        assert second.responses(5)[-1]["end_call"] is True
        for client in (first, second):
            completes = [f["response_id"] for f in client.frames if f.get("content_complete")]
            assert len(completes) == len(set(completes))
            assert not [i for i in client.issues if i[0] not in ("first_frame_not_config",)], client.issues
    finally:
        await second.close()


async def test_the_llm_agent_remembers_its_tools_after_a_reconnect_to_the_other_replica(
        durable_app, redis_server, fake_llm):
    """Turn 1 calls a Python function tool on one replica; the call moves to the other replica;
    turn 2's request to the model still holds the tool call and its result, rebuilt from the
    transcript_with_tool_calls Retell resends."""
    from callray.sim.fake_llm import ScriptedReply, ScriptedToolCall

    def shop_model(body):
        if body.get("model") != "shop-model":
            return None  # the other agents of the session get the ordinary echo
        last = body["messages"][-1]
        if last["role"] == "tool":
            return ScriptedReply(text="Your order has shipped.")
        if "where is my order" in str(last.get("content")).lower():
            return ScriptedReply(tool_calls=[ScriptedToolCall(name="lookup_order", arguments={"order_id": "A-17"})])
        return ScriptedReply(text="It arrives tomorrow.")

    url = durable_app + "/shop"
    await replicas_running("durable", 2)
    fake_llm.state.responder = shop_model
    try:
        async def start() -> RetellClient:
            first = await RetellClient(url, new_call_id()).connect()
            await first.complete(0)
            assert await first.turn(1, "Where is my order A-17?") == "Your order has shipped."
            assert [f["response_type"] for f in first.frames if "tool_call" in f["response_type"]] == [
                "tool_call_invocation", "tool_call_result"]
            return first

        first, second, _, _ = await reconnected_on_the_other_replica(url, redis_server.url, start)
        try:
            second.transcript, second.history = list(first.transcript), list(first.history)
            seen = len(fake_llm.records)
            assert await second.turn(2, "And when does it arrive?") == "It arrives tomorrow."
            messages = [r for r in fake_llm.records[seen:] if r.body.get("model") == "shop-model"][-1].messages
            calls = [m for m in messages if m.get("tool_calls")]
            results = [m for m in messages if m["role"] == "tool"]
            assert calls[0]["tool_calls"][0]["function"]["name"] == "lookup_order"
            assert json.loads(results[0]["content"]) == {"order": "A-17", "status": "shipped"}
            assert results[0]["tool_call_id"] == calls[0]["tool_calls"][0]["id"]
            assert [m["role"] for m in messages][-1] == "user"
        finally:
            await second.close()
            await first.close()
    finally:
        fake_llm.state.responder = None
