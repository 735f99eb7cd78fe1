"""Tools of the LLM agent: their config, their OpenAI specs, streamed tool-call assembly and
idempotent HTTP execution.

Retell may discard a response and ask again (a superseded request), so a tool the model calls
twice for the same request must not act twice: every HTTP call carries an ``Idempotency-Key``
derived from the call, the tool and its canonical arguments, and the agent reuses a result it
already has for that key.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

END_CALL = "end_call"
TRANSFER_CALL = "transfer_call"
BUILTIN_TOOLS = frozenset({END_CALL, TRANSFER_CALL})
MAX_RESULT_CHARS = 4000  # what a tool may add to the prompt

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# --------------------------------------------------------------------------- config


class HttpToolConfig(BaseModel):
    """A tool the model may call; the agent POSTs the arguments as JSON to ``url``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Function name shown to the model (letters, digits, _ and -).")
    description: str = Field(description="When and why the model should call it, in one or two sentences.")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON schema of the arguments object (OpenAI function-calling format).",
    )
    url: str = Field(description="Endpoint receiving POST <arguments JSON> with an Idempotency-Key header.")
    timeout_s: float = Field(default=5.0, gt=0, description="Give up on the endpoint after this many seconds.")
    holding_line: str | None = Field(
        default=None,
        description="Said before calling the endpoint (e.g. 'One moment while I check.'); none if empty.",
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _TOOL_NAME.match(value):
            raise ValueError(f"tool name {value!r} must match {_TOOL_NAME.pattern}")
        if value in BUILTIN_TOOLS:
            raise ValueError(f"tool name {value!r} is reserved for the built-in tool")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url {value!r} must start with http:// or https://")
        return value


class EndCallToolConfig(BaseModel):
    """The built-in ``end_call`` tool: the model hangs up when the conversation is over."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Offer end_call to the model.")
    description: str = Field(
        default="Hang up when the caller is done or asks to end the call. "
        "A closing line is said for you; do not say goodbye yourself.",
        description="What the model is told about end_call.",
    )
    closing_line: str = Field(
        default="Thank you for calling. Goodbye!",
        description="Said (uninterruptible) before hanging up; empty to say nothing more.",
    )


class TransferCallToolConfig(BaseModel):
    """The built-in ``transfer_call`` tool: the model hands the caller to a person."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Offer transfer_call to the model.")
    description: str = Field(
        default="Transfer the caller to a human colleague when they ask for a person "
        "or you cannot help. A handoff line is said for you.",
        description="What the model is told about transfer_call.",
    )
    transfer_number: str | None = Field(
        default=None, description="Number the call is transferred to (E.164, e.g. +14155550100)."
    )
    handoff_line: str = Field(
        default="Let me transfer you to a colleague. Please hold.",
        description="Said before the transfer; empty to say nothing more.",
    )

    @field_validator("transfer_number")
    @classmethod
    def _number(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\+?[0-9]{3,20}", value):
            raise ValueError(f"transfer_number {value!r} must be digits with an optional leading +")
        return value


def function_spec(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``tools`` entry for a function."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


# --------------------------------------------------------------------------- streamed calls


@dataclass(frozen=True)
class PendingToolCall:
    """A tool call the model made, assembled from its streamed deltas."""

    id: str
    name: str
    arguments: str  # raw JSON text as the model produced it


class ToolCallAccumulator:
    """Assembles a streamed completion: its text and its tool calls.

    Tool calls arrive as deltas keyed by ``index``: the first carries ``id`` and the name, the
    following ones pieces of the arguments string; several calls may interleave.
    """

    def __init__(self) -> None:
        self._text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}

    def reset(self) -> None:
        """Forget everything (a failed attempt is retried from scratch)."""
        self._text.clear()
        self._calls.clear()

    @property
    def text(self) -> str:
        return "".join(self._text)

    def add_text(self, text: str) -> None:
        self._text.append(text)

    def add_tool_deltas(self, deltas: list[Any]) -> None:
        """Add ``choices[0].delta.tool_calls`` of one chunk, as the stream's JSON has them."""
        for delta in deltas:
            if not isinstance(delta, dict):
                continue
            index = delta.get("index")
            if not isinstance(index, int):
                index = len(self._calls)
            entry = self._calls.setdefault(index, {"id": None, "name": "", "arguments": []})
            if delta.get("id"):
                entry["id"] = str(delta["id"])
            function = delta.get("function")
            if isinstance(function, dict):
                if function.get("name"):
                    entry["name"] += str(function["name"])
                if function.get("arguments"):
                    entry["arguments"].append(str(function["arguments"]))

    def calls(self) -> list[PendingToolCall]:
        """The complete tool calls, in index order."""
        return [
            PendingToolCall(
                id=entry["id"] or f"call_{index}",
                name=entry["name"],
                arguments="".join(entry["arguments"]),
            )
            for index, entry in sorted(self._calls.items())
        ]

    @property
    def empty(self) -> bool:
        return not self._calls and not self.text.strip()


# --------------------------------------------------------------------------- execution


class ToolError(Exception):
    """A tool call could not be carried out; the message is told to the model."""


def canonical_json(value: Any) -> str:
    """One JSON text per value: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def idempotency_key(call_id: str, tool: str, arguments: dict[str, Any]) -> str:
    """sha256(call_id + tool + canonical JSON arguments), hex: equal for a repeated request."""
    material = "\x1f".join((call_id, tool, canonical_json(arguments)))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def parse_arguments(raw: str) -> dict[str, Any]:
    """The model's arguments string as an object ("" means no arguments)."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ToolError(f"arguments are not valid JSON ({exc.msg} at {exc.pos}): {raw[:200]!r}") from None
    if not isinstance(value, dict):
        raise ToolError(f"arguments must be a JSON object, got {type(value).__name__}")
    return value


async def call_http_tool(
    client: httpx.AsyncClient, tool: HttpToolConfig, arguments: dict[str, Any], key: str, call_id: str
) -> str:
    """POST the arguments to the tool's URL; return the result text for the model."""
    try:
        response = await client.post(
            tool.url,
            content=canonical_json(arguments).encode("utf-8"),
            headers={"Content-Type": "application/json", "Idempotency-Key": key, "X-Call-Id": call_id},
            timeout=tool.timeout_s,
        )
    except httpx.TimeoutException:
        raise ToolError(f"{tool.name} did not answer within {tool.timeout_s} s") from None
    except httpx.HTTPError as exc:
        raise ToolError(f"{tool.name} could not be reached: {type(exc).__name__}") from None
    if response.status_code >= 300:
        raise ToolError(f"{tool.name} failed with HTTP {response.status_code}: {response.text[:200]}")
    text = response.text
    try:
        text = canonical_json(response.json())
    except ValueError:
        pass
    return text[:MAX_RESULT_CHARS]
