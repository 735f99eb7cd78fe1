"""The LLM agent against the fake OpenAI-compatible server, with the real ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from callray.agents.base import Agent, EndCall, Speech, ToolCall, ToolResult, Transfer, Turn, Usage
from callray.agents.llm import (
    AgentConfigError,
    LLMAgent,
    LLMUnavailableError,
    load_llm_agent,
)
from callray.agents.tools import idempotency_key
from callray.sim.fake_llm import FakeLLMServer, FakeLLMSettings, ScriptedReply, ScriptedToolCall, running_fake_llm

ROOT = Path(__file__).resolve().parents[1]
FAST = FakeLLMSettings(ttft_ms=5, tokens_per_s=0)


# --------------------------------------------------------------------------- helpers


class ToolServer:
    """A tiny local HTTP tool endpoint that records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (stdlib name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                outer.calls.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                if self.path.endswith("/fail"):
                    status, payload = 500, {"error": "calendar down"}
                else:
                    status, payload = 200, {"tool": self.path.rsplit("/", 1)[-1], "args": body, "slots": ["9:00", "14:30"]}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tool_server() -> Iterator[ToolServer]:
    server = ToolServer()
    server.thread.start()
    yield server
    server.close()


@contextmanager
def fakes(*settings: FakeLLMSettings) -> Iterator[list[FakeLLMServer]]:
    with ExitStack() as stack:
        yield [stack.enter_context(running_fake_llm(s)) for s in settings]


def config(*fakes_: FakeLLMServer, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "test-llm",
        "providers": [
            {"base_url": f.base_url, "model": f"model-{i}", "api_key_env": "CALLRAY_TEST_UNSET_KEY",
             "api_key_fallback": "fake-key"}
            for i, f in enumerate(fakes_)
        ],
        "system_prompt": "You are a receptionist. Keep it short.",
        "first_token_timeout_s": 2.0,
    }
    data.update(overrides)
    return data


def turn(text: str = "I would like a cleaning", *, call_id: str = "call-1", kind: str = "response",
         transcript: list[dict[str, Any]] | None = None, **kw: Any) -> Turn:
    transcript = transcript if transcript is not None else [
        {"role": "agent", "content": "Hello, how can I help?"},
        {"role": "user", "content": text},
    ]
    return Turn(call_id=call_id, kind=kind, transcript=transcript, state={}, **kw)  # type: ignore[arg-type]


async def collect(agent: LLMAgent, t: Turn) -> list[Any]:
    """What the agent yields, less its token counts (``test_usage_...`` checks those)."""
    return [out async for out in agent.respond(t) if not isinstance(out, Usage)]


def spoken(outputs: list[Any]) -> str:
    return "".join(o.text for o in outputs if isinstance(o, Speech))


# --------------------------------------------------------------------------- streaming


async def test_phrases_stream_and_first_sentence_precedes_stream_end() -> None:
    with fakes(FakeLLMSettings(ttft_ms=10, tokens_per_s=25, filler_sentences=3)) as [fake]:
        agent = LLMAgent.from_dict(config(fake))
        assert isinstance(agent, Agent)
        outputs, times = [], []
        async for out in agent.respond(turn("I would like a cleaning on Tuesday")):
            outputs.append(out)
            times.append(time.monotonic())
        await agent.aclose()
    rec = fake.records[0]
    assert isinstance(outputs[-1], Usage) and outputs[-1].completion_tokens > 0  # counted from the stream's end
    outputs = outputs[:-1]
    assert all(isinstance(o, Speech) for o in outputs) and len(outputs) >= 4
    assert outputs[0].text == "You said cleaning Tuesday."  # a whole first sentence, alone, at its last token
    assert spoken(outputs) == "You said cleaning Tuesday. I can help with that. " + " ".join([
        "Let me take care of that for you.", "That should only take a moment.",
        "I have all the details I need.", "Is there anything else?"])
    assert rec.completed and rec.ended is not None
    assert times[0] < rec.ended  # released while the model was still streaming
    assert rec.body["model"] == "model-0" and rec.body["stream"] is True
    assert [m["role"] for m in rec.messages] == ["system", "assistant", "user"]


async def test_cancelling_the_respond_task_closes_the_upstream_stream() -> None:
    with fakes(FakeLLMSettings(ttft_ms=0, tokens_per_s=4, filler_sentences=3)) as [fake]:
        agent = LLMAgent.from_dict(config(fake))
        first = asyncio.Event()

        async def consume() -> None:
            async for out in agent.respond(turn("tell me everything")):
                if isinstance(out, Speech):
                    first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await fake.wait_for(lambda: fake.records[0].disconnected, timeout=3)
        assert not fake.records[0].completed
        await agent.aclose()


async def test_closing_the_generator_at_a_yield_closes_the_upstream_stream() -> None:
    with fakes(FakeLLMSettings(ttft_ms=0, tokens_per_s=4, filler_sentences=3)) as [fake]:
        agent = LLMAgent.from_dict(config(fake))
        gen = agent.respond(turn("tell me everything"))
        assert isinstance(await gen.__anext__(), Speech)
        await gen.aclose()
        assert await fake.wait_for(lambda: fake.records[0].disconnected, timeout=3)
        await agent.aclose()


# --------------------------------------------------------------------------- failures


async def test_first_token_timeout_retries_then_fails_over() -> None:
    with fakes(FakeLLMSettings(ttft_ms=5000), FAST) as [slow, good]:
        agent = LLMAgent.from_dict(config(slow, good, first_token_timeout_s=0.3))
        outputs = await collect(agent, turn("timeout test"))
        await agent.aclose()
        assert await slow.wait_for(lambda: all(r.disconnected for r in slow.records), timeout=3)
    assert "timeout test" in spoken(outputs)
    assert len(slow.records) == 2  # one retry on the same provider
    assert len(good.records) == 1


async def test_429_is_retried_on_the_same_provider() -> None:
    with fakes(FAST) as [fake]:
        fake.enqueue(ScriptedReply(status=429))
        agent = LLMAgent.from_dict(config(fake))
        outputs = await collect(agent, turn("rate limited"))
        await agent.aclose()
    assert [r.status for r in fake.records] == [429, 200]
    assert "rate limited" in spoken(outputs)


async def test_persistent_errors_fail_over_to_the_second_provider() -> None:
    with fakes(FakeLLMSettings(ttft_ms=0, error_rate=1.0, error_statuses=[429]), FAST) as [bad, good]:
        agent = LLMAgent.from_dict(config(bad, good))
        outputs = await collect(agent, turn("failover please"))
        await agent.aclose()
    assert [r.status for r in bad.records] == [429, 429]
    assert len(good.records) == 1 and "You said failover." in spoken(outputs)


async def test_all_providers_failing_raises_llm_unavailable() -> None:
    down = FakeLLMSettings(ttft_ms=0, error_rate=1.0, error_statuses=[500])
    with fakes(down, down) as [a, b]:
        agent = LLMAgent.from_dict(config(a, b))
        with pytest.raises(LLMUnavailableError) as info:
            await collect(agent, turn())
        await agent.aclose()
    assert "model-0" in str(info.value) and "model-1" in str(info.value) and "HTTP 500" in str(info.value)
    assert len(a.records) == 2 and len(b.records) == 2


async def test_non_retryable_status_skips_to_next_provider() -> None:
    with fakes(FakeLLMSettings(ttft_ms=0, api_key="other"), FAST) as [unauthorised, good]:
        agent = LLMAgent.from_dict(config(unauthorised, good))
        outputs = await collect(agent, turn("auth"))
        await agent.aclose()
    assert [r.status for r in unauthorised.records] == [401]
    assert "auth" in spoken(outputs)


async def test_failure_after_speech_started_raises_without_retry() -> None:
    with fakes(FAST, FAST) as [broken, spare]:
        broken.enqueue(ScriptedReply(text="First part is fine. Then it breaks here and more.", break_after_tokens=6))
        agent = LLMAgent.from_dict(config(broken, spare))
        outputs: list[Any] = []
        with pytest.raises(LLMUnavailableError, match="after speech had started"):
            async for out in agent.respond(turn()):
                outputs.append(out)
        await agent.aclose()
    assert spoken(outputs) == "First part is fine."
    assert len(broken.records) == 1 and not spare.records


# --------------------------------------------------------------------------- tools


def tool_config(tool_server: ToolServer, name: str = "check_availability", path: str = "", **kw: Any) -> dict:
    return {
        "name": name,
        "description": f"{name} tool",
        "parameters": {"type": "object", "properties": {"date": {"type": "string"}}},
        "url": f"{tool_server.url}/tools/{name}{path}",
        **kw,
    }


async def test_two_tool_calls_with_arguments_split_across_deltas(tool_server: ToolServer) -> None:
    args_a = {"date": "2025-03-04", "visit_type": "cleaning", "note": "mornings are better"}
    args_b = {"phone": "+15550100"}
    with fakes(FAST) as [fake]:
        fake.enqueue(ScriptedReply(
            text="Let me look.",
            tool_calls=[ScriptedToolCall(name="check_availability", arguments=args_a, id="call_a"),
                        ScriptedToolCall(name="lookup_patient", arguments=args_b, id="call_b")],
            arg_chunk_chars=2,
        ))
        agent = LLMAgent.from_dict(config(fake, tools=[
            tool_config(tool_server), tool_config(tool_server, "lookup_patient")]))
        t = turn()
        outputs = await collect(agent, t)
        await agent.aclose()
    calls = [o for o in outputs if isinstance(o, ToolCall)]
    results = [o for o in outputs if isinstance(o, ToolResult)]
    assert [(c.tool_call_id, c.name) for c in calls] == [("call_a", "check_availability"), ("call_b", "lookup_patient")]
    assert json.loads(calls[0].arguments) == args_a and json.loads(calls[1].arguments) == args_b
    assert [r.tool_call_id for r in results] == ["call_a", "call_b"] and all(r.successful for r in results)
    assert sorted(c["path"] for c in tool_server.calls) == ["/tools/check_availability", "/tools/lookup_patient"]
    assert {json.dumps(c["body"], sort_keys=True) for c in tool_server.calls} == {
        json.dumps(args_a, sort_keys=True), json.dumps(args_b, sort_keys=True)}
    assert outputs[0] == Speech("Let me look.")
    assert "I checked that for you" in spoken(outputs)
    assert t.cacheable is False
    second = fake.records[1].messages
    assert second[-3]["role"] == "assistant" and [c["id"] for c in second[-3]["tool_calls"]] == ["call_a", "call_b"]
    assert second[-3]["content"] == "Let me look."
    assert [m["role"] for m in second[-2:]] == ["tool", "tool"]
    assert "14:30" in second[-2]["content"]


async def test_repeated_request_reuses_the_tool_result(tool_server: ToolServer) -> None:
    args = {"date": "2025-03-04"}
    script = ScriptedReply(tool_calls=[ScriptedToolCall(name="check_availability", arguments=args)])
    with fakes(FAST) as [fake]:
        fake.enqueue(script, ScriptedReply(text="Nine works."), script, ScriptedReply(text="Nine works."))
        agent = LLMAgent.from_dict(config(fake, tools=[tool_config(tool_server, holding_line="One moment.")]))
        shared_results: dict[str, Any] = {}
        first = await collect(agent, turn(tool_results=shared_results))
        again = await collect(agent, turn(tool_results=shared_results))  # Retell asked again
        await agent.aclose()
    assert len(tool_server.calls) == 1
    key = idempotency_key("call-1", "check_availability", args)
    assert tool_server.calls[0]["headers"]["Idempotency-Key"] == key
    assert key in shared_results
    result_a = [o for o in first if isinstance(o, ToolResult)][0]
    result_b = [o for o in again if isinstance(o, ToolResult)][0]
    assert result_a.content == result_b.content and result_b.successful
    assert Speech("One moment.") in first and Speech("One moment.") not in again  # no wait, no holding line
    assert spoken(again) == "Nine works."


async def test_failing_tool_is_reported_and_the_model_told(tool_server: ToolServer) -> None:
    with fakes(FAST) as [fake]:
        fake.enqueue(ScriptedReply(tool_calls=[ScriptedToolCall(name="check_availability", arguments={"date": "x"})]))
        agent = LLMAgent.from_dict(config(fake, tools=[tool_config(tool_server, path="/fail")]))
        t = turn()
        outputs = await collect(agent, t)
        await agent.aclose()
    result = [o for o in outputs if isinstance(o, ToolResult)][0]
    assert not result.successful and "HTTP 500" in result.content
    assert not t.tool_results  # a failure is not remembered: a repeat may try again
    told = fake.records[1].messages[-1]
    assert told["role"] == "tool" and "The tool failed" in told["content"]
    assert spoken(outputs)  # the model then speaks


async def test_invalid_arguments_and_unknown_tool_do_not_call_anything(tool_server: ToolServer) -> None:
    with fakes(FAST) as [fake]:
        fake.enqueue(ScriptedReply(tool_calls=[
            ScriptedToolCall(name="check_availability", arguments='{"date": '),
            ScriptedToolCall(name="no_such_tool", arguments="{}")]))
        agent = LLMAgent.from_dict(config(fake, tools=[tool_config(tool_server)]))
        outputs = await collect(agent, turn())
        await agent.aclose()
    results = [o for o in outputs if isinstance(o, ToolResult)]
    assert [r.successful for r in results] == [False, False]
    assert "not valid JSON" in results[0].content and "unknown tool" in results[1].content
    assert not tool_server.calls


async def test_tool_steps_are_capped(tool_server: ToolServer) -> None:
    def loop_forever(body: dict) -> ScriptedReply:
        return ScriptedReply(tool_calls=[ScriptedToolCall(name="check_availability", arguments={"date": str(len(body["messages"]))})])

    with running_fake_llm(FAST, responder=loop_forever) as fake:
        agent = LLMAgent.from_dict(config(fake, max_tool_steps=2, tools=[tool_config(tool_server)]))
        outputs = await collect(agent, turn("loop"))
        await agent.aclose()
    assert len(fake.records) == 3
    assert [r.body.get("tool_choice") for r in fake.records] == ["auto", "auto", "none"]
    assert len(tool_server.calls) == 2
    assert "I checked that for you" in spoken(outputs)


async def test_end_call_says_closing_line_uninterruptibly_then_hangs_up() -> None:
    with fakes(FAST) as [fake]:
        fake.enqueue(ScriptedReply(tool_calls=[ScriptedToolCall(name="end_call")]))
        agent = LLMAgent.from_dict(config(fake, end_call={"closing_line": "Bye now."}))
        t = turn("that's all, bye")
        outputs = await collect(agent, t)
        await agent.aclose()
    assert outputs == [Speech("Bye now.", no_interruption_allowed=True), EndCall()]
    assert t.cacheable is False
    tools = fake.records[0].body["tools"]
    assert [x["function"]["name"] for x in tools] == ["end_call"]


async def test_transfer_call_says_handoff_then_transfers() -> None:
    with fakes(FAST) as [fake]:
        fake.enqueue(ScriptedReply(tool_calls=[ScriptedToolCall(name="transfer_call")]))
        agent = LLMAgent.from_dict(config(fake, transfer_call={
            "enabled": True, "transfer_number": "+14155550100", "handoff_line": "Connecting you."}))
        outputs = await collect(agent, turn("a human please"))
        await agent.aclose()
    # uninterruptible: a caller talking over the hand-off would cancel Retell's transfer
    assert outputs == [Speech("Connecting you.", no_interruption_allowed=True), Transfer("+14155550100")]


# --------------------------------------------------------------------------- prompt


async def test_dynamic_variables_fill_system_prompt_and_begin_message() -> None:
    call = {"call_id": "c9", "metadata": {"clinic": "Bright Smile"},
            "retell_llm_dynamic_variables": {"customer_name": "Ada"}}
    with fakes(FAST) as [fake]:
        agent = LLMAgent.from_dict(config(
            fake,
            system_prompt="You work at {clinic}. The caller is {{customer_name}}. Unknown: {nope}.",
            begin_message="Hi {customer_name}, welcome to {clinic}!",
        ))
        assert agent.begin_message({}, call) == "Hi Ada, welcome to Bright Smile!"
        assert agent.begin_message({}, {}) == "Hi, welcome to!"  # missing variables never crash
        await collect(agent, turn(call=call))
        await agent.aclose()
    system = fake.records[0].messages[0]
    assert system == {"role": "system", "content": "You work at Bright Smile. The caller is Ada. Unknown:."}


async def test_history_window_keeps_the_newest_turns() -> None:
    transcript = []
    for i in range(20):
        transcript.append({"role": "user", "content": f"user message number {i:02d}"})
        transcript.append({"role": "transfer_target", "content": "ignored"})
        transcript.append({"role": "agent", "content": f"agent answer number {i:02d}"})
    transcript.append({"role": "user", "content": "the latest question"})
    with fakes(FAST) as [fake]:
        agent = LLMAgent.from_dict(config(fake, history_chars=120))
        await collect(agent, turn(transcript=transcript))
        await agent.aclose()
    messages = fake.records[0].messages
    history = messages[1:]
    assert history[-1] == {"role": "user", "content": "the latest question"}
    assert sum(len(m["content"]) for m in history) <= 120
    assert [m["content"] for m in history[:-1]] == [
        "user message number 18", "agent answer number 18", "user message number 19", "agent answer number 19"]
    assert all(m["role"] in ("user", "assistant") for m in history)


async def test_reminder_turn_asks_for_a_check_in() -> None:
    with fakes(FAST) as [fake]:
        agent = LLMAgent.from_dict(config(fake, reminder_prompt="Check in briefly."))
        outputs = await collect(agent, turn("cleaning", kind="reminder"))
        await agent.aclose()
    assert fake.records[0].messages[-1] == {"role": "system", "content": "Check in briefly."}
    assert spoken(outputs).startswith("Are you still there?")


def test_cache_key_only_when_enabled_and_for_responses() -> None:
    data = config(FakeLLMServer(base_url="http://127.0.0.1:9/v1", state=None))  # type: ignore[arg-type]
    assert LLMAgent.from_dict(data).cache_key(turn("What are your hours?")) is None
    agent = LLMAgent.from_dict({**data, "cache": True})
    assert agent.cache_key(turn("What are your HOURS?!")) == "what are your hours"
    assert agent.cache_key(turn("What are your hours?", kind="reminder")) is None
    assert agent.fallback_line


# --------------------------------------------------------------------------- config


def test_a_remote_provider_without_its_key_fails_at_start_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALLRAY_TEST_UNSET_KEY", raising=False)
    data = config(FakeLLMServer(base_url="https://llm.example.com/v1", state=None))  # type: ignore[arg-type]
    with pytest.raises(AgentConfigError, match=r"agent\.yaml: providers\.0\.api_key_env: .*CALLRAY_TEST_UNSET_KEY") \
            as err:
        LLMAgent.from_dict(data, source="agent.yaml")
    assert "fake-key" not in str(err.value)  # the fallback is for local servers only, and never echoed
    monkeypatch.setenv("CALLRAY_TEST_UNSET_KEY", "sk-real")
    assert LLMAgent.from_dict(data, source="agent.yaml").name == "test-llm"


@pytest.mark.parametrize("env, url", [
    ({}, "http://127.0.0.1:8100/v1"),  # nothing set: the local fake LLM
    ({"OPENAI_API_KEY": "sk-x"}, "https://api.openai.com/v1"),  # a key is all an OpenAI user sets
    ({"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "https://eu.example.com/v1"}, "https://eu.example.com/v1"),
    ({"OPENAI_BASE_URL": "http://localhost:11434/v1"}, "http://localhost:11434/v1"),  # Ollama: no key needed
])
def test_the_shipped_llm_agent_finds_its_provider_in_the_environment(monkeypatch: pytest.MonkeyPatch, env, url):
    from callray.agents.registry import load_agent
    from callray.settings import PROJECT_DIR

    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    agent = load_agent(PROJECT_DIR / "config/agents/assistant_llm.yaml")
    assert agent._providers[0].label == f"gpt-4o-mini at {url}"
    monkeypatch.setenv("OPENAI_MODEL", "gpt-4o")
    assert load_agent(PROJECT_DIR / "config/agents/assistant_llm.yaml")._providers[0].model == "gpt-4o"
    monkeypatch.setenv("OPENAI_BASE_URL", "https://remote.example.com/v1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(AgentConfigError, match="OPENAI_API_KEY"):
        load_agent(PROJECT_DIR / "config/agents/assistant_llm.yaml")


def test_agent_files_read_the_environment_and_name_an_unset_variable(tmp_path: Path, monkeypatch) -> None:
    from callray.agents.config import read_agent_yaml

    monkeypatch.setenv("CALLRAY_TEST_PROMPT", "Be brief.")
    monkeypatch.delenv("CALLRAY_TEST_NOPE", raising=False)
    path = tmp_path / "a.yaml"
    path.write_text("kind: llm\nsystem_prompt: ${CALLRAY_TEST_PROMPT}\nname: ${CALLRAY_TEST_NOPE:-fallback}\n")
    assert read_agent_yaml(path)["system_prompt"] == "Be brief." and read_agent_yaml(path)["name"] == "fallback"
    path.write_text("kind: llm\nname: ${CALLRAY_TEST_NOPE}\n")
    with pytest.raises(AgentConfigError, match=r"a\.yaml: name: environment variable CALLRAY_TEST_NOPE is not set"):
        read_agent_yaml(path)


def test_validation_errors_name_file_and_field_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "kind: llm\nname: x\nsystem_prompt: hi\nproviders:\n  - base_url: http://h/v1\n    modle: gpt\n"
        "temperature: 9\n"
    )
    with pytest.raises(AgentConfigError) as info:
        load_llm_agent(path)
    message = str(info.value)
    assert f"{path}: providers.0.model: Field required" in message
    assert f"{path}: providers.0.modle: unknown field (check the spelling)" in message
    assert f"{path}: temperature:" in message and "(got 9)" in message
    path.write_text("name: [unclosed")
    with pytest.raises(AgentConfigError, match="invalid YAML"):
        load_llm_agent(path)
    with pytest.raises(AgentConfigError, match="transfer_number is required"):
        LLMAgent.from_dict({"name": "x", "system_prompt": "p", "providers": [{"base_url": "http://h/v1", "model": "m",
                            "api_key_fallback": "k"}], "transfer_call": {"enabled": True}}, "t.yaml")


async def test_example_config_loads_and_talks_to_the_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    agent = load_llm_agent(ROOT / "config/agents/assistant_llm.yaml")
    assert agent.name == "dental-assistant"
    assert agent.begin_message({}, {"retell_llm_dynamic_variables": {"customer_name": "Sam"}}).startswith("Hi Sam,")
    assert [t.name for t in agent.config.tools] == ["check_availability"]
    with fakes(FAST) as [fake]:
        agent.config.providers[0].base_url = fake.base_url
        agent = LLMAgent(agent.config, source="assistant_llm.yaml")
        outputs = await collect(agent, turn("book a cleaning"))
        await agent.aclose()
    assert "cleaning" in spoken(outputs)
    assert {x["function"]["name"] for x in fake.records[0].body["tools"]} == {
        "check_availability", "end_call", "transfer_call"}


def test_stream_lines_are_read_as_the_sdk_would_and_error_events_break_the_stream() -> None:
    from callray.agents.llm import _BrokenStream, stream_delta

    assert stream_delta('data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}') == {"content": "Hi"}
    assert stream_delta('data: {"choices":[]}') is None  # e.g. the usage chunk
    for other in ("", ": keep-alive", "event: message", "data: [DONE]"):
        assert stream_delta(other) is None
    for broken in ('data: {"error": {"message": "overloaded"}}', "data: {not json", "data: [1, 2]"):
        with pytest.raises(_BrokenStream):
            stream_delta(broken)
