"""What an agent is: something that turns one request of a call into a stream of speech.

An agent is stateless between calls; everything it must remember about one call lives in
``Turn.state``, a JSON-serialisable dict the conversation persists with the call (so a call
resumed on another host continues where it was). Agents never see sockets, response ids or
Retell frames: the conversation turns their output into frames.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, ClassVar, Literal, Sequence, Union

from pydantic import BaseModel

from callray.agents.templates import fields, render

# --------------------------------------------------------------------------- agent output


@dataclass(frozen=True)
class Speech:
    """A phrase to say. Several per turn; Retell starts speaking at the first complete sentence.
    ``no_interruption_allowed`` keeps the caller from cutting it off (a closing or hand-off line)."""

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
    """Transfer the call to ``number`` after this turn's speech (the last line of the turn is
    sent uninterruptible: a caller talking over it would cancel the transfer)."""

    number: str
    show_transferee_as_caller: bool | None = None


@dataclass(frozen=True)
class PressDigit:
    """Press a DTMF digit (e.g. to navigate an IVR) after this turn's speech."""

    digit: str


@dataclass(frozen=True)
class UpdateAgent:
    """Change how Retell runs the rest of the call (``update_agent``); unset fields stay."""

    responsiveness: float | None = None  # 0..1: how fast Retell answers when the caller pauses
    interruption_sensitivity: float | None = None  # 0..1: how easily the caller cuts the agent off
    reminder_trigger_ms: int | None = None  # silence before Retell asks for a reminder
    reminder_max_count: int | None = None  # reminders per silence


@dataclass(frozen=True)
class Metadata:
    """Any JSON object, forwarded by Retell to a web call's front end (``metadata``)."""

    data: dict[str, Any]


@dataclass(frozen=True)
class Usage:
    """LLM tokens this turn used (summed per call in its events, analytics and the live page)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


AgentOutput = Union[Speech, ToolCall, ToolResult, EndCall, Transfer, PressDigit, UpdateAgent, Metadata, Usage]
#: What ``respond`` may yield; a plain ``str`` is taken as ``Speech(str)``.
OUTPUT_TYPES = (Speech, ToolCall, ToolResult, EndCall, Transfer, PressDigit, UpdateAgent, Metadata, Usage)


# --------------------------------------------------------------------------- agent input


@dataclass(frozen=True)
class ToolExchange:
    """A tool the agent called earlier in the call, and what it returned (None: no result yet)."""

    tool_call_id: str
    name: str
    arguments: str
    result: str | None = None
    successful: bool | None = None


@dataclass
class Turn:
    """One request of one call, as an agent sees it.

    ``transcript`` is Retell's whole conversation so far (list of ``{"role", "content"}``
    dicts, roles open-ended); ``history`` is the same with the tool calls and results in
    place, when Retell sent them. ``state`` is the agent's memory for this call: mutate it in
    place (JSON values only); the conversation saves it after the turn, so it survives
    reconnects, restarts and a move to another replica. ``call`` is Retell's call object once
    ``call_details`` arrived (else empty). ``cacheable`` may be set to False by the agent while
    answering (e.g. the answer used a personal detail). ``memo`` lets an agent keep what it
    worked out in ``cache_key`` for ``respond`` of the same turn.
    """

    call_id: str
    kind: Literal["response", "reminder"]
    transcript: list[dict[str, Any]]
    state: dict[str, Any]
    call: dict[str, Any] = field(default_factory=dict)
    tool_results: dict[str, Any] = field(default_factory=dict)  # idempotency key -> result, this turn's requests
    cacheable: bool = True
    memo: dict[str, Any] = field(default_factory=dict)  # an agent's scratch space for this one turn
    response_id: int = 0
    transcript_with_tool_calls: list[dict[str, Any]] | None = None

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
        return call_variables(self.call)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The transcript with tool calls and results in place (Retell's
        ``transcript_with_tool_calls``), or the plain transcript when Retell sent none."""
        return self.transcript_with_tool_calls if self.transcript_with_tool_calls is not None else self.transcript

    @property
    def tool_history(self) -> list[ToolExchange]:
        """Every tool call earlier in the call with its result, oldest first."""
        calls: dict[str, ToolExchange] = {}
        for entry in self.transcript_with_tool_calls or ():
            role, cid = entry.get("role"), str(entry.get("tool_call_id") or "")
            if role == "tool_call_invocation" and cid:
                calls[cid] = ToolExchange(cid, str(entry.get("name") or ""), str(entry.get("arguments") or "{}"))
            elif role == "tool_call_result" and cid in calls:
                ok = entry.get("successful")
                calls[cid] = replace(calls[cid], result=str(entry.get("content") or ""),
                                     successful=ok if isinstance(ok, bool) else None)
        return list(calls.values())


def call_variables(call: dict[str, Any]) -> dict[str, str]:
    """Variables of a call for templates: a few call fields, then metadata, then Retell's
    dynamic variables (later ones win)."""
    out = {k: str(call[k]) for k in ("call_id", "from_number", "to_number") if isinstance(call.get(k), str)}
    metadata = call.get("metadata")
    if isinstance(metadata, dict):
        out.update({str(k): str(v) for k, v in metadata.items() if isinstance(v, (str, int, float))})
    dyn = call.get("retell_llm_dynamic_variables")
    if isinstance(dyn, dict):
        out.update({str(k): str(v) for k, v in dyn.items()})
    return out


# --------------------------------------------------------------------------- the agent

def uses_variables(template: str) -> bool:
    """Whether a template has a placeholder (its greeting should wait for call_details)."""
    return bool(fields(template))


#: What the caller hears when an agent fails and has no fallback line of its own.
FALLBACK_LINE = "Sorry, I'm having trouble right now. Could you say that again?"


class Agent:
    """What every agent is: subclass it and write ``respond``; the rest has defaults.

    ``respond(turn)`` is an async generator of outputs (``Speech``, ``EndCall``, ``Transfer``,
    ``PressDigit``, ``UpdateAgent``, ``Metadata``, ``ToolCall``/``ToolResult``, ``Usage``; a
    ``str`` is taken as ``Speech``). The runtime around it keeps Retell's contract whatever it
    does: a holding phrase when it misses the latency budget, cancellation when the caller
    keeps talking, exactly one ``content_complete``, and ``fallback_line`` when it raises,
    hangs past ``turns.agent_timeout_s`` or yields something else.

    One instance serves every call of its deployment replica, concurrently: keep per-call data
    in ``turn.state``, never on ``self``. ``options`` is the agent file's ``options:`` mapping,
    validated by the class's ``Options`` model when it declares one.
    """

    name: str = ""  # set to the agent's configured name when loaded
    version: str = "1"  # part of the response cache's keys: bump it when answers change
    greeting: str = ""  # response 0; {variable} placeholders come from the call; "" lets the caller speak first
    fallback_line: str = FALLBACK_LINE
    common_questions: Sequence[str] = ()  # answered at start into the response cache (needs cache_key)
    #: True when ``respond`` never waits for anything (it answers from what it holds, as the flow
    #: agent does): it then runs inline in the turn, a loop turn sooner, and no holding phrase can
    #: be said while it works (it never keeps the caller waiting). Leave False for I/O.
    answers_at_once: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel] | None] = None

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options

    def begin_message(self, state: dict[str, Any], call: dict[str, Any]) -> str:
        """The greeting spoken as response 0 ("" lets the caller speak first)."""
        return render(self.greeting, call_variables(call).get).strip()

    @property
    def greeting_uses_call(self) -> bool:
        """Whether the greeting reads the call object, so it waits (bounded) for call_details."""
        return uses_variables(self.greeting) or type(self).begin_message is not Agent.begin_message

    def cache_key(self, turn: Turn) -> str | None:
        """A key for the response cache if this turn's answer may be shared, else None (the
        default: nothing is shared).

        The key must capture everything the answer depends on besides the agent's name and
        version (e.g. the normalised utterance). The conversation caches only turns that also
        used no tool, took no action and left ``turn.state`` unchanged.
        """
        return None

    async def respond(self, turn: Turn) -> AsyncIterator[AgentOutput]:
        """Stream the answer. May raise; the conversation then speaks the fallback line."""
        raise NotImplementedError(f"{type(self).__name__}.respond")
        yield  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        """Release what the agent holds open (pooled connections); called at shutdown."""


# --------------------------------------------------------------------------- helpers

_APOSTROPHES = re.compile("[\u2018\u2019\u02bc\u2032]")
_NON_WORD = re.compile(r"[^\w\s']+")
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower-case, strip accents and punctuation, collapse spaces: the form intents and the
    response cache compare."""
    if not text.isascii():  # ASCII has nothing to strip (most speech: a third of a turn's matching)
        text = plain_letters(text)
    text = _NON_WORD.sub(" ", text.replace("`", "'").lower()).replace("'", "")
    return _SPACES.sub(" ", text).strip()


def plain_letters(text: str) -> str:
    """``text`` without accents, its typographic apostrophes made plain (identity on ASCII)."""
    text = _APOSTROPHES.sub("'", unicodedata.normalize("NFKD", text))
    return "".join(c for c in text if not unicodedata.combining(c))
