"""Agents written in Python (``kind: python``), in plain asyncio: loading from a folder, options,
errors that name the file and field, and a user's agent misbehaving without hurting the call."""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
import uuid
from pathlib import Path

import pytest

import callray
from callray.agents.config import AgentConfigError
from callray.agents.flow import FlowAgent
from callray.agents.registry import AgentRegistry, load_agent
from callray.outbox import Outbox
from callray.host import Host
from callray.settings import PROJECT_DIR, CallraySettings
from callray.sim.client import validate_frame
from callray.sim.fake_llm import FakeLLMSettings, ScriptedReply, ScriptedToolCall, running_fake_llm
from callray.stores.memory import MemoryStateStore

ECHO = PROJECT_DIR / "examples/echo/echo.yaml"


def agent_folder(tmp_path: Path, code: str, yaml: str = "", cls: str = "Agent1") -> Path:
    """A folder with an agent file and its module (a name of its own: modules are cached)."""
    module = f"agent_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(code))
    path = tmp_path / f"{module}.yaml"
    path.write_text(f'kind: python\nclass: "{module}:{cls}"\n' + textwrap.dedent(yaml))
    return path


def make_host(files: dict[str, str], store: MemoryStateStore | None = None, **turns) -> Host:
    settings = CallraySettings(agents={"default": next(iter(files)), "files": files},
                               turns={"greeting_wait_ms": 0, "latency_budget_ms": 800, **turns})
    return Host(settings, AgentRegistry.from_settings(settings.agents), store=store or MemoryStateStore(),
                events=Recorder())


class Recorder:
    def __init__(self) -> None:
        self.events: list = []

    def emit(self, event) -> None:
        self.events.append(event)


class Call:
    """One socket of a call on a host, read frame by frame."""

    def __init__(self, host: Host, call_id: str = "c1", connection: str = "s1"):
        self.host, self.call_id, self.outbox = host, call_id, Outbox(connection)
        self.frames: list[dict] = []

    async def open(self, agent: str | None = None) -> Call:
        await self.host.attach(self.call_id, self.outbox, agent)
        return self

    def send(self, rid: int, text: str, kind: str = "response_required", history: list | None = None) -> None:
        event = {"interaction_type": kind, "response_id": rid,
                 "transcript": [{"role": "user", "content": text}] if text else []}
        if history is not None:
            event["transcript_with_tool_calls"] = history
        self.host.calls[self.call_id].handle(callray.protocol.parse_event(event))

    async def until_complete(self, rid: int, timeout: float = 5) -> list[dict]:
        """Frames up to the completion of ``rid`` (each judged as Retell would)."""
        async with asyncio.timeout(timeout):
            async for frame in self.outbox.frames():
                data, issues = validate_frame(frame.to_json())
                assert data is not None and not issues, (frame.to_json(), issues)
                self.frames.append(data)
                if data.get("response_id") == rid and data.get("content_complete"):
                    return [f for f in self.frames if f.get("response_id") == rid]
        raise AssertionError("stream ended")

    async def turn(self, rid: int, text: str, **kw) -> dict:
        """Ask, wait for the completion; the answer's text and its completing frame."""
        self.send(rid, text, **kw)
        frames = await self.until_complete(rid)
        return {"text": "".join(f["content"] for f in frames), **frames[-1]}


# --------------------------------------------------------------------------- loading


async def test_the_echo_example_answers_from_its_folder_and_its_state_survives_deactivation():
    store = MemoryStateStore()
    host = make_host({"echo": str(ECHO)}, store)
    call = await Call(host).open()
    assert (await call.until_complete(0))[0]["content"] == "Hi, I'm the echo agent. Say something!"
    assert (await call.turn(1, "hello"))["text"] == "You said: hello. That was message 1."
    await host.deactivate("c1")  # saved and dropped: the next socket activates it from the store
    again = await Call(make_host({"echo": str(ECHO)}, store), connection="s2").open()
    assert (await again.until_complete(0))[0]["content"] == ""  # greeted once per call
    answer = await again.turn(2, "bye now")
    assert answer["text"] == "You said: bye now. That was message 2." and answer["end_call"] is True


def test_the_public_api_is_importable_from_callray():
    for name in ("Agent", "Turn", "Speech", "EndCall", "Transfer", "PressDigit", "UpdateAgent", "Metadata",
                 "ToolCall", "ToolResult", "Usage", "phrases"):
        assert hasattr(callray, name), name
    agent = load_agent(ECHO)
    assert isinstance(agent, callray.Agent) and agent.version == "1" and agent.cache_key(None) is None


async def test_options_go_through_the_agents_pydantic_model(tmp_path):
    code = """
        from pydantic import BaseModel, Field
        from callray import Agent

        class Agent1(Agent):
            class Options(BaseModel):
                shop: str
                discount: int = Field(ge=0, le=50)

            async def respond(self, turn):
                yield f"{self.options.shop} gives {self.options.discount} percent off."
    """
    good = agent_folder(tmp_path, code, "version: '7'\noptions: {shop: Mel's, discount: 10}\n")
    host = make_host({"shop": str(good)})
    call = await Call(host).open()
    assert (await call.turn(1, "deals?"))["text"] == "Mel's gives 10 percent off."
    assert host.agents.get("shop").version == "7"
    bad = agent_folder(tmp_path, code, "options: {shop: Mel's, discount: 80}\n")
    with pytest.raises(AgentConfigError) as err:
        load_agent(bad)
    assert str(bad) in str(err.value) and "options.discount" in str(err.value)


@pytest.mark.parametrize("yaml, code, expected", [
    ('kind: python\n', "", "class: Field required"),
    ('kind: python\nclass: "no_colon"\n', "", "class: 'no_colon' is not an import path"),
    ('kind: python\nclass: "surely_missing_module_x:A"\n', "", "no module 'surely_missing_module_x'"),
    (None, "from callray import Agent\n", "has no 'Agent1'"),
    (None, "class Agent1:\n    async def respond(self, turn):\n        yield 'x'\n", "is not a subclass of callray.Agent"),
    (None, "from callray import Agent\nclass Agent1(Agent):\n    async def respond(self, turn):\n        return 'x'\n",
     "respond must be an async generator"),
    (None, "from callray import Agent\nclass Agent1(Agent):\n    async def respond(self, turn):\n        yield 'x'\n",
     "unexpected keyword argument 'colour'"),
    (None, "raise ImportError('a dependency is missing')\n", "ImportError: a dependency is missing"),
    ('kind: python\nclass: "x:Y"\nsurprise: 1\n', "", "surprise: unknown field"),
])
def test_a_bad_python_agent_file_names_the_file_and_the_field(tmp_path, yaml, code, expected):
    if yaml is None:
        path = agent_folder(tmp_path, code, "options: {colour: red}\n" if "colour" in expected else "")
    else:
        path = tmp_path / "agent.yaml"
        path.write_text(yaml)
    with pytest.raises(AgentConfigError) as err:
        load_agent(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


def test_a_module_of_the_same_name_in_two_agent_folders_is_refused_not_confused(tmp_path):
    code = "from callray import Agent\nclass Agent1(Agent):\n    async def respond(self, turn):\n        yield 'x'\n"
    name = f"shared_{uuid.uuid4().hex[:6]}"
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{name}.py").write_text(code)
        (tmp_path / folder / "agent.yaml").write_text(f'kind: python\nclass: "{name}:Agent1"\n')
    load_agent(tmp_path / "one" / "agent.yaml")
    with pytest.raises(AgentConfigError, match="already imported from .*give the agent's module a name of its own"):
        load_agent(tmp_path / "two" / "agent.yaml")


def test_a_class_not_beside_the_file_is_found_on_sys_path(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text('kind: python\nclass: "tests.scripted_agent:ScriptedAgent"\n')
    assert load_agent(path).name == "scripted"


# --------------------------------------------------------------------------- misbehaving agents


MISBEHAVING = """
    import asyncio
    from callray import Agent, Speech

    class Agent1(Agent):
        fallback_line = "Sorry, say that again?"

        async def respond(self, turn):
            text = turn.last_user_text
            if text == "raise":
                yield Speech("Let me see.")
                raise RuntimeError("the CRM is down")
            if text == "hang":
                await asyncio.sleep(3600)
            if text == "garbage":
                yield 42
            if text == "unsaveable":
                turn.state["socket"] = object()
            turn.state["ok"] = turn.state.get("ok", 0) + 1
            yield "Fine."
"""


async def test_an_agent_that_raises_hangs_or_yields_garbage_gives_the_fallback_and_the_call_goes_on(tmp_path, caplog):
    host = make_host({"bad": str(agent_folder(tmp_path, MISBEHAVING))}, agent_timeout_s=0.5, latency_budget_ms=100,
                     holding_phrases=["One moment."])
    call = await Call(host).open()
    with caplog.at_level(logging.WARNING, logger="callray.conversation"):
        raised = await call.turn(1, "raise")
    assert raised["text"] == "Let me see. Sorry, say that again?"
    record = next(r for r in caplog.records if "agent bad failed" in r.getMessage())
    assert record.call_id == "c1" and "the CRM is down" in "".join(logging.Formatter().formatException(record.exc_info))
    assert (await call.turn(2, "hang"))["text"] == "One moment. Sorry, say that again?"  # budget, then timeout
    assert (await call.turn(3, "garbage"))["text"] == "Sorry, say that again?"
    assert (await call.turn(4, "fine"))["text"] == "Fine."  # the same call answers on
    await asyncio.sleep(0.01)  # a turn's event follows its completing frame
    errors = [(e.response_id, e.agent_error, e.fallback) for e in host.events.events if e.type == "call.turn"]
    assert errors == [(1, "RuntimeError", True), (2, "TimeoutError", True), (3, "AgentOutputError", True), (4, None, False)]


async def test_a_state_that_cannot_be_saved_is_refused_and_the_last_good_state_kept(tmp_path, caplog):
    store = MemoryStateStore()
    host = make_host({"bad": str(agent_folder(tmp_path, MISBEHAVING))}, store)
    call = await Call(host).open()
    await call.turn(1, "fine")
    with caplog.at_level(logging.ERROR, logger="callray.conversation"):
        assert (await call.turn(2, "unsaveable"))["text"] == "Fine."
    assert "not JSON" in caplog.text
    await host.deactivate("c1")
    assert (await store.load("c1")).agent_state == {"ok": 1}  # saved, without the turn that broke it


async def test_a_greeting_that_raises_lets_the_caller_speak_first(tmp_path):
    code = """
        from callray import Agent
        class Agent1(Agent):
            def begin_message(self, state, call):
                raise KeyError("customer")
            async def respond(self, turn):
                yield "Hi."
    """
    call = await Call(make_host({"a": str(agent_folder(tmp_path, code))})).open()
    assert (await call.until_complete(0))[0]["content"] == ""
    assert (await call.turn(1, "hello"))["text"] == "Hi."


async def test_a_greeting_with_call_variables_waits_for_call_details(tmp_path):
    code = """
        from callray import Agent
        class Agent1(Agent):
            greeting = "Hi {customer_name}, welcome back."
            async def respond(self, turn):
                yield f"Your number is {turn.variables['from_number']}."
    """
    settings = CallraySettings(agents={"default": "a", "files": {"a": str(agent_folder(tmp_path, code))}})
    assert settings.turns.greeting_wait_ms is None  # the default waits only for greetings that need the call
    host = Host(settings, AgentRegistry.from_settings(settings.agents), store=MemoryStateStore())
    call = await Call(host).open()
    await asyncio.sleep(0.1)
    assert call.outbox.drain() == []
    host.calls["c1"].handle(callray.protocol.parse_event({"interaction_type": "call_details", "call": {
        "from_number": "+15550001111", "retell_llm_dynamic_variables": {"customer_name": "Ada"}}}))
    assert (await call.until_complete(0))[0]["content"] == "Hi Ada, welcome back."
    assert (await call.turn(1, "what's my number?"))["text"] == "Your number is +15550001111."


# --------------------------------------------------------------------------- what an agent can send


async def test_update_agent_metadata_and_an_uninterruptible_transfer(tmp_path):
    code = """
        from callray import Agent, Metadata, Speech, Transfer, UpdateAgent
        class Agent1(Agent):
            async def respond(self, turn):
                yield UpdateAgent(responsiveness=0.4, reminder_trigger_ms=5000)
                yield Metadata({"screen": "transfer", "queue": 2})
                yield Speech("Putting you through to billing.")
                yield Transfer("+15550002222", show_transferee_as_caller=True)
    """
    call = await Call(make_host({"a": str(agent_folder(tmp_path, code))})).open()
    await call.until_complete(0)
    frames = await call.turn(1, "billing please")
    assert call.frames[1:3] == [
        {"response_type": "update_agent", "agent_config": {"responsiveness": 0.4, "reminder_trigger_ms": 5000}},
        {"response_type": "metadata", "metadata": {"screen": "transfer", "queue": 2}},
    ]
    assert frames["transfer_number"] == "+15550002222" and frames["show_transferee_as_caller"] is True
    assert frames["no_interruption_allowed"] is True  # a barge-in would cancel Retell's transfer


def test_a_flow_intent_sends_update_agent_and_metadata(tmp_path):
    agent = FlowAgent.from_dict({
        "name": "f", "version": "1", "greeting": "Hi.", "fallback_line": "Pardon?", "reminder_line": "Still there?",
        "intents": [{"name": "slow", "keywords": ["slow"], "answer": "I'll wait for you.",
                     "update_agent": {"responsiveness": 0.2}, "metadata": {"mode": "patient"}}],
        "escalation": {"keywords": ["human"], "handoff_line": "Connecting you.", "transfer_number": "+15550003333",
                       "show_transferee_as_caller": False},
    })

    async def outputs(text):
        turn = callray.Turn(call_id="c", kind="response", transcript=[{"role": "user", "content": text}], state={})
        return [o async for o in agent.respond(turn)]

    assert asyncio.run(outputs("please go slow")) == [
        callray.UpdateAgent(responsiveness=0.2), callray.Metadata({"mode": "patient"}), callray.Speech("I'll wait for you.")]
    assert asyncio.run(outputs("a human please")) == [
        callray.Speech("Connecting you.", no_interruption_allowed=True), callray.Transfer("+15550003333", False)]


# --------------------------------------------------------------------------- the port of Retell's demo


THERAPIST = PROJECT_DIR / "examples/therapist/therapist.yaml"


async def test_the_port_of_retells_demo_streams_its_answer_and_hangs_up_with_end_call(monkeypatch):
    with running_fake_llm(FakeLLMSettings(ttft_ms=20, tokens_per_s=400)) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        monkeypatch.setenv("OPENAI_MODEL", "fake-model")
        host = make_host({"therapist": str(THERAPIST)})
        call = await Call(host).open()
        assert "personal AI therapist" in (await call.until_complete(0))[0]["content"]
        fake.enqueue(ScriptedReply(text="That sounds hard. What happened today?"))
        answer = await call.turn(1, "I feel stressed")
        assert answer["text"] == "That sounds hard. What happened today?" and "end_call" not in answer
        body = fake.records[0].body
        assert body["model"] == "fake-model" and body["tools"][0]["function"]["name"] == "end_call"
        assert body["messages"][-1] == {"role": "user", "content": "I feel stressed"}
        fake.enqueue(ScriptedReply(tool_calls=[ScriptedToolCall(name="end_call", arguments={"message": "Take care."})]))
        goodbye = await call.turn(2, "I want to stop now")
        assert goodbye["text"] == "Take care." and goodbye["end_call"] is True
        assert goodbye["no_interruption_allowed"] is True
        turns = [e for e in host.events.events if e.type == "call.turn"]
        assert turns[0].completion_tokens > 0 and turns[0].prompt_tokens > 0  # usage from the stream
        await host.close()
        await host.agents.aclose()
    assert json.loads(json.dumps(call.frames))  # every frame was plain JSON
