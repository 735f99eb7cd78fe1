"""Retell's custom-LLM WebSocket protocol as pydantic models.

Lenient on input: unknown fields, roles and interaction types are kept, never rejected, so a
new Retell feature cannot make a turn fail. Strict on output: ints are ints, booleans are
booleans, unset optional fields are omitted and ``response_type`` is always set, because Retell
silently drops a frame whose types are wrong.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

# --------------------------------------------------------------------------- inbound


class _Inbound(BaseModel):
    model_config = ConfigDict(extra="allow")


class Utterance(TypedDict):
    """One entry of Retell's transcript, as a plain dict. ``role`` is open-ended (agent, user,
    transfer_target...). Only ``role`` and ``content`` are kept: word timings and any other
    field are skipped while decoding, because no turn reads them and every event repeats the
    whole transcript (building their objects was two thirds of the cost of a frame)."""

    __pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[misc]
    role: str
    content: NotRequired[str]


class HistoryEntry(TypedDict):
    """One entry of Retell's ``transcript_with_tool_calls``: an utterance, or a tool call or
    result (``role`` tells which). Word timings and other fields are skipped, as in
    ``Utterance``."""

    __pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[misc]
    role: str
    content: NotRequired[str]
    tool_call_id: NotRequired[str]
    name: NotRequired[str]
    arguments: NotRequired[str]
    successful: NotRequired[bool]


class PingPong(_Inbound):
    interaction_type: Literal["ping_pong"]
    timestamp: int


class CallDetails(_Inbound):
    interaction_type: Literal["call_details"]
    call: dict[str, Any] = Field(default_factory=dict)


class UpdateOnly(_Inbound):
    """A partial transcript while someone talks. It asks for nothing, so its transcript is
    not even decoded: only the request that follows carries one that matters."""

    model_config = ConfigDict(extra="ignore")
    interaction_type: Literal["update_only"]
    turntaking: str | None = None


class ResponseRequired(_Inbound):
    interaction_type: Literal["response_required"]
    response_id: int = Field(ge=0)
    transcript: list[Utterance] = Field(default_factory=list)
    transcript_with_tool_calls: list[HistoryEntry] | None = None


class ReminderRequired(_Inbound):
    interaction_type: Literal["reminder_required"]
    response_id: int = Field(ge=0)
    transcript: list[Utterance] = Field(default_factory=list)
    transcript_with_tool_calls: list[HistoryEntry] | None = None


class UnknownInteraction(_Inbound):
    """A well-formed message of a type this version does not know: tolerated and ignored."""

    interaction_type: str


KnownInbound = Annotated[
    Union[PingPong, CallDetails, UpdateOnly, ResponseRequired, ReminderRequired],
    Field(discriminator="interaction_type"),
]
InboundEvent = Union[PingPong, CallDetails, UpdateOnly, ResponseRequired, ReminderRequired, UnknownInteraction]
RequestEvent = Union[ResponseRequired, ReminderRequired]


class ProtocolError(BaseModel):
    """Why an inbound frame could not be used. Returned, never raised, by :func:`parse_frame`."""

    kind: Literal["binary", "not_json", "not_object", "missing_type", "invalid"]
    detail: str
    interaction_type: str | None = None

    def __str__(self) -> str:
        where = f" ({self.interaction_type})" if self.interaction_type else ""
        return f"{self.kind}{where}: {self.detail}"


_KNOWN: TypeAdapter[InboundEvent] = TypeAdapter(KnownInbound)
_UNKNOWN_TAGS = ("union_tag_invalid", "union_tag_not_found")
MAX_CALL_DEPTH = 32  # the call object is stored with the call's state; keep it serialisable


def parse_frame(frame: str | bytes) -> InboundEvent | ProtocolError:
    """Parse one WebSocket frame in one pass (JSON and the model together). Retell only sends
    text frames holding one JSON object; anything else is a :class:`ProtocolError`."""
    if isinstance(frame, (bytes, bytearray)):
        return ProtocolError(kind="binary", detail=f"binary frame of {len(frame)} bytes; Retell sends text")
    try:
        event = _KNOWN.validate_json(frame)
    except ValidationError as exc:
        return _frame_error(frame, exc)
    if isinstance(event, CallDetails) and _depth(event.call) > MAX_CALL_DEPTH:
        return ProtocolError(kind="invalid", interaction_type="call_details",
                             detail=f"field 'call' nested deeper than {MAX_CALL_DEPTH} levels")
    return event


def parse_event(data: Any) -> InboundEvent | ProtocolError:
    """Validate an already-decoded JSON value as a Retell message (tests, tools)."""
    return parse_frame(json.dumps(data)) if isinstance(data, dict) else ProtocolError(
        kind="not_object", detail=f"expected a JSON object, got {type(data).__name__}")


def _frame_error(frame: str, exc: ValidationError) -> InboundEvent | ProtocolError:
    """The typed error for a frame the known models refused; an unknown type is tolerated."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return ProtocolError(kind="not_json", detail=str(first.get("ctx", {}).get("error", first["msg"])))
    if first["type"] == "model_attributes_type" or (first["type"] == "dict_type" and not first["loc"]):
        return ProtocolError(kind="not_object", detail=f"expected a JSON object, got {type(first['input']).__name__}")
    if first["type"] in _UNKNOWN_TAGS:
        try:
            return UnknownInteraction.model_validate_json(frame)
        except ValidationError:
            return ProtocolError(kind="missing_type", detail="no string field 'interaction_type'")
    kind = first["loc"][0] if first["loc"] else None
    field = ".".join(str(p) for p in first["loc"][1:]) or "(root)"
    return ProtocolError(kind="invalid", interaction_type=kind if isinstance(kind, str) else None,
                         detail=f"field {field!r}: {first['msg']}")


def _depth(value: Any, limit: int = MAX_CALL_DEPTH + 1) -> int:
    """Nesting depth of a JSON value, counted no further than ``limit``."""
    if limit <= 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


# --------------------------------------------------------------------------- outbound


class _Outbound(BaseModel):
    model_config = ConfigDict(extra="forbid")
    _wire: str | None = PrivateAttr(default=None)

    def to_json(self) -> str:
        """The frame as Retell expects it (unset optional fields omitted), serialised once: its
        producer serialises it where a failure can still be handled, the socket's writer (in
        this process or, with dedicated placement, across Ray) sends the same text."""
        if self._wire is None:
            self._wire = self.model_dump_json(exclude_none=True)
        return self._wire


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


class AgentConfigBody(_Outbound):
    responsiveness: float | None = Field(default=None, ge=0, le=1)
    interruption_sensitivity: float | None = Field(default=None, ge=0, le=1)
    reminder_trigger_ms: StrictInt | None = Field(default=None, gt=0)
    reminder_max_count: StrictInt | None = Field(default=None, ge=0)


class UpdateAgentFrame(_Outbound):
    """Changes how Retell runs the rest of the call; unset fields stay as they are."""

    response_type: Literal["update_agent"] = "update_agent"
    agent_config: AgentConfigBody


class MetadataFrame(_Outbound):
    """Any JSON object, forwarded to a web call's front end."""

    response_type: Literal["metadata"] = "metadata"
    metadata: dict[str, Any]


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

