"""The LLM agent behind the gateway: phrase streaming, routing by path and by agent_id."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from callray.sim.client import RetellClient
from tests.test_serve_single import NAMES, new_call_id

pytestmark = pytest.mark.ray


def details(call_id: str, agent_id: str, name: str) -> dict:
    return {"interaction_type": "call_details", "call": {
        "call_id": call_id, "agent_id": agent_id, "retell_llm_dynamic_variables": {"customer_name": name}}}


async def test_route_by_agent_id_fills_the_greeting_and_streams_phrases(llm_app, fake_llm):
    client = await RetellClient(llm_app, new_call_id()).connect()
    try:
        await client.send(details(client.call_id, "agent_dental_1", "Grace"))
        greeting = await client.complete(0)
        assert greeting.startswith("Hi Grace, thanks for calling Bright Smile Dental")
        answer = await client.turn(1, "Can I book a cleaning on Friday morning?")
        frames = [f for f in client.responses(1) if f["content"]]
        assert "cleaning" in answer and "Friday" in answer
        assert 1 < len(frames) < len(answer.split())  # phrases: more than one frame, fewer than one per word
        request = next(r for r in fake_llm.records if "Friday morning" in (r.last_user_text or ""))
        assert "Grace" in request.body["messages"][0]["content"]  # dynamic variables in the system prompt
    finally:
        await client.close()


async def test_the_default_config_serves_the_flow_agent_and_the_llm_agent_from_the_environment(default_app, fake_llm):
    """Nothing edited: OPENAI_BASE_URL in the environment is all the LLM agent needs."""
    flow = await RetellClient(default_app, new_call_id()).connect()
    try:
        assert "Maple Street" in await flow.complete(0)
    finally:
        await flow.close()
    client = await RetellClient(default_app + "/assistant", new_call_id()).connect()
    try:
        await client.send(details(client.call_id, "agent_x", "Farah"))
        assert "Bright Smile Dental" in await client.complete(0)
        answer = await client.turn(1, "Hi, I would like a cleaning on Tuesday")
        assert "cleaning" in answer.lower() and "tuesday" in answer.lower()  # the fake LLM echoes key words
        assert any("cleaning" in (r.last_user_text or "") for r in fake_llm.records)
    finally:
        await client.close()


async def test_route_by_path_and_default_agent(llm_app):
    by_path = await RetellClient(llm_app + "/assistant", new_call_id()).connect()
    default = await RetellClient(llm_app, new_call_id()).connect()
    try:
        assert "Bright Smile Dental" in await by_path.complete(0)  # no call_details: greeting after the wait
        assert "Maple Street" in await default.complete(0)
    finally:
        await by_path.close()
        await default.close()


async def test_twenty_concurrent_llm_calls_hear_their_own_words(llm_app):
    async def one(name: str) -> tuple[str, str]:
        client = await RetellClient(llm_app + "/assistant", new_call_id()).connect()
        try:
            await client.send(details(client.call_id, "agent_dental_1", name))
            await client.complete(0)
            return name, await client.turn(1, f"Please note the surname {name}quist for my file")
        finally:
            await client.close()

    for name, answer in await asyncio.gather(*(one(n) for n in NAMES[:20])):
        assert f"{name}quist" in answer
        assert not any(f"{other}quist" in answer for other in NAMES[:20] if other != name)


async def test_answer_in_flight_when_the_replica_dies_is_asked_again_and_answered(llm_app, fake_llm):
    """The replica holding the call dies mid-answer: Retell reconnects (on a restarted or other
    replica) and asks again; the agent is never left silent."""
    from callray.sim.fake_llm import ScriptedReply
    from tests.test_serve_durable import gateway_replica_pids, reconnect

    fake_llm.enqueue(ScriptedReply(text="Whitening is a gentle treatment. " * 6, tokens_per_s=8))  # ~4 s of speech
    question = "Tell me about whitening treatments and their prices in detail please"
    client = await RetellClient(llm_app + "/assistant", new_call_id()).connect()
    await client.send(details(client.call_id, "agent_dental_1", "Ines"))
    await client.complete(0)
    await client.say(1, question)
    await client.wait_for(lambda f: f.get("response_id") == 1 and f.get("content"))  # streaming has begun
    os.kill(gateway_replica_pids("llm")[0], signal.SIGKILL)
    with pytest.raises(ConnectionError):
        await client.wait_for(lambda f: False, timeout=30)
    assert client.close_code != 1000  # not a hang-up: Retell reconnects
    again = await reconnect(llm_app + "/assistant", client.call_id, attempts=120)
    try:
        again.transcript = [{"role": "user", "content": question}]
        answer = await again.turn(2, question)
        assert "whitening" in answer.lower()
        asked = [r for r in fake_llm.records if "whitening treatments" in (r.last_user_text or "")]
        assert len(asked) == 2  # the first stream died with the replica; the question was asked again
    finally:
        await again.close()
