"""What an agent is: something that turns one request of a call into a stream of speech.

An agent is stateless between calls; everything it must remember about one call lives in
``Turn.state``, a JSON-serialisable dict the conversation persists with the call (so a call
resumed on another host continues where it was). Agents never see sockets, response ids or
Retell frames: the conversation turns their output into frames.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Protocol, Union, runtime_checkable

# --------------------------------------------------------------------------- agent output


@dataclass(frozen=True)
class Speech:
    """A phrase to say. Several per turn; each becomes one ``response`` frame."""

    text: str
    no_interruption_allowed: bool = False


@dataclass(frozen=True)
class ToolCall:
    """Bookkeeping: the agent invoked a tool (becomes ``tool_call_invocation``)."""

    tool_call_id: str
    name: str
    arguments: str  # a JSON string, as Retell wants it


@dataclass(frozen=True)
class ToolResult:
    """Bookkeeping: a tool's result (becomes ``tool_call_result``)."""

    tool_call_id: str
    content: str
    successful: bool = True


@dataclass(frozen=True)
class EndCall:
    """Hang up after what was said this turn has been spoken."""


@dataclass(frozen=True)
class Transfer:
    """Transfer the call to ``number`` after this turn's speech."""

    number: str


@dataclass(frozen=True)
class PressDigit:
    """Press a DTMF digit (e.g. to navigate an IVR) after this turn's speech."""

    digit: str


AgentOutput = Union[Speech, ToolCall, ToolResult, EndCall, Transfer, PressDigit]


# --------------------------------------------------------------------------- agent input


@dataclass
class Turn:
    """One request of one call, as an agent sees it.

    ``transcript`` is Retell's whole conversation so far (list of ``{"role", "content"}``
    dicts, roles open-ended). ``state`` is the agent's memory for this call: mutate it in
    place; the conversation saves it after the turn. ``call`` is Retell's call object once
    ``call_details`` arrived (else empty). ``cacheable`` may be set to False by the agent
    while answering (e.g. the answer used a personal detail). ``memo`` lets an agent keep what
    it worked out in ``cache_key`` for ``respond`` of the same turn.
    """

    call_id: str
    kind: Literal["response", "reminder"]
    transcript: list[dict[str, Any]]
    state: dict[str, Any]
    call: dict[str, Any] = field(default_factory=dict)
    tool_results: dict[str, Any] = field(default_factory=dict)  # idempotency key -> result
    cacheable: bool = True
    memo: dict[str, Any] = field(default_factory=dict)  # an agent's scratch space for this one turn

    @property
    def last_user_text(self) -> str:
        """The caller's latest utterance ("" if the caller has not spoken)."""
        for entry in reversed(self.transcript):
            if entry.get("role") == "user":
                return str(entry.get("content") or "")
        return ""

    @property
    def variables(self) -> dict[str, str]:
        """Dynamic variables: Retell's ``retell_llm_dynamic_variables`` over the call metadata."""
        out: dict[str, str] = {}
        metadata = self.call.get("metadata")
        if isinstance(metadata, dict):
            out.update({str(k): str(v) for k, v in metadata.items() if isinstance(v, (str, int, float))})
        dyn = self.call.get("retell_llm_dynamic_variables")
        if isinstance(dyn, dict):
            out.update({str(k): str(v) for k, v in dyn.items()})
        return out


@runtime_checkable
class Agent(Protocol):
    """The interface every agent implements."""

    name: str
    version: str

    def begin_message(self, state: dict[str, Any], call: dict[str, Any]) -> str:
        """The greeting spoken as response 0 ("" lets the caller speak first)."""

    def cache_key(self, turn: Turn) -> str | None:
        """A key for the response cache if this turn's answer may be shared, else None.

        The key must capture everything the answer depends on besides the agent's name and
        version (e.g. the normalised utterance and the flow node). The conversation caches
        only turns that also used no tool, took no action and left ``turn.state`` unchanged.
        """

    def respond(self, turn: Turn) -> AsyncIterator[AgentOutput]:
        """Stream the answer. May raise; the conversation then speaks the fallback line."""

    @property
    def fallback_line(self) -> str:
        """Spoken when the agent fails or times out."""


# --------------------------------------------------------------------------- helpers

_APOSTROPHES = re.compile("[\u2018\u2019\u02bc\u2032`]")
_NON_WORD = re.compile(r"[^\w\s']+")
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower-case, strip accents and punctuation, collapse spaces: the form intents and the
    response cache compare."""
    text = _APOSTROPHES.sub("'", unicodedata.normalize("NFKD", text))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = _NON_WORD.sub(" ", text).replace("'", "")
    return _SPACES.sub(" ", text).strip()
