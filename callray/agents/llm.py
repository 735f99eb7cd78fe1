"""The OpenAI-compatible streaming LLM agent, with HTTP tools, hang-up and transfer.

It streams a chat completion with the official ``openai`` SDK client and yields phrase-sized
``Speech`` as soon as each phrase is complete. The SDK makes the request (auth, base URL,
status errors) over aiohttp, and the stream is read as raw SSE lines with plain JSON: the SDK's
usual chunk-by-chunk path costs about 0.5 ms of CPU per token on a small machine, this one
about 0.12 ms (``python -m harness.micro --only stream``), which decides how many calls a core
can stream. Before anything of an answer was said, a failed or slow provider (429, 5xx,
timeout, connection error, broken stream) is retried once and then replaced by the next one;
once speech has started a failure raises, and the conversation speaks the fallback line. Closing the ``respond()`` generator, or cancelling the task iterating it,
closes the upstream HTTP stream at once (so a superseded answer stops costing tokens).

One ``AsyncOpenAI`` client per provider lives as long as the agent: connections are pooled
and reused across calls. An agent instance belongs to one event loop (its first).
"""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal, Union

import httpx
import openai
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from callray.agents.config import AgentConfigError, read_agent_yaml
from callray.agents.base import (
    FALLBACK_LINE,
    Agent,
    AgentOutput,
    EndCall,
    Speech,
    ToolCall,
    ToolResult,
    Transfer,
    Turn,
    Usage,
    call_variables,
    normalise,
    uses_variables,
)
from callray.agents.phrases import PhraseChunker, chunk_phrases
from callray.agents.templates import render
from callray.agents.tools import (
    END_CALL,
    MAX_RESULT_CHARS,
    TRANSFER_CALL,
    EndCallToolConfig,
    FunctionTool,
    FunctionToolConfig,
    HttpTool,
    HttpToolConfig,
    PendingToolCall,
    Tool,
    ToolCallAccumulator,
    ToolError,
    TransferCallToolConfig,
    function_spec,
    idempotency_key,
    parse_arguments,
    remember_result,
)
from callray.env import describe_validation

_RETRY_STATUSES = frozenset({408, 409, 429})


class LLMUnavailableError(RuntimeError):
    """No provider produced an answer (or the stream broke after speech had started)."""


# --------------------------------------------------------------------------- config


OPENAI_URL = "https://api.openai.com/v1"
#: Where ``callray fake-llm --port 8100`` listens: the LLM agent's endpoint when no key is set.
FAKE_LLM_URL = "http://127.0.0.1:8100/v1"


def is_local(url: str) -> bool:
    """A provider on this machine (the fake LLM, a local vLLM or Ollama): it needs no real key."""
    host = (httpx.URL(url).host or "").strip("[]")
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


class ProviderConfig(BaseModel):
    """One OpenAI-compatible endpoint; providers are tried in order."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(
        default=None,
        description="API base URL including /v1. Unset: OPENAI_BASE_URL if set, else "
        f"{OPENAI_URL} when the key variable is set, else the local fake LLM ({FAKE_LLM_URL}).",
    )
    model: str = Field(description="Model name sent in each request, e.g. gpt-4o-mini.")
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="Name of the environment variable holding the API key."
    )
    api_key_fallback: str | None = Field(
        default=None,
        description="Key used when the variable is unset, for a provider on this machine only (the fake "
        "LLM ignores keys); a remote provider without its key fails at start, naming the variable.",
    )
    organization: str | None = Field(default=None, description="OpenAI organization id, if any.")

    def endpoint(self) -> tuple[str, str | None]:
        """The base URL to call and the key for it (None: the key variable is unset)."""
        key = os.environ.get(self.api_key_env) or None
        url = self.base_url or os.environ.get("OPENAI_BASE_URL") or (OPENAI_URL if key else FAKE_LLM_URL)
        if key is None and is_local(url):
            key = self.api_key_fallback or "local-no-key"
        return url, key


ToolConfig = Annotated[
    Union[Annotated[HttpToolConfig, Tag("http")], Annotated[FunctionToolConfig, Tag("function")]],
    Discriminator(lambda v: "function" if "function" in (v if isinstance(v, dict) else vars(v)) else "http"),
]


class LLMAgentConfig(BaseModel):
    """An LLM agent definition (``config/agents/*.yaml`` with ``kind: llm``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["llm"] = Field(default="llm", description="Agent type discriminator.")
    name: str = Field(min_length=1, description="Agent name (part of response-cache keys and metrics).")
    version: str = Field(default="1", description="Bump when behaviour changes: invalidates cached answers.")
    providers: list[ProviderConfig] = Field(
        min_length=1, description="OpenAI-compatible endpoints in failover order."
    )
    system_prompt: str = Field(
        description="Instructions for the model; write for voice (short sentences, no markdown). "
        "{variable} placeholders are filled from the call's dynamic variables and metadata."
    )
    temperature: float = Field(default=0.4, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(default=250, gt=0, description="Cap on tokens per completion.")
    history_chars: int = Field(
        default=8000, gt=0, description="Budget of transcript characters sent; the newest turns are kept."
    )
    begin_message: str = Field(
        default="",
        description="Greeting said first ({variable} placeholders allowed); empty lets the caller speak first.",
    )
    reminder_prompt: str = Field(
        default="The caller has been silent for a while. Do not answer anything new: in one short "
        "sentence, check whether they are still there or need anything else.",
        description="Instruction added when Retell asks for a reminder (the caller went quiet).",
    )
    connect_timeout_s: float = Field(default=2.0, gt=0, description="TCP/TLS connect timeout per request.")
    first_token_timeout_s: float = Field(
        default=3.0, gt=0, description="A provider is abandoned if no token arrives within this time."
    )
    total_timeout_s: float = Field(
        default=20.0, gt=0, description="Longest one completion may stream, request to last token."
    )
    retries: int = Field(
        default=1, ge=0, le=3, description="Extra attempts on the same provider before the next one."
    )
    max_tool_steps: int = Field(
        default=3, ge=0, description="Tool rounds per turn; after that the model must answer in words."
    )
    phrase_flush_s: float = Field(
        default=0.25, gt=0, description="Buffered words are sent after this long without a phrase end."
    )
    tools: list[ToolConfig] = Field(
        default_factory=list,
        description="Tools offered to the model: an HTTP endpoint (url) or a Python function (function).",
    )
    end_call: EndCallToolConfig = Field(
        default_factory=EndCallToolConfig, description="The built-in hang-up tool."
    )
    transfer_call: TransferCallToolConfig = Field(
        default_factory=TransferCallToolConfig, description="The built-in call-transfer tool."
    )
    fallback_line: str = Field(
        default=FALLBACK_LINE,
        description="Said by the conversation when the model fails or is too slow.",
    )
    usage: bool = Field(
        default=True,
        description="Ask the provider for each answer's token usage (stream_options.include_usage), counted "
        "per call; turn off for a provider that refuses the option.",
    )
    cache: bool = Field(
        default=False,
        description="Share answers between calls by normalised utterance; only for agents whose "
        "answers depend on the last utterance alone (no personal variables, no history).",
    )
    common_questions: list[str] = Field(
        default_factory=list,
        description="With cache: questions answered once at start and put in the response cache.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "LLMAgentConfig":
        # duplicate tool names are refused when the tools are built (a function's name is its own)
        if self.transfer_call.enabled and not self.transfer_call.transfer_number:
            raise ValueError("transfer_call.transfer_number is required when transfer_call.enabled is true")
        return self


# --------------------------------------------------------------------------- the agent


@dataclass(frozen=True)
class _Provider:
    """A provider as called: where (for messages), which model, the pooled client."""

    label: str
    model: str
    client: openai.AsyncOpenAI


class _EmptyCompletion(Exception):
    """The model returned neither text nor tool calls."""


class _BrokenStream(Exception):
    """The stream ended badly: an error event, a line that is not JSON, a dropped connection."""


def stream_delta(line: str) -> dict[str, Any] | None:
    """The ``choices[0].delta`` of one SSE line of a chat-completion stream (None for other
    lines). An error event raises ``_BrokenStream``, as the SDK's own stream raises APIError."""
    return stream_chunk(line)[0]


def stream_chunk(line: str) -> tuple[dict[str, Any] | None, Usage | None]:
    """``stream_delta`` and, on the stream's last chunk when usage was asked for, its usage."""
    if not line.startswith("data:"):
        return None, None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None, None
    try:
        chunk = json.loads(payload)
    except ValueError:
        raise _BrokenStream(f"a stream line is not JSON: {payload[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise _BrokenStream(f"a stream chunk is not an object: {payload[:80]!r}")
    if chunk.get("error"):
        error = chunk["error"]
        raise _BrokenStream(str(error.get("message") if isinstance(error, dict) else error))
    choices = chunk.get("choices")
    delta = choices[0].get("delta") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        tokens = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}
        usage = Usage(**{k: v for k, v in tokens.items() if type(v) is int})
    return (delta if isinstance(delta, dict) else None), (usage if isinstance(usage, Usage) else None)


def _retry_same_provider(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _RETRY_STATUSES or exc.status_code >= 500
    return True  # timeouts, connection errors, broken or empty streams


def _describe(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    return f"{type(exc).__name__}: {exc}"


_FAILOVER_ERRORS = (openai.APIError, TimeoutError, _EmptyCompletion, _BrokenStream)


class LLMAgent(Agent):
    """An OpenAI-compatible streaming agent."""

    def __init__(self, config: LLMAgentConfig, *, source: str = "<config>") -> None:
        self.config = config
        self.name = config.name
        self.version = config.version
        self.common_questions = config.common_questions
        self.source = source
        timeout = openai.Timeout(config.total_timeout_s, connect=config.connect_timeout_s)
        self._providers: list[_Provider] = []
        for index, provider in enumerate(config.providers):
            base_url, key = provider.endpoint()
            if key is None:
                raise AgentConfigError(source, [
                    f"providers.{index}.api_key_env: environment variable {provider.api_key_env!r} is not set, "
                    f"and {base_url} is not on this machine: export {provider.api_key_env}=... (unset "
                    "OPENAI_BASE_URL and the key to use the local fake LLM)"
                ])
            client = openai.AsyncOpenAI(
                base_url=base_url,
                api_key=key,
                organization=provider.organization,
                timeout=timeout,
                max_retries=0,  # retries and failover are this agent's, within the turn's budget
                http_client=openai.DefaultAioHttpClient(timeout=timeout),
            )
            self._providers.append(_Provider(f"{provider.model} at {base_url}", provider.model, client))
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=config.connect_timeout_s))
        self._tools = self._build_tools(source)
        specs = [tool.spec() for tool in self._tools.values()]
        if config.end_call.enabled:
            specs.append(function_spec(END_CALL, config.end_call.description, {"type": "object", "properties": {}}))
        if config.transfer_call.enabled:
            specs.append(
                function_spec(TRANSFER_CALL, config.transfer_call.description, {"type": "object", "properties": {}})
            )
        self._tool_specs = specs
        self._stream_options = {"stream_options": {"include_usage": True}} if config.usage else {}

    def _build_tools(self, source: str) -> dict[str, Tool]:
        """The configured tools by name; a function tool is imported now, so a wrong path or
        signature fails at start naming the field."""
        beside = Path(source).parent if source != "<config>" else None
        tools: dict[str, Tool] = {}
        for index, config in enumerate(self.config.tools):
            try:
                tool: Tool = (HttpTool(config, self._http) if isinstance(config, HttpToolConfig)
                              else FunctionTool(config, beside))
            except ValueError as exc:
                raise AgentConfigError(source, [f"tools.{index}.function: {exc}"]) from None
            if tool.name in tools:
                raise AgentConfigError(source, [f"tools.{index}: duplicate tool name {tool.name!r}"])
            tools[tool.name] = tool
        return tools

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>") -> "LLMAgent":
        """Validate a parsed definition; errors name ``source`` and the field path."""
        if not isinstance(data, dict):
            raise AgentConfigError(source, [f"expected a mapping of fields, got {type(data).__name__}"])
        try:
            config = LLMAgentConfig.model_validate(data)
        except ValidationError as exc:
            raise AgentConfigError(source, describe_validation(exc)) from None
        return cls(config, source=source)

    async def aclose(self) -> None:
        """Close the pooled connections (providers and tool endpoints)."""
        for provider in self._providers:
            await provider.client.close()
        await self._http.aclose()

    # ------------------------------------------------------------------ Agent protocol

    @property
    def fallback_line(self) -> str:
        return self.config.fallback_line

    def begin_message(self, state: dict[str, Any], call: dict[str, Any]) -> str:
        return render(self.config.begin_message, call_variables(call).get).strip()

    @property
    def greeting_uses_call(self) -> bool:
        return uses_variables(self.config.begin_message)

    def cache_key(self, turn: Turn) -> str | None:
        if not self.config.cache or turn.kind != "response":
            return None
        return normalise(turn.last_user_text) or None

    async def respond(self, turn: Turn) -> AsyncIterator[AgentOutput]:
        messages = self.build_messages(turn)
        for step in range(self.config.max_tool_steps + 1):
            offer_tools = bool(self._tool_specs) and step < self.config.max_tool_steps
            acc = ToolCallAccumulator()
            async with aclosing(self._complete(messages, offer_tools, acc)) as phrases:
                async for phrase in phrases:
                    yield Speech(phrase)
            if acc.usage is not None:
                yield acc.usage
            calls = acc.calls() if offer_tools else []
            if not calls:
                return
            turn.cacheable = False
            names = {call.name for call in calls}
            if END_CALL in names and self.config.end_call.enabled:
                if self.config.end_call.closing_line:
                    yield Speech(self.config.end_call.closing_line, no_interruption_allowed=True)
                yield EndCall()
                return
            if TRANSFER_CALL in names and self.config.transfer_call.enabled:
                transfer = self.config.transfer_call
                if transfer.handoff_line:  # talking over it would cancel the transfer
                    yield Speech(transfer.handoff_line, no_interruption_allowed=True)
                yield Transfer(str(transfer.transfer_number), transfer.show_transferee_as_caller)
                return
            messages.append(_assistant_tool_message(acc.text, calls))
            async for output in self._run_tools(turn, calls, messages):
                yield output

    # ------------------------------------------------------------------ prompt

    def build_messages(self, turn: Turn) -> list[dict[str, Any]]:
        """System prompt, then the newest history within ``history_chars``: the caller's and
        the agent's lines, and the tools called earlier with their results in place."""
        history: list[dict[str, Any]] = []
        budget = self.config.history_chars
        for message in reversed(history_messages(turn.history)):
            size = len(message.get("content") or "") + sum(
                len(c["function"]["arguments"]) for c in message.get("tool_calls", ()))
            if size > budget:
                if not history and message.get("content") and not message.get("tool_calls"):
                    # the newest line is always sent, cut to the budget
                    history.append({**message, "content": message["content"][-budget:]})
                break
            budget -= size
            history.append(message)
        history.reverse()
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": render(self.config.system_prompt, call_variables(turn.call).get)}
        ]
        messages.extend(paired_tool_messages(history))
        if turn.kind == "reminder":
            messages.append({"role": "system", "content": self.config.reminder_prompt})
        return messages

    # ------------------------------------------------------------------ streaming

    async def _complete(
        self, messages: list[dict[str, Any]], offer_tools: bool, acc: ToolCallAccumulator
    ) -> AsyncIterator[str]:
        """Phrases of one completion, with retry and failover while nothing was said."""
        failures: list[str] = []
        for provider in self._providers:
            for attempt in range(1 + self.config.retries):
                spoke = False
                acc.reset()  # a failed attempt leaves nothing behind
                chunker = PhraseChunker(flush_interval_s=self.config.phrase_flush_s)
                tokens = self._tokens(provider, messages, offer_tools, acc)
                try:
                    async with aclosing(chunk_phrases(tokens, chunker)) as phrases:
                        async for phrase in phrases:
                            spoke = True
                            yield phrase
                    if acc.empty:
                        raise _EmptyCompletion(f"{provider.label} returned an empty completion")
                    return
                except _FAILOVER_ERRORS as exc:
                    if spoke:
                        raise LLMUnavailableError(
                            f"{provider.label} failed after speech had started: {_describe(exc)}"
                        ) from exc
                    failures.append(f"{provider.label} attempt {attempt + 1}: {_describe(exc)}")
                    if not _retry_same_provider(exc):
                        break
        raise LLMUnavailableError("all LLM providers failed: " + "; ".join(failures))

    async def _tokens(
        self,
        provider: _Provider,
        messages: list[dict[str, Any]],
        offer_tools: bool,
        acc: ToolCallAccumulator,
    ) -> AsyncIterator[str]:
        """Content tokens of one streamed completion; tool-call deltas go to ``acc``.

        Iterated by ``chunk_phrases`` in its own task, so the deadlines below may span yields.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        extra: dict[str, Any] = {}
        if self._tool_specs and self.config.max_tool_steps > 0:
            extra = {"tools": self._tool_specs, "tool_choice": "auto" if offer_tools else "none"}
        first = True
        try:
            async with asyncio.timeout(self.config.first_token_timeout_s) as deadline:
                async with provider.client.chat.completions.with_streaming_response.create(
                    model=provider.model,
                    messages=messages,
                    temperature=self.config.temperature,
                    max_tokens=self.config.max_tokens,
                    stream=True,
                    **self._stream_options,
                    **extra,
                ) as response:
                    lines = aiter(response.iter_lines())
                    while True:
                        try:
                            line = await anext(lines)
                        except StopAsyncIteration:
                            break
                        except Exception as exc:  # the transport's error: the connection broke mid-stream
                            raise _BrokenStream(f"{type(exc).__name__}: {exc}") from exc
                        delta, usage = stream_chunk(line)
                        if usage is not None:
                            acc.usage = usage
                        if delta is None:
                            continue
                        content, tool_calls = delta.get("content"), delta.get("tool_calls")
                        if tool_calls:
                            acc.add_tool_deltas(tool_calls)
                        if first and (content or tool_calls):
                            first = False
                            deadline.reschedule(started + self.config.total_timeout_s)
                        if content:
                            acc.add_text(content)
                            yield content
        except TimeoutError:
            if first:
                what, limit = "first token", self.config.first_token_timeout_s
            else:
                what, limit = "end of stream", self.config.total_timeout_s
            raise TimeoutError(f"no {what} from {provider.label} within {limit} s") from None

    # ------------------------------------------------------------------ tools

    async def _run_tools(
        self, turn: Turn, calls: list[PendingToolCall], messages: list[dict[str, Any]]
    ) -> AsyncIterator[AgentOutput]:
        """Run the step's tools concurrently; tell the model their results."""
        prepared: list[tuple[PendingToolCall, Tool | None, dict[str, Any] | None, str | None, str]] = []
        holding: str | None = None
        for call in calls:
            tool = self._tools.get(call.name)
            arguments: dict[str, Any] | None = None
            key: str | None = None
            error = ""
            if tool is None:
                error = f"unknown tool {call.name!r}"
            else:
                try:
                    arguments = parse_arguments(call.arguments)
                    key = idempotency_key(turn.call_id, tool.name, arguments)
                except ToolError as exc:
                    error = str(exc)
            if key is not None and key not in turn.tool_results and tool is not None and tool.holding_line:
                holding = holding or tool.holding_line
            prepared.append((call, tool, arguments, key, error))
        for call, *_ in prepared:
            yield ToolCall(tool_call_id=call.id, name=call.name, arguments=call.arguments or "{}")
        if holding:
            yield Speech(holding)
        results = await asyncio.gather(*(self._run_one(turn, *entry[1:]) for entry in prepared))
        for (call, *_), (content, ok) in zip(prepared, results):
            yield ToolResult(tool_call_id=call.id, content=content, successful=ok)
            told = content if ok else (
                f"The tool failed: {content}. Tell the caller briefly and offer another way to help."
            )
            messages.append({"role": "tool", "tool_call_id": call.id, "content": told})

    async def _run_one(
        self,
        turn: Turn,
        tool: Tool | None,
        arguments: dict[str, Any] | None,
        key: str | None,
        error: str,
    ) -> tuple[str, bool]:
        if error or tool is None or arguments is None or key is None:
            return error or "tool unavailable", False
        if key in turn.tool_results:  # a re-asked request of the same turn: the tool already acted
            return str(turn.tool_results[key]), True
        try:
            content = await tool.run(arguments, key, turn)
        except ToolError as exc:
            return str(exc), False
        remember_result(turn.tool_results, key, content)
        return content, True


def history_messages(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Retell's transcript (with tool calls, when it sent them) as chat messages: consecutive
    tool invocations become one assistant message, each result a tool message."""
    messages: list[dict[str, Any]] = []
    invoked: list[PendingToolCall] = []
    for entry in history:
        role = entry.get("role")
        if role == "tool_call_invocation" and entry.get("tool_call_id"):
            invoked.append(PendingToolCall(str(entry["tool_call_id"]), str(entry.get("name") or ""),
                                           str(entry.get("arguments") or "")))
            continue
        if invoked and role in ("agent", "user", "tool_call_result"):  # other roles (node_transition) pass
            messages.append(_assistant_tool_message("", invoked))
            invoked = []
        if role in ("agent", "user"):
            content = str(entry.get("content") or "").strip()
            if content:
                messages.append({"role": "assistant" if role == "agent" else "user", "content": content})
        elif role == "tool_call_result" and entry.get("tool_call_id"):
            messages.append({"role": "tool", "tool_call_id": str(entry["tool_call_id"]),
                             "content": str(entry.get("content") or "")[:MAX_RESULT_CHARS]})
    if invoked:
        messages.append(_assistant_tool_message("", invoked))
    return messages


def paired_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep only tool calls whose results are there and results whose calls are there: the
    chat API refuses either alone (a history cut by the budget, a superseded request)."""
    answered = {m["tool_call_id"] for m in messages if m["role"] == "tool"}
    out: list[dict[str, Any]] = []
    asked: set[str] = set()
    for message in messages:
        if message.get("tool_calls"):
            calls = [c for c in message["tool_calls"] if c["id"] in answered]
            if not calls:
                continue
            asked.update(c["id"] for c in calls)
            message = {**message, "tool_calls": calls}
        elif message["role"] == "tool" and message["tool_call_id"] not in asked:
            continue
        out.append(message)
    return out


def _assistant_tool_message(text: str, calls: list[PendingToolCall]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": text or None,
        "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}}
            for c in calls
        ],
    }


# --------------------------------------------------------------------------- loading


def load_llm_agent(path: str | Path) -> LLMAgent:
    """Load and validate an LLM agent definition from a YAML file."""
    return LLMAgent.from_dict(read_agent_yaml(path), source=str(path))
