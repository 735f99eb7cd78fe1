"""Tools of the LLM agent: their config, their OpenAI specs, streamed tool-call assembly and
idempotent execution, over HTTP or as a Python function.

Retell may discard a response and ask again (a superseded request), so a tool the model calls
twice for the same request must not act twice: every call carries an ``Idempotency-Key``
derived from the call, the tool and its canonical arguments, and the agent reuses a result it
already has for that key until the turn is answered; a later turn calls again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic_core import to_jsonable_python

from callray.agents.base import Turn, Usage
from callray.agents.python import ImportPathError, call_user_code, import_object
from callray.env import describe_validation

log = logging.getLogger("callray.tools")

END_CALL = "end_call"
TRANSFER_CALL = "transfer_call"
BUILTIN_TOOLS = frozenset({END_CALL, TRANSFER_CALL})
MAX_RESULT_CHARS = 4000  # what a tool may add to the prompt
MAX_KEPT_RESULTS = 32  # results of one unanswered turn kept for a re-asked request

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# --------------------------------------------------------------------------- config


def _check_name(value: str | None) -> str | None:
    if value is not None and not _TOOL_NAME.match(value):
        raise ValueError(f"tool name {value!r} must match {_TOOL_NAME.pattern}")
    if value in BUILTIN_TOOLS:
        raise ValueError(f"tool name {value!r} is reserved for the built-in tool")
    return value


class _ToolConfig(BaseModel):
    """What every tool has, wherever it runs."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(default=5.0, gt=0, description="Give up on the tool after this many seconds.")
    holding_line: str | None = Field(
        default=None,
        description="Said before calling the tool (e.g. 'One moment while I check.'); none if empty.",
    )


class HttpToolConfig(_ToolConfig):
    """A tool the model may call; the agent POSTs the arguments as JSON to ``url``."""

    name: str = Field(description="Function name shown to the model (letters, digits, _ and -).")
    description: str = Field(description="When and why the model should call it, in one or two sentences.")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON schema of the arguments object (OpenAI function-calling format).",
    )
    url: str = Field(description="Endpoint receiving POST <arguments JSON> with an Idempotency-Key header.")

    _valid_name = field_validator("name")(_check_name)

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
        description="Said before the transfer, uninterruptible (talking over it would cancel the transfer); "
        "empty to say nothing more.",
    )
    show_transferee_as_caller: bool | None = Field(
        default=None, description="Show the caller's number to the person the call is transferred to.")

    @field_validator("transfer_number")
    @classmethod
    def _number(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\+?[0-9]{3,20}", value):
            raise ValueError(f"transfer_number {value!r} must be digits with an optional leading +")
        return value


class FunctionToolConfig(_ToolConfig):
    """A Python function the model may call: its JSON schema comes from its signature (a
    parameter annotated ``Turn`` receives the turn and is not shown to the model)."""

    function: str = Field(description="Import path 'module:function'; the module is found beside the agent "
                          "file first, then on sys.path. Sync functions run in a thread, async ones are awaited.")
    name: str | None = Field(default=None, description="Name shown to the model; default: the function's name.")
    description: str | None = Field(default=None, description="When and why the model should call it; "
                                    "default: the function's docstring.")

    _valid_name = field_validator("name")(_check_name)


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
        self.usage: Usage | None = None  # the provider's count, from the stream's last chunk

    def reset(self) -> None:
        """Forget everything (a failed attempt is retried from scratch)."""
        self._text.clear()
        self._calls.clear()
        self.usage = None

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


class Tool(Protocol):
    """A tool as the LLM agent runs it."""

    name: str
    holding_line: str | None

    def spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""

    async def run(self, arguments: dict[str, Any], key: str, turn: Turn) -> str:
        """The result text for the model; ``ToolError`` when the tool failed."""


class HttpTool:
    """A tool behind an HTTP endpoint (``HttpToolConfig``)."""

    def __init__(self, config: HttpToolConfig, client: httpx.AsyncClient):
        self.config, self.client = config, client
        self.name, self.holding_line = config.name, config.holding_line

    def spec(self) -> dict[str, Any]:
        return function_spec(self.name, self.config.description, self.config.parameters)

    async def run(self, arguments: dict[str, Any], key: str, turn: Turn) -> str:
        """POST the arguments to the tool's URL; return the result text for the model."""
        tool = self.config
        try:
            response = await self.client.post(
                tool.url,
                content=canonical_json(arguments).encode("utf-8"),
                headers={"Content-Type": "application/json", "Idempotency-Key": key, "X-Call-Id": turn.call_id},
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


class FunctionTool:
    """A tool that is a Python function (``FunctionToolConfig``), checked when the agent loads."""

    def __init__(self, config: FunctionToolConfig, beside: Path | None):
        try:
            fn = import_object(config.function, beside)
        except ImportPathError as exc:
            raise ValueError(str(exc)) from None
        if not callable(fn):
            raise ValueError(f"{config.function} is not callable")
        self.config, self.fn = config, fn
        self.name = _check_name(config.name or getattr(fn, "__name__", "")) or ""
        self.holding_line = config.holding_line
        self.description = config.description or inspect.getdoc(fn) or ""
        if not self.description:
            raise ValueError(f"{config.function} has no docstring: give the tool a description")
        self.turn_param, self.arguments = _signature_model(fn, self.name)

    def spec(self) -> dict[str, Any]:
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        return function_spec(self.name, self.description, schema)

    async def run(self, arguments: dict[str, Any], key: str, turn: Turn) -> str:
        try:
            kwargs = dict(self.arguments.model_validate(arguments))
        except ValidationError as exc:
            raise ToolError(f"invalid arguments for {self.name}: {'; '.join(describe_validation(exc))}") from None
        if self.turn_param:
            kwargs[self.turn_param] = turn
        try:
            result = await call_user_code(self.fn, timeout_s=self.config.timeout_s, **kwargs)
        except TimeoutError:
            raise ToolError(f"{self.name} did not finish within {self.config.timeout_s} s") from None
        except Exception as exc:
            log.warning("call %s: tool %s raised", turn.call_id, self.name, exc_info=exc, extra={"call_id": turn.call_id})
            raise ToolError(f"{self.name} failed: {type(exc).__name__}: {exc}") from None
        text = result if isinstance(result, str) else canonical_json(to_jsonable_python(result, fallback=str))
        return text[:MAX_RESULT_CHARS]


def _signature_model(fn: Callable[..., Any], name: str) -> tuple[str | None, type[BaseModel]]:
    """The parameter that receives the ``Turn`` (if any) and a model of the others."""
    fields: dict[str, Any] = {}
    turn_param = None
    try:
        signature = inspect.signature(fn, eval_str=True)  # annotations written as strings resolve too
    except (NameError, TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read its signature: {exc}") from None
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"{name}: *args and **kwargs cannot be described to the model")
        annotation = param.annotation
        if annotation is Turn:
            turn_param = param.name
            continue
        if annotation is inspect.Parameter.empty:
            annotation = Any
        fields[param.name] = (annotation, ... if param.default is inspect.Parameter.empty else param.default)
    model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    try:
        model.model_json_schema()
    except Exception as exc:
        raise ValueError(f"{name}: its parameters have no JSON schema: {exc}") from None
    return turn_param, model


def remember_result(results: dict[str, Any], key: str, content: str) -> None:
    """Keep a result for a re-asked request, the oldest dropped beyond ``MAX_KEPT_RESULTS``."""
    results[key] = content
    while len(results) > MAX_KEPT_RESULTS:
        del results[next(iter(results))]
