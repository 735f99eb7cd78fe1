"""The LLM agent's Python function tools, and what it remembers of its tools: the history it
rebuilds from Retell's transcript_with_tool_calls and tool idempotency scoped to one turn."""

from __future__ import annotations

import asyncio
import json
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from callray.agents.base import ToolCall, ToolResult, Turn, Usage
from callray.agents.config import AgentConfigError
from callray.agents.llm import LLMAgent, history_messages, paired_tool_messages
from callray.agents.registry import AgentRegistry
from callray.outbox import Outbox
from callray.host import Host
from callray.protocol import parse_event
from callray.settings import CallraySettings
from callray.sim.fake_llm import FakeLLMSettings, ScriptedReply, ScriptedToolCall, running_fake_llm
from callray.stores.memory import MemoryStateStore

TOOLS = """
    import asyncio
    import time
    from callray import Turn

    CALLS = []

    def lookup_order(order_id: str, turn: Turn, verbose: bool = False) -> dict:
        '''Find an order by its number.'''
        CALLS.append((order_id, turn.call_id))
        return {"order": order_id, "status": "shipped"}

    async def slow_stock(sku: str) -> str:
        '''How many items are in stock.'''
        await asyncio.sleep(5)
        return "3"

    def broken(x: int) -> str:
        '''Always fails.'''
        raise ValueError("warehouse offline")

    def blocking(x: int) -> str:
        '''Blocks its thread, not the loop.'''
        time.sleep(0.2)
        return f"blocked {x}"
"""


def agent_with_tools(tmp_path: Path, fake, **extra) -> tuple[Path, str]:
    module = f"tools_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(TOOLS))
    data = {
        "kind": "llm", "name": "shop",
        "providers": [{"base_url": fake.base_url, "model": "m", "api_key_env": "CALLRAY_TEST_UNSET_KEY",
                       "api_key_fallback": "k"}],
        "system_prompt": "You are a shop assistant.",
        "tools": [{"function": f"{module}:lookup_order", "holding_line": "Let me look."},
                  {"function": f"{module}:slow_stock", "timeout_s": 0.2},
                  {"function": f"{module}:broken"}, {"function": f"{module}:blocking", "name": "wait_a_bit"}],
        **extra,
    }
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, module


def turn(text: str, **kw) -> Turn:
    return Turn(call_id="call-9", kind="response", transcript=[{"role": "user", "content": text}], state={}, **kw)


async def test_function_tools_are_described_from_their_signatures_and_run_sync_async_and_failing(tmp_path):
    import sys

    with running_fake_llm(FakeLLMSettings(ttft_ms=5, tokens_per_s=0)) as fake:
        path, module = agent_with_tools(tmp_path, fake)
        agent = AgentRegistry.from_settings(CallraySettings(agents={"default": "shop", "files": {"shop": str(path)}}).agents).get("shop")
        fake.enqueue(ScriptedReply(tool_calls=[
            ScriptedToolCall(id="t1", name="lookup_order", arguments={"order_id": "A-17"}),
            ScriptedToolCall(id="t2", name="slow_stock", arguments={"sku": "mug"}),
            ScriptedToolCall(id="t3", name="broken", arguments={"x": 1}),
            ScriptedToolCall(id="t4", name="lookup_order", arguments={"order_id": 5}),  # wrong type
            ScriptedToolCall(id="t5", name="wait_a_bit", arguments={"x": 2}),
        ]), ScriptedReply(text="Your order has shipped."))
        outputs = [o async for o in agent.respond(turn("where is my order A-17?")) if not isinstance(o, Usage)]
        await agent.aclose()
    specs = {t["function"]["name"]: t["function"] for t in fake.records[0].body["tools"]}
    assert specs["lookup_order"]["description"] == "Find an order by its number."
    params = specs["lookup_order"]["parameters"]
    assert set(params["properties"]) == {"order_id", "verbose"} and params["required"] == ["order_id"]  # no turn
    assert [o.name for o in outputs if isinstance(o, ToolCall)] == ["lookup_order", "slow_stock", "broken",
                                                                   "lookup_order", "wait_a_bit"]
    results = {o.tool_call_id: o for o in outputs if isinstance(o, ToolResult)}
    assert json.loads(results["t1"].content) == {"order": "A-17", "status": "shipped"} and results["t1"].successful
    assert not results["t2"].successful and "did not finish within 0.2 s" in results["t2"].content
    assert not results["t3"].successful and "ValueError: warehouse offline" in results["t3"].content
    assert not results["t4"].successful and "order_id" in results["t4"].content
    assert results["t5"].content == "blocked 2" and results["t5"].successful
    assert sys.modules[module].CALLS == [("A-17", "call-9")]  # the turn reached the tool; the bad call never ran
    told = {m["tool_call_id"]: m["content"] for m in fake.records[1].messages if m["role"] == "tool"}
    assert "The tool failed" in told["t3"] and told["t1"] == results["t1"].content


def test_a_function_tool_that_cannot_be_described_fails_at_start_naming_the_field(tmp_path):
    with running_fake_llm(FakeLLMSettings()) as fake:
        path, module = agent_with_tools(tmp_path, fake)
        data = yaml.safe_load(path.read_text())
        data["tools"] = [{"function": f"{module}:nothing_here"}]
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(AgentConfigError, match=r"shop.yaml: tools.0.function: module .* has no 'nothing_here'"):
            LLMAgent.from_dict(data, source=str(path))
        data["tools"] = [{"function": f"{module}:lookup_order", "name": "has spaces"}]
        with pytest.raises(AgentConfigError, match="tools.0.function.name: tool name 'has spaces' must match"):
            LLMAgent.from_dict(data, source=str(path))


# --------------------------------------------------------------------------- history with tool calls


HISTORY = [
    {"role": "user", "content": "Where is order A-17?", "words": [{"word": "Where", "start": 0, "end": 0.2}]},
    {"role": "tool_call_invocation", "tool_call_id": "t1", "name": "lookup_order", "arguments": '{"order_id":"A-17"}'},
    {"role": "tool_call_result", "tool_call_id": "t1", "content": '{"status":"shipped"}'},
    {"role": "agent", "content": "It has shipped."},
    {"role": "tool_call_invocation", "tool_call_id": "t9", "name": "lookup_order", "arguments": "{}"},  # no result
    {"role": "node_transition", "former_node_name": "a"},
    {"role": "user", "content": "And when does it arrive?"},
]


def test_the_model_sees_earlier_tool_calls_and_results_in_place():
    messages = paired_tool_messages(history_messages(HISTORY))
    assert messages == [
        {"role": "user", "content": "Where is order A-17?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id":"A-17"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": '{"status":"shipped"}'},
        {"role": "assistant", "content": "It has shipped."},
        {"role": "user", "content": "And when does it arrive?"},
    ]
    t = turn("", transcript_with_tool_calls=HISTORY)
    assert [e.name for e in t.tool_history] == ["lookup_order", "lookup_order"]
    assert t.tool_history[0].result == '{"status":"shipped"}' and t.tool_history[1].result is None


def test_a_history_cut_by_the_budget_never_sends_a_result_without_its_call():
    messages = paired_tool_messages(history_messages(HISTORY)[2:])  # the call itself fell outside the budget
    assert messages[0] == {"role": "assistant", "content": "It has shipped."}


# --------------------------------------------------------------------------- across turns, on a host


async def test_tool_results_reach_the_next_turn_and_a_re_asked_request_reuses_them(tmp_path):
    """Retell resends the transcript with the tool frames callray sent; a superseded request
    asked again reuses its tool's result, and a later turn calls the tool afresh."""
    import sys

    def reply(body):
        messages = body["messages"]
        if messages[-1]["role"] == "tool":
            return ScriptedReply(text="It has shipped.", ttft_ms=300)
        if "arrive" in messages[-1]["content"]:
            return ScriptedReply(text="Tomorrow.")
        return ScriptedReply(tool_calls=[ScriptedToolCall(name="lookup_order", arguments={"order_id": "A-17"})])

    with running_fake_llm(FakeLLMSettings(ttft_ms=5, tokens_per_s=0), responder=reply) as fake:
        path, module = agent_with_tools(tmp_path, fake)
        settings = CallraySettings(agents={"default": "shop", "files": {"shop": str(path)}},
                                   turns={"greeting_wait_ms": 0})
        host = Host(settings, AgentRegistry.from_settings(settings.agents), store=MemoryStateStore())
        outbox = Outbox("s1")
        conversation = await host.attach("c1", outbox)
        history: list[dict] = [{"role": "user", "content": "Where is order A-17?"}]

        def ask(rid: int) -> None:
            conversation.handle(parse_event({"interaction_type": "response_required", "response_id": rid,
                                             "transcript": [h for h in history if h["role"] in ("user", "agent")],
                                             "transcript_with_tool_calls": list(history)}))

        async def answer(rid: int) -> str:
            parts = []
            async with asyncio.timeout(10):
                async for frame in outbox.frames():
                    data = json.loads(frame.to_json())
                    if data["response_type"] in ("tool_call_invocation", "tool_call_result"):
                        history.append({"role": data["response_type"], **{k: v for k, v in data.items()
                                                                          if k != "response_type"}})
                    if data.get("response_id") == rid:
                        parts.append(data["content"])
                        if data["content_complete"]:
                            return "".join(parts)

        ask(1)
        while not (sys.modules.get(module) and sys.modules[module].CALLS):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the tool ran; the model is composing its answer (300 ms)
        ask(2)  # the caller kept talking: Retell asks again
        assert "It has shipped." in await answer(2)
        assert sys.modules[module].CALLS == [("A-17", "c1")]  # re-asked: the tool did not act twice
        history.append({"role": "agent", "content": "It has shipped."})
        history.append({"role": "user", "content": "And when does it arrive?"})
        ask(3)
        assert await answer(3) == "Tomorrow."
        sent = fake.records[-1].messages
        tool_turn = [m for m in sent if m["role"] == "tool" or m.get("tool_calls")]
        assert tool_turn and json.loads(tool_turn[-1]["content"]) == {"order": "A-17", "status": "shipped"}
        history.append({"role": "agent", "content": "Tomorrow."})
        history.append({"role": "user", "content": "Where is order A-17 again?"})
        ask(4)
        assert "It has shipped." in await answer(4)
        assert sys.modules[module].CALLS == [("A-17", "c1")] * 2  # a later turn asks the tool afresh
        await host.close()
        await host.agents.aclose()


def test_two_tools_of_one_name_are_refused_at_start(tmp_path):
    with running_fake_llm(FakeLLMSettings()) as fake:
        path, module = agent_with_tools(tmp_path, fake)
        data = yaml.safe_load(path.read_text())
        data["tools"] = [{"function": f"{module}:lookup_order"},
                         {"name": "lookup_order", "description": "d", "url": "http://127.0.0.1:9/x"}]
        with pytest.raises(AgentConfigError, match="tools.1: duplicate tool name 'lookup_order'"):
            LLMAgent.from_dict(data, source=str(path))
