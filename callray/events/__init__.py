"""The events a call emits for background consumers (analytics, archive, escalation), and
the bus that carries them (``bus.py``: the interface and the producers' buffer; ``memory.py``
and ``redis_streams.py``: its two backends; ``consume.py``: a consumer's loop).

Consumers are idempotent under at-least-once delivery, so an event's identity must survive
crashes: it is (call_id, epoch, seq), where ``epoch`` is the owner epoch of the activation that
emitted it (every activation claims a new one in the state store) and ``seq`` counts within the
call. A host that dies before saving its counter cannot make its successor reuse an identity.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

#: Events not counted by a call's activation (epoch 0) take fixed seqs far above any call's own
#: counter, one range per producer, so a re-emitted one has the same identity and is dropped
#: downstream as a duplicate: Retell's webhooks, and the (at most one) escalation of a call.
WEBHOOK_SEQ_BASE = 1_000_000_000_000
ESCALATION_SEQ_BASE = 2_000_000_000_000


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow")

    call_id: str
    seq: int = Field(ge=0, description="Per-call sequence number within the emitting activation.")
    epoch: int = Field(default=0, ge=0, description="Owner epoch of the activation that emitted it (0: not from a "
                                                    "call's activation, e.g. a webhook or an escalation).")
    ts: float = Field(default_factory=time.time, description="Unix time in seconds.")
    agent: str = ""
    host: str = Field(default="", description="The process (gateway replica or call actor) that held the call.")

    @property
    def key(self) -> tuple[int, int]:
        """The event's identity within its call: unique across crashes and activations."""
        return self.epoch, self.seq


class CallStarted(_Event):
    type: Literal["call.started"] = "call.started"
    reconnect: bool = False


class CallTurn(_Event):
    type: Literal["call.turn"] = "call.turn"
    response_id: int
    kind: Literal["response", "reminder"] = "response"
    caller_text: str = ""
    agent_text: str = ""
    first_chunk_ms: float | None = None
    first_sentence_ms: float | None = None
    complete_ms: float | None = None
    cache_hit: bool = False
    budget_miss: bool = False
    fallback: bool = False
    tools: list[str] = Field(default_factory=list)
    action: str | None = None
    agent_error: str | None = None  # the type of the exception (or bad output) that made it a fallback
    prompt_tokens: int = 0  # LLM usage of this turn, as the provider counted it
    completion_tokens: int = 0


class CallSuperseded(_Event):
    type: Literal["call.superseded"] = "call.superseded"
    response_id: int
    by_response_id: int


class CallEnded(_Event):
    type: Literal["call.ended"] = "call.ended"
    reason: str = ""
    call: dict[str, Any] = Field(default_factory=dict)


class CallAnalyzed(_Event):
    type: Literal["call.analyzed"] = "call.analyzed"
    call: dict[str, Any] = Field(default_factory=dict)


class EscalationRequested(_Event):
    type: Literal["escalation.requested"] = "escalation.requested"
    rule: str
    reason: str = ""


class EscalationPerformed(_Event):
    type: Literal["escalation.performed"] = "escalation.performed"
    rule: str
    transfer_number: str = ""


Event = Annotated[
    Union[CallStarted, CallTurn, CallSuperseded, CallEnded, CallAnalyzed, EscalationRequested, EscalationPerformed],
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(data: dict[str, Any] | str | bytes) -> Event:
    """Decode an event from a dict or its JSON form (raises pydantic.ValidationError)."""
    if isinstance(data, (str, bytes)):
        return EVENT_ADAPTER.validate_json(data)
    return EVENT_ADAPTER.validate_python(data)
