"""The fake OpenAI-compatible server, driven by the real ``openai`` client."""

from __future__ import annotations

import json

import openai
import pytest

from callray.sim.fake_llm import (
    FakeLLMSettings,
    ScriptedReply,
    ScriptedToolCall,
    echo_reply,
    parse_args,
    running_fake_llm,
)

FAST = FakeLLMSettings(ttft_ms=5, tokens_per_s=0)


def client(base_url: str, key: str = "test-key") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


def user(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


async def test_stream_parses_and_echoes_the_callers_words() -> None:
    with running_fake_llm(FAST) as fake:
        llm = client(fake.base_url)
        stream = await llm.chat.completions.create(
            model="m", messages=user("caller 17 wants a cleaning"), stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finish, usage = [], None, None
        async with stream:
            async for chunk in stream:
                assert chunk.object == "chat.completion.chunk"
                if chunk.usage:
                    usage = chunk.usage
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
        await llm.close()
    text = "".join(pieces)
    assert text == echo_reply(user("caller 17 wants a cleaning"))
    assert "caller 17 wants cleaning" in text
    assert len([p for p in pieces if p]) > 5  # streamed token by token
    assert finish == "stop" and usage is not None and usage.completion_tokens > 5
    rec = fake.records[0]
    assert rec.completed and not rec.disconnected
    assert rec.headers["authorization"] == "Bearer test-key"
    assert rec.last_user_text == "caller 17 wants a cleaning"


async def test_non_stream_and_distinct_answers_per_caller() -> None:
    with running_fake_llm(FAST) as fake:
        llm = client(fake.base_url)
        a = await llm.chat.completions.create(model="m", messages=user("alpha caller"))
        b = await llm.chat.completions.create(model="m", messages=user("bravo caller"))
        await llm.close()
    assert "alpha" in a.choices[0].message.content and "bravo" not in a.choices[0].message.content
    assert "bravo" in b.choices[0].message.content
    assert a.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("status, error", [(429, openai.RateLimitError), (500, openai.InternalServerError)])
async def test_error_rate_answers_with_the_configured_status(status: int, error: type) -> None:
    with running_fake_llm(FakeLLMSettings(ttft_ms=0, error_rate=1.0, error_statuses=[status])) as fake:
        llm = client(fake.base_url)
        with pytest.raises(error):
            await llm.chat.completions.create(model="m", messages=user("hi"), stream=True)
        await llm.close()
    assert fake.records[0].status == status


async def test_error_rate_is_a_fraction_and_seeded() -> None:
    with running_fake_llm(FakeLLMSettings(ttft_ms=0, tokens_per_s=0, error_rate=0.5, seed=7)) as fake:
        llm = client(fake.base_url)
        for _ in range(20):
            try:
                await llm.chat.completions.create(model="m", messages=user("hi"))
            except openai.APIStatusError:
                pass
        await llm.close()
    statuses = [r.status for r in fake.records]
    assert 0 < statuses.count(200) < 20
    assert set(statuses) <= {200, 429, 500}


async def test_scripted_tool_calls_split_across_deltas() -> None:
    args = {"visit_type": "cleaning", "date": "2025-03-04", "note": "caller prefers mornings"}
    with running_fake_llm(FAST) as fake:
        fake.enqueue(ScriptedReply(
            text="Let me check.",
            tool_calls=[ScriptedToolCall(name="check_availability", arguments=args, id="call_a"),
                        ScriptedToolCall(name="lookup_patient", arguments='{"phone": "+15550100"}')],
            arg_chunk_chars=3,
        ))
        llm = client(fake.base_url)
        stream = await llm.chat.completions.create(model="m", messages=user("book"), stream=True)
        calls: dict[int, dict] = {}
        deltas_per_call: dict[int, int] = {}
        text, finish = "", None
        async for chunk in stream:
            delta = chunk.choices[0].delta
            text += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
                deltas_per_call[tc.index] = deltas_per_call.get(tc.index, 0) + 1
        await llm.close()
    assert text == "Let me check."
    assert finish == "tool_calls"
    assert calls[0]["id"] == "call_a" and calls[0]["name"] == "check_availability"
    assert json.loads(calls[0]["arguments"]) == args
    assert calls[1]["name"] == "lookup_patient" and calls[1]["id"].startswith("call_")
    assert json.loads(calls[1]["arguments"]) == {"phone": "+15550100"}
    assert deltas_per_call[0] > 10 and deltas_per_call[1] > 3


async def test_tool_choice_none_suppresses_scripted_tools_and_script_runs_out() -> None:
    with running_fake_llm(FAST) as fake:
        fake.enqueue(ScriptedReply(tool_calls=[ScriptedToolCall(name="x")]))
        llm = client(fake.base_url)
        tools = [{"type": "function", "function": {"name": "x", "parameters": {"type": "object"}}}]
        r = await llm.chat.completions.create(model="m", messages=user("tea please"), tools=tools, tool_choice="none")
        assert r.choices[0].message.tool_calls is None and "tea" in r.choices[0].message.content
        r = await llm.chat.completions.create(model="m", messages=user("coffee please"))
        assert "coffee" in r.choices[0].message.content
        await llm.close()


async def test_client_closing_mid_stream_is_recorded() -> None:
    with running_fake_llm(FakeLLMSettings(ttft_ms=0, tokens_per_s=5)) as fake:
        llm = client(fake.base_url)
        stream = await llm.chat.completions.create(model="m", messages=user("long answer please"), stream=True)
        async for _ in stream:
            break
        await stream.close()
        assert await fake.wait_for(lambda: fake.records[0].disconnected)
        assert not fake.records[0].completed
        await llm.close()


async def test_api_key_required_when_configured() -> None:
    with running_fake_llm(FakeLLMSettings(ttft_ms=0, api_key="secret")) as fake:
        with pytest.raises(openai.AuthenticationError):
            await client(fake.base_url, key="wrong").chat.completions.create(model="m", messages=user("hi"))
        ok = client(fake.base_url, key="secret")
        assert (await ok.chat.completions.create(model="m", messages=user("hi"))).choices
        await ok.close()


async def test_broken_stream_surfaces_as_connection_error() -> None:
    with running_fake_llm(FAST) as fake:
        fake.enqueue(ScriptedReply(text="One two three four five.", break_after_tokens=2))
        llm = client(fake.base_url)
        stream = await llm.chat.completions.create(model="m", messages=user("hi"), stream=True)
        got = []
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
        await llm.close()
    assert "".join(got) == "One two"
    assert fake.records[0].aborted and not fake.records[0].disconnected


def test_cli_arguments() -> None:
    settings, host, port = parse_args(
        ["--port", "8123", "--ttft-ms", "150", "--tokens-per-s", "40", "--error-rate", "0.1",
         "--error-status", "503", "--seed", "3"]
    )
    assert (host, port) == ("127.0.0.1", 8123)
    assert settings.ttft_ms == 150 and settings.tokens_per_s == 40
    assert settings.error_rate == 0.1 and settings.error_statuses == [503] and settings.seed == 3
