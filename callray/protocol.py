"""Retell's custom-LLM WebSocket protocol as pydantic models.

Lenient on input: unknown fields, roles and interaction types are kept, never rejected, so a
new Retell feature cannot make a turn fail. Strict on output: ints are ints, booleans are
booleans, unset optional fields are omitted and ``response_type`` is always set, because Retell
silently drops a frame whose types are wrong.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

# --------------------------------------------------------------------------- inbound


class _Inbound(BaseModel):
    model_config = ConfigDict(extra="allow")


class Word(_Inbound):
    word: str = ""
    start: float | None = None
    end: float | None = None


class Utterance(_Inbound):
    """One entry of Retell's transcript. ``role`` is open-ended (agent, user, transfer_target...)."""

    role: str
    content: str = ""
    words: list[Word] = Field(default_factory=list)


class PingPong(_Inbound):
    interaction_type: Literal["ping_pong"]
    timestamp: int


class CallDetails(_Inbound):
    interaction_type: Literal["call_details"]
    call: dict[str, Any] = Field(default_factory=dict)


class UpdateOnly(_Inbound):
    interaction_type: Literal["update_only"]
    transcript: list[Utterance] = Field(default_factory=list)
    transcript_with_tool_calls: list[dict[str, Any]] | None = None
    turntaking: str | None = None


class ResponseRequired(_Inbound):
    interaction_type: Literal["response_required"]
    response_id: int = Field(ge=0)
    transcript: list[Utterance] = Field(default_factory=list)
    transcript_with_tool_calls: list[dict[str, Any]] | None = None


class ReminderRequired(_Inbound):
    interaction_type: Literal["reminder_required"]
    response_id: int = Field(ge=0)
    transcript: list[Utterance] = Field(default_factory=list)
    transcript_with_tool_calls: list[dict[str, Any]] | None = None


class UnknownInteraction(_Inbound):
    """A well-formed message of a type this version does not know: tolerated and ignored."""

    interaction_type: str


KnownInbound = Annotated[
    Union[PingPong, CallDetails, UpdateOnly, ResponseRequired, ReminderRequired],
    Field(discriminator="interaction_type"),
]
InboundEvent = Union[PingPong, CallDetails, UpdateOnly, ResponseRequired, ReminderRequired, UnknownInteraction]
RequestEvent = Union[ResponseRequired, ReminderRequired]

_KNOWN_TYPES = {"ping_pong", "call_details", "update_only", "response_required", "reminder_required"}


class ProtocolError(BaseModel):
    """Why an inbound frame could not be used. Returned, never raised, by :func:`parse_frame`."""

    kind: Literal["binary", "not_json", "not_object", "missing_type", "invalid"]
    detail: str
    interaction_type: str | None = None

    def __str__(self) -> str:
        where = f" ({self.interaction_type})" if self.interaction_type else ""
        return f"{self.kind}{where}: {self.detail}"


class _InboundAdapter(BaseModel):
    event: KnownInbound


def parse_event(data: Any) -> InboundEvent | ProtocolError:
    """Validate an already-decoded JSON value as a Retell message."""
    if not isinstance(data, dict):
        return ProtocolError(kind="not_object", detail=f"expected a JSON object, got {type(data).__name__}")
    kind = data.get("interaction_type")
    if not isinstance(kind, str):
        return ProtocolError(kind="missing_type", detail="no string field 'interaction_type'")
    try:
        if kind not in _KNOWN_TYPES:
            return UnknownInteraction.model_validate(data)
        return _InboundAdapter.model_validate({"event": data}).event
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"][1:]) or "(root)"
        return ProtocolError(kind="invalid", interaction_type=kind, detail=f"field {field!r}: {first['msg']}")


def decode_frame(frame: str | bytes) -> dict[str, Any] | ProtocolError:
    """The cheap, JSON-level half of parsing: a text frame holding one object with a string
    ``interaction_type``. The gateway needs no more to answer pings and route the rest."""
    if isinstance(frame, (bytes, bytearray)):
        return ProtocolError(kind="binary", detail=f"binary frame of {len(frame)} bytes; Retell sends text")
    try:
        data = json.loads(frame)
    except ValueError as exc:
        return ProtocolError(kind="not_json", detail=str(exc))
    except RecursionError:
        return ProtocolError(kind="invalid", detail="JSON nested too deeply")
    if not isinstance(data, dict):
        return ProtocolError(kind="not_object", detail=f"expected a JSON object, got {type(data).__name__}")
    if not isinstance(data.get("interaction_type"), str):
        return ProtocolError(kind="missing_type", detail="no string field 'interaction_type'")
    return data


def parse_frame(frame: str | bytes) -> InboundEvent | ProtocolError:
    """Parse one WebSocket frame. Retell only sends text frames holding one JSON object."""
    data = decode_frame(frame)
    if isinstance(data, ProtocolError):
        return data
    if _SURROGATE_ESCAPE.search(frame) and not _encodable(data):
        return ProtocolError(kind="invalid", detail="a string holds a lone UTF-16 surrogate (not valid Unicode)")
    event = parse_event(data)
    if isinstance(event, CallDetails) and _depth(event.call) > MAX_CALL_DEPTH:
        return ProtocolError(kind="invalid", interaction_type="call_details",
                             detail=f"field 'call' nested deeper than {MAX_CALL_DEPTH} levels")
    return event


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_CALL_DEPTH = 32  # the call object is stored with the call's state; keep it serialisable


def _encodable(data: Any) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _depth(value: Any, limit: int = MAX_CALL_DEPTH + 1) -> int:
    """Nesting depth of a JSON value, counted no further than ``limit``."""
    if limit <= 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


# --------------------------------------------------------------------------- outbound


class _Outbound(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> str:
        """The frame as Retell expects it: unset optional fields omitted."""
        return self.model_dump_json(exclude_none=True)


class ConfigFrame(_Outbound):
    response_type: Literal["config"] = "config"
    config: "ConfigBody"


class ConfigBody(_Outbound):
    auto_reconnect: StrictBool = True
    call_details: StrictBool = True
    transcript_with_tool_calls: StrictBool = False


class PingPongFrame(_Outbound):
    response_type: Literal["ping_pong"] = "ping_pong"
    timestamp: StrictInt


class _Speech(_Outbound):
    content: StrictStr = ""
    content_complete: StrictBool
    no_interruption_allowed: StrictBool | None = None
    end_call: StrictBool | None = None
    transfer_number: StrictStr | None = None
    digit_to_press: StrictStr | None = None


class ResponseFrame(_Speech):
    response_type: Literal["response"] = "response"
    response_id: StrictInt
    show_transferee_as_caller: StrictBool | None = None


class AgentInterruptFrame(_Speech):
    response_type: Literal["agent_interrupt"] = "agent_interrupt"
    interrupt_id: StrictInt


class ToolCallInvocationFrame(_Outbound):
    response_type: Literal["tool_call_invocation"] = "tool_call_invocation"
    tool_call_id: StrictStr
    name: StrictStr
    arguments: StrictStr = Field(description="The arguments as a JSON string, as Retell requires.")


class ToolCallResultFrame(_Outbound):
    response_type: Literal["tool_call_result"] = "tool_call_result"
    tool_call_id: StrictStr
    content: StrictStr
    successful: StrictBool | None = None


class AgentConfigUpdate(_Outbound):
    responsiveness: float | None = Field(default=None, ge=0, le=1)
    interruption_sensitivity: float | None = Field(default=None, ge=0, le=1)
    reminder_trigger_ms: StrictInt | None = Field(default=None, ge=0)
    reminder_max_count: StrictInt | None = Field(default=None, ge=0)


class UpdateAgentFrame(_Outbound):
    response_type: Literal["update_agent"] = "update_agent"
    agent_config: AgentConfigUpdate


class MetadataFrame(_Outbound):
    response_type: Literal["metadata"] = "metadata"
    metadata: dict[str, Any]


OutboundFrame = Union[
    ConfigFrame,
    PingPongFrame,
    ResponseFrame,
    AgentInterruptFrame,
    ToolCallInvocationFrame,
    ToolCallResultFrame,
    UpdateAgentFrame,
    MetadataFrame,
]

ConfigFrame.model_rebuild()


def config_frame(auto_reconnect: bool = True, call_details: bool = True) -> str:
    """The first frame on every socket (protocol §1, semantics 1)."""
    return ConfigFrame(config=ConfigBody(auto_reconnect=auto_reconnect, call_details=call_details)).to_json()


def pong_frame(timestamp: int) -> str:
    return PingPongFrame(timestamp=timestamp).to_json()
