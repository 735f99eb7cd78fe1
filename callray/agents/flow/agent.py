"""The flow agent: callray's embedded default agent, a receptionist defined in YAML.

It needs no API key and no network, so it is what a newcomer hears first. It matches the
caller's normalised words against intents, fills slots (a day, the caller's name) over several
turns, hands off to a person and hangs up politely. Everything it remembers about a call lives
in ``Turn.state`` (``slots`` and ``pending``), so a call resumed on another host continues
where it was.

Templates (greeting, answers, prompts, lines) use ``{slot}`` or ``{slot|default}`` for slot
values and call variables, and ``[...]`` for an optional segment that is dropped when a value
inside it is missing: ``"I've pencilled you in for {day}[, {name}]."``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from callray.agents.config import AgentConfigError, read_agent_yaml
from callray.agents.base import (
    Agent,
    AgentOutput,
    EndCall,
    Metadata,
    Speech,
    Transfer,
    Turn,
    UpdateAgent,
    call_variables,
    normalise,
)
from callray.env import describe_validation

__all__ = [
    "AgentConfigError",
    "EscalationConfig",
    "FlowAgent",
    "FlowAgentConfig",
    "GoodbyeConfig",
    "IntentConfig",
    "SlotConfig",
    "SlotValue",
    "load_flow_agent",
]


# --------------------------------------------------------------------------- text helpers

_UNINTELLIGIBLE = re.compile(r"\(\s*unintelligible audio\s*\)", re.IGNORECASE)


def _contains(haystack: str, needle: str) -> int:
    """Word-aligned position of normalised ``needle`` in normalised ``haystack``, or -1."""
    return f" {haystack} ".find(f" {needle} ")


# --------------------------------------------------------------------------- templates

_FIELD = re.compile(r"\{(\w+)(?:\|([^{}\[\]]*))?\}")
_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")
_TOKEN = re.compile(rf"{_OPTIONAL.pattern}|{_FIELD.pattern}")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:])")
_SPACES = re.compile(r"\s+")


def _check_template(text: str) -> str:
    bare = _OPTIONAL.sub("", _FIELD.sub("", text))
    if "{" in bare or "}" in bare:
        raise ValueError("malformed placeholder: write {slot} or {slot|default}")
    if "[" in bare or "]" in bare:
        raise ValueError("unbalanced '[' ']': optional segments are [ ... ] and cannot nest")
    return text


def _template_fields(text: str) -> set[str]:
    return {m.group(1) for m in _FIELD.finditer(text)}


class _Renderer:
    """Fills templates from slots and call variables, recording which values it used."""

    def __init__(self, slots: dict[str, str], variables: dict[str, str], personal_slots: set[str]):
        self.slots, self.variables, self.personal_slots = slots, variables, personal_slots
        self.used: dict[str, str] = {}
        self.personal = False

    def _lookup(self, name: str) -> str | None:
        if name in self.slots:
            return self.slots[name]
        return self.variables.get(name)

    def _fill(self, name: str, default: str | None) -> str:
        value = self._lookup(name)
        if value is None:
            return default or ""
        self.used[name] = value
        # Call variables are per-call data (a caller's name, an account): treat them as personal.
        if name in self.personal_slots or name not in self.slots:
            self.personal = True
        return value

    def _token(self, m: re.Match[str]) -> str:
        segment, name, default = m.groups()
        if segment is None:
            return self._fill(name, default)
        fields = list(_FIELD.finditer(segment))
        if any(self._lookup(f.group(1)) is None and f.group(2) is None for f in fields):
            return ""  # an optional segment with a missing value is left out
        return _FIELD.sub(lambda f: self._fill(f.group(1), f.group(2)), segment)

    def render(self, template: str) -> str:
        """One pass over the template, so values are never read as placeholders themselves."""
        text = _TOKEN.sub(self._token, template)
        return _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", text)).strip()


# --------------------------------------------------------------------------- matching

_Keyword = tuple[tuple[tuple[str, bool], ...], ...]  # terms -> alternatives -> (word, prefix)


def _parse_keywords(entry: str) -> _Keyword:
    terms = []
    for term in entry.split():
        alternatives = []
        for alt in term.split("|"):
            word = normalise(alt.rstrip("*"))
            if not word or " " in word:
                raise ValueError(f"{alt!r} is not one word after normalisation ({word!r}); list its words separately")
            alternatives.append((word, alt.endswith("*")))
        terms.append(tuple(alternatives))
    if not terms:
        raise ValueError("empty keyword set")
    return tuple(terms)


def _check_phrase(text: str) -> str:
    if not normalise(text):
        raise ValueError(f"{text!r} is empty after normalisation")
    return text


def _check_keywords(text: str) -> str:
    _parse_keywords(text)
    return text


def _check_regex(text: str) -> str:
    try:
        groups = re.compile(text).groups
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from exc
    if groups != 1:
        raise ValueError(f"needs exactly one capturing group (has {groups}); use (?:...) for the others")
    return text


Template = Annotated[str, AfterValidator(_check_template)]
Phrase = Annotated[str, AfterValidator(_check_phrase)]
KeywordSet = Annotated[str, AfterValidator(_check_keywords)]
Regex = Annotated[str, AfterValidator(_check_regex)]

EXACT, PHRASE, KEYWORDS = 3, 2, 1  # score tiers: a phrase beats any keyword set
Score = tuple[int, int]  # (tier, size): a longer phrase or a bigger keyword set wins within a tier


@dataclass(frozen=True)
class _Matcher:
    """One intent's (or the escalation's, the goodbye's) normalised phrases and keyword sets."""

    phrases: tuple[str, ...]
    exact: tuple[str, ...]
    keywords: tuple[_Keyword, ...]


class _MatchIndex:
    """Every matcher of an agent in hash tables, built once: scoring an utterance costs
    O(words x longest phrase), whatever the number of intents, phrases and keywords.

    A matcher scores the best of: the whole utterance equal to one of its phrases (EXACT), one
    of its phrases contained word-aligned (PHRASE), and, only when neither, a keyword set whose
    every term matches some word (KEYWORDS); a longer phrase or a bigger set wins in a tier.
    """

    def __init__(self, matchers: dict[str, _Matcher]):
        self._whole: dict[str, list[tuple[str, int]]] = {}  # utterance -> (key, words)
        self._grams: dict[str, list[tuple[str, int]]] = {}  # word n-gram -> (key, words)
        self._words: dict[str, list[tuple[tuple[str, int], int]]] = {}  # word -> ((key, set), term)
        self._prefixes: dict[str, list[tuple[tuple[str, int], int]]] = {}  # word prefix -> ((key, set), term)
        self._terms: dict[tuple[str, int], int] = {}  # (key, set) -> its number of terms
        self._longest = 1
        self._starts: set[str] = set()  # first words of phrases: n-grams start nowhere else
        for key, matcher in matchers.items():
            for phrase in matcher.exact + matcher.phrases:
                self._whole.setdefault(phrase, []).append((key, phrase.count(" ") + 1))
            for phrase in matcher.phrases:
                size = phrase.count(" ") + 1
                self._grams.setdefault(phrase, []).append((key, size))
                self._longest = max(self._longest, size)
                self._starts.add(phrase.split(" ", 1)[0])
            for k, terms in enumerate(matcher.keywords):
                self._terms[(key, k)] = len(terms)
                for t, alternatives in enumerate(terms):
                    for word, prefix in alternatives:
                        (self._prefixes if prefix else self._words).setdefault(word, []).append(((key, k), t))
        self._prefix_lengths = sorted({len(p) for p in self._prefixes})

    def scores(self, utterance: str) -> dict[str, Score]:
        """The score of every matcher that matches ``utterance`` (normalised)."""
        best: dict[str, Score] = {}

        def offer(key: str, score: Score) -> None:
            if score > best.get(key, (0, 0)):
                best[key] = score

        for key, size in self._whole.get(utterance, ()):
            offer(key, (EXACT, size))
        words = utterance.split()
        for i, first in enumerate(words):
            if first not in self._starts:
                continue
            gram = first
            for n in range(1, min(self._longest, len(words) - i) + 1):
                if n > 1:
                    gram = f"{gram} {words[i + n - 1]}"
                for key, size in self._grams.get(gram, ()):
                    offer(key, (PHRASE, size))
        matched: dict[tuple[str, int], set[int]] = {}
        for word in set(words):
            for owner, term in self._words.get(word, ()):
                matched.setdefault(owner, set()).add(term)
            for length in self._prefix_lengths:
                if length > len(word):
                    break
                for owner, term in self._prefixes.get(word[:length], ()):
                    matched.setdefault(owner, set()).add(term)
        by_phrase = set(best)
        for (key, k), terms in matched.items():
            if key not in by_phrase and len(terms) == self._terms[(key, k)]:
                offer(key, (KEYWORDS, len(terms)))
        return best


# --------------------------------------------------------------------------- config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _MatchConfig(_Strict):
    phrases: list[Phrase] = Field(
        default_factory=list,
        description="Phrases that match when the caller's normalised words contain them "
        "(a phrase equal to the whole utterance scores higher).",
    )
    exact: list[Phrase] = Field(
        default_factory=list,
        description="Phrases that match only as the caller's whole utterance (e.g. 'thanks').",
    )
    keywords: list[KeywordSet] = Field(
        default_factory=list,
        description="Word sets: every word of an entry must occur, in any order. 'a|b' gives "
        "alternatives, 'word*' matches words starting with 'word'.",
    )

    @model_validator(mode="after")
    def _has_matchers(self) -> _MatchConfig:
        if not (self.phrases or self.exact or self.keywords):
            raise ValueError("needs at least one of phrases, exact or keywords")
        return self

    def compile(self) -> _Matcher:
        return _Matcher(
            phrases=tuple(normalise(p) for p in self.phrases),
            exact=tuple(normalise(p) for p in self.exact),
            keywords=tuple(_parse_keywords(k) for k in self.keywords),
        )


class AgentConfigUpdate(_Strict):
    """What an answer may change of Retell's agent for the rest of the call (``update_agent``)."""

    responsiveness: float | None = Field(default=None, ge=0, le=1, description="How quickly the agent answers a pause (0..1).")
    interruption_sensitivity: float | None = Field(default=None, ge=0, le=1, description="How easily the caller cuts the agent off (0..1).")
    reminder_trigger_ms: int | None = Field(default=None, gt=0, description="Silence before a reminder, in ms.")
    reminder_max_count: int | None = Field(default=None, ge=0, description="Reminders per silence.")


class IntentConfig(_MatchConfig):
    """Something the caller may ask, and the answer."""

    name: str = Field(pattern=r"^\w+$", description="Unique intent name (letters, digits, _).")
    answer: Template = Field(description="What to say; may use {slot}, {slot|default} and [optional {slot}] segments.")
    requires: list[str] = Field(
        default_factory=list,
        description="Slots that must be known before answering; missing ones are asked for in order.",
    )
    ask: dict[str, Template] = Field(
        default_factory=dict, description="Prompt per required slot, spoken when that slot is missing."
    )
    cacheable: bool | None = Field(
        default=None,
        description="Override response caching: false never caches; true caches even answers "
        "using personal slots (keyed by their values); unset decides automatically.",
    )
    update_agent: AgentConfigUpdate | None = Field(
        default=None, description="Sent with the answer: how Retell runs the rest of the call (update_agent)."
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description="Sent with the answer: a JSON object for a web call's front end (metadata)."
    )

    @model_validator(mode="after")
    def _prompts_match_requires(self) -> IntentConfig:
        for slot in self.requires:
            if slot not in self.ask:
                raise ValueError(f"ask: no prompt for required slot {slot!r}")
        for slot in self.ask:
            if slot not in self.requires:
                raise ValueError(f"ask.{slot}: {slot!r} is not in requires")
        return self


class SlotValue(_Strict):
    """One allowed value of a slot and the words callers use for it."""

    value: str = Field(min_length=1, description="The canonical value stored and spoken (e.g. 'Tuesday').")
    synonyms: list[Phrase] = Field(
        default_factory=list, description="Other ways to say it (e.g. 'tuesdays'); the value itself always matches."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"value": data} if isinstance(data, str) else data


class SlotConfig(_Strict):
    """How to extract one piece of information from what the caller says."""

    patterns: list[Regex] = Field(
        default_factory=list,
        description="Regular expressions with one capturing group, searched in the raw utterance "
        "(use (?i:...) for case-insensitive parts).",
    )
    values: list[SlotValue] = Field(
        default_factory=list, description="Allowed values with synonyms, matched on normalised words."
    )
    reject: list[str] = Field(
        default_factory=list,
        description="Pattern captures whose first word is one of these are ignored (\"I'm Calling\" is not a name).",
    )
    capitalize: bool = Field(default=False, description="Upper-case the first letter of each captured word (names).")
    listen: Literal["always", "when_needed"] = Field(
        default="when_needed",
        description="always: taken from any utterance (e.g. a name said in passing); when_needed: only "
        "while an intent that uses the slot is being answered or is waiting for it.",
    )
    personal: bool = Field(
        default=False, description="Answers using this slot are about one caller and are not cached."
    )

    @model_validator(mode="after")
    def _has_source(self) -> SlotConfig:
        if not (self.patterns or self.values):
            raise ValueError("needs patterns or values")
        return self


class EscalationConfig(_MatchConfig):
    """When the caller asks for a person: say a handoff line, then transfer."""

    handoff_line: Template = Field(description="Spoken before the transfer; the caller cannot interrupt it "
                                   "(talking over it would cancel the transfer).")
    transfer_number: str = Field(pattern=r"^\S+$", description="Where to transfer (E.164, e.g. +15550100200).")
    show_transferee_as_caller: bool | None = Field(
        default=None, description="Show the caller's number to the person the call is transferred to.")


class GoodbyeConfig(_MatchConfig):
    """When the caller is done: say a closing line that cannot be interrupted, then hang up."""

    closing_line: Template = Field(description="Spoken before hanging up.")


class FlowAgentConfig(_Strict):
    """A flow agent definition (the YAML file)."""

    kind: Literal["flow"] = Field(default="flow", description="Agent type.")
    name: str = Field(min_length=1, description="Agent name (part of the response cache key).")
    version: str = Field(min_length=1, description="Bump when answers change: it namespaces the response cache.")
    greeting: Template = Field(
        description="Begin message; may use call variables ({customer_name}); \"\" lets the caller speak first."
    )
    intents: list[IntentConfig] = Field(
        default_factory=list, description="What callers ask; ties go to the intent declared first."
    )
    slots: dict[str, SlotConfig] = Field(default_factory=dict, description="Slot name -> how to extract it.")
    escalation: EscalationConfig | None = Field(default=None, description="Hand-off to a person (checked first).")
    goodbye: GoodbyeConfig | None = Field(default=None, description="Ending the call (checked second).")
    fallback_line: Template = Field(description="Spoken when nothing matched, or when the agent fails.")
    reminder_line: Template = Field(description="Spoken when the caller has gone quiet.")
    unclear_line: Template | None = Field(
        default=None, description="Spoken when the audio was unintelligible or empty (default: fallback_line)."
    )
    common_questions: list[str] = Field(
        default_factory=list,
        description="Questions whose answers are computed once at start and put in the response cache.",
    )

    @model_validator(mode="after")
    def _cross_references(self) -> FlowAgentConfig:
        seen: set[str] = set()
        for i, intent in enumerate(self.intents):
            if intent.name in seen:
                raise ValueError(f"intents.{i}.name: duplicate intent name {intent.name!r}")
            seen.add(intent.name)
            for j, slot in enumerate(intent.requires):
                if slot not in self.slots:
                    known = ", ".join(sorted(self.slots)) or "none"
                    raise ValueError(f"intents.{i}.requires.{j}: unknown slot {slot!r} (slots: {known})")
        for name in self.slots:
            if not re.fullmatch(r"\w+", name):
                raise ValueError(f"slots.{name}: slot names are letters, digits and _")
        return self


# --------------------------------------------------------------------------- runtime


@dataclass
class _Slot:
    name: str
    patterns: list[re.Pattern[str]]
    values: list[tuple[str, list[str]]]  # canonical value, normalised forms
    reject: frozenset[str]
    capitalize: bool
    always: bool

    @classmethod
    def build(cls, name: str, cfg: SlotConfig) -> _Slot:
        return cls(
            name=name,
            patterns=[re.compile(p) for p in cfg.patterns],
            values=[(v.value, [normalise(v.value), *(normalise(s) for s in v.synonyms)]) for v in cfg.values],
            reject=frozenset(normalise(r) for r in cfg.reject),
            capitalize=cfg.capitalize,
            always=cfg.listen == "always",
        )

    def extract(self, text: str, utterance: str) -> tuple[str, tuple[int, int] | None] | None:
        """The slot's value in this utterance and, for a pattern capture, the span of ``text``
        it matched: the first accepted capture, else the allowed value mentioned earliest
        (the longest form on a tie)."""
        for pattern in self.patterns:
            for m in pattern.finditer(text):
                value = (m.group(1) or "").strip(" \t.,;:!?\"")
                words = normalise(value).split()
                if not words or words[0] in self.reject:
                    continue
                if self.capitalize:
                    value = " ".join(w[:1].upper() + w[1:] for w in value.split())
                return value, m.span()
        best: tuple[int, int, str] | None = None
        for canonical, forms in self.values:
            for form in forms:
                pos = _contains(utterance, form)
                if pos >= 0 and (best is None or (pos, -len(form)) < (best[0], -best[1])):
                    best = (pos, len(form), canonical)
        return (best[2], None) if best else None


@dataclass
class _Intent:
    cfg: IntentConfig
    slots: frozenset[str]  # slots it requires or mentions


_ESCALATION, _GOODBYE = "escalation:", "goodbye:"  # index keys that no intent name (\w+) can take


@dataclass
class _Plan:
    """What one turn will say and do, computed without touching the turn (so ``cache_key``
    and ``respond`` agree)."""

    utterance: str
    slots_before: dict[str, str]
    pending_before: dict[str, str] | None
    slots: dict[str, str]
    pending: dict[str, str] | None
    renderer: _Renderer
    lines: list[tuple[str, bool]] = field(default_factory=list)  # (text, no_interruption_allowed)
    action: Transfer | EndCall | None = None
    extras: list[UpdateAgent | Metadata] = field(default_factory=list)  # sent before the answer
    cacheable: bool | None = None  # an intent's override

    def say(self, template: str, protected: bool = False) -> None:
        self.lines.append((self.renderer.render(template), protected))

    @property
    def changes_state(self) -> bool:
        return self.slots != self.slots_before or self.pending != self.pending_before

    @property
    def shareable(self) -> bool:
        """Whether the answer may be served to another caller from the cache."""
        if self.cacheable is not None:
            return self.cacheable
        return not self.renderer.personal

    def outputs(self) -> list[AgentOutput]:
        """The answer as few frames as it can be: the whole text is known at once, so phrases
        would only add frames for the Serve proxy to relay (its main cost per call). Lines
        are split only where ``no_interruption_allowed`` changes."""
        out: list[AgentOutput] = list(self.extras)
        for text, protected in self.lines:
            text = " ".join(text.split())
            if not text:
                continue
            if out and isinstance(out[-1], Speech) and out[-1].no_interruption_allowed == protected:
                out[-1] = Speech(f"{out[-1].text} {text}", no_interruption_allowed=protected)
            else:  # a later frame carries its leading space: concatenated they read right
                spoken = any(isinstance(o, Speech) for o in out)
                out.append(Speech(f" {text}" if spoken else text, no_interruption_allowed=protected))
        if self.action is not None:
            out.append(self.action)
        return out

    def apply(self, state: dict[str, Any]) -> None:
        changes = (("slots", self.slots_before, self.slots), ("pending", self.pending_before, self.pending))
        for key, before, after in changes:
            if after != before:
                if after:
                    state[key] = after
                else:
                    state.pop(key, None)


def _last_user_text(transcript: Any) -> str:
    """The caller's latest utterance, skipping entries of other roles or odd shapes."""
    if not isinstance(transcript, list):
        return ""
    for entry in reversed(transcript):
        if isinstance(entry, dict) and entry.get("role") == "user":
            content = entry.get("content")
            return content if isinstance(content, str) else ""
    return ""


def _variables(call: Any) -> dict[str, str]:
    return call_variables(call) if isinstance(call, dict) else {}


class FlowAgent(Agent):
    """An Agent answering from a ``FlowAgentConfig``; stateless, safe to share between calls."""

    def __init__(self, config: FlowAgentConfig):
        self.config = config
        self.name = config.name
        self.version = config.version
        self.common_questions = config.common_questions
        self._slots = {name: _Slot.build(name, cfg) for name, cfg in config.slots.items()}
        self._personal = {name for name, cfg in config.slots.items() if cfg.personal}
        self._intents: dict[str, _Intent] = {}
        matchers: dict[str, _Matcher] = {}
        for intent in config.intents:
            mentioned = _template_fields(intent.answer).union(*(_template_fields(a) for a in intent.ask.values()))
            self._intents[intent.name] = _Intent(cfg=intent, slots=frozenset(intent.requires) | (mentioned & self._slots.keys()))
            matchers[intent.name] = intent.compile()
        if config.escalation:
            matchers[_ESCALATION] = config.escalation.compile()
        if config.goodbye:
            matchers[_GOODBYE] = config.goodbye.compile()
        self._index = _MatchIndex(matchers)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> FlowAgent:
        """Validate a parsed definition; problems raise ``AgentConfigError`` naming ``source``."""
        if not isinstance(data, dict):
            raise AgentConfigError(source, [f"expected a mapping of fields, got {type(data).__name__}"])
        try:
            return cls(FlowAgentConfig.model_validate(data))
        except ValidationError as exc:
            raise AgentConfigError(source, describe_validation(exc)) from None

    # ----------------------------------------------------------------- Agent interface

    @property
    def fallback_line(self) -> str:
        return _Renderer({}, {}, set()).render(self.config.fallback_line)

    def begin_message(self, state: dict[str, Any], call: dict[str, Any]) -> str:
        return _Renderer(self._stored_slots(state), _variables(call), self._personal).render(self.config.greeting)

    @property
    def greeting_uses_call(self) -> bool:
        return bool(_template_fields(self.config.greeting) - self._slots.keys())

    def cache_key(self, turn: Turn) -> str | None:
        """The normalised utterance plus the state the answer depends on (pending intent,
        filled slots, values used), or None when the answer is not shareable: reminders,
        empty or unintelligible input, personal answers, and turns that change the state
        or take an action (the conversation would not cache those anyway)."""
        if turn.kind != "response":
            return None
        plan = self._planned(turn)
        if not plan.utterance or plan.action is not None or plan.changes_state or not plan.shareable:
            return None
        key = {
            "u": plan.utterance,
            "pending": plan.pending_before,
            "filled": sorted(plan.slots_before),
            "used": plan.renderer.used,
        }
        return "flow:" + json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    async def respond(self, turn: Turn) -> AsyncIterator[AgentOutput]:
        plan = self._planned(turn)
        if not plan.shareable:
            turn.cacheable = False
        outputs = plan.outputs()
        if not outputs:  # every template rendered empty: nothing to say, still remember
            plan.apply(turn.state)
        for i, output in enumerate(outputs):
            if i == len(outputs) - 1:
                # State changes land with the last output: a generation cancelled because the
                # caller kept talking leaves the call's memory untouched.
                plan.apply(turn.state)
            yield output

    # ----------------------------------------------------------------- the flow

    def _stored_slots(self, state: Any) -> dict[str, str]:
        slots = state.get("slots") if isinstance(state, dict) else None
        if not isinstance(slots, dict):
            return {}
        return {k: v for k, v in slots.items() if k in self._slots and isinstance(v, str)}

    def _stored_pending(self, state: Any) -> dict[str, str] | None:
        pending = state.get("pending") if isinstance(state, dict) else None
        if not isinstance(pending, dict):
            return None
        name = pending.get("intent")
        intent = self._intents.get(name) if isinstance(name, str) else None
        if intent is None or pending.get("slot") not in intent.cfg.requires:
            return None  # e.g. saved by an older version of the flow
        return {"intent": intent.cfg.name, "slot": pending["slot"]}

    def _planned(self, turn: Turn) -> _Plan:
        """The turn's plan, computed once whether ``cache_key``, ``respond`` or both ask."""
        plan = turn.memo.get("flow_plan")
        if plan is None:
            plan = turn.memo["flow_plan"] = self._plan(turn)
        return plan

    def _best_intent(self, scores: dict[str, Score]) -> _Intent | None:
        best: tuple[Score, _Intent] | None = None
        for name, intent in self._intents.items():
            score = scores.get(name)
            if score is not None and (best is None or score > best[0]):  # strict: first declared wins ties
                best = (score, intent)
        return best[1] if best else None

    def _handle(self, plan: _Plan, intent: _Intent) -> bool:
        """Ask for the intent's first missing slot, or answer it. True when answered."""
        cfg = intent.cfg
        missing = [slot for slot in cfg.requires if slot not in plan.slots]
        if missing:
            plan.say(cfg.ask[missing[0]])
            plan.pending = {"intent": cfg.name, "slot": missing[0]}
            return False
        plan.say(cfg.answer)
        if cfg.update_agent is not None:
            plan.extras.append(UpdateAgent(**cfg.update_agent.model_dump()))
        if cfg.metadata is not None:
            plan.extras.append(Metadata(cfg.metadata))
        if cfg.cacheable is False or (cfg.cacheable and plan.cacheable is None):
            plan.cacheable = cfg.cacheable
        for slot in cfg.requires:  # the request is done: the next one asks afresh
            plan.slots.pop(slot, None)
        if plan.pending and plan.pending["intent"] == cfg.name:
            plan.pending = None
        return True

    def _plan(self, turn: Turn) -> _Plan:
        slots = self._stored_slots(turn.state)
        pending = self._stored_pending(turn.state)
        try:
            variables = turn.variables
        except AttributeError:
            variables = {}
        text = _UNINTELLIGIBLE.sub(" ", _last_user_text(turn.transcript)) if turn.kind == "response" else ""
        utterance = normalise(text)
        plan = _Plan(
            utterance=utterance,
            slots_before=dict(slots),
            pending_before=pending,
            slots=dict(slots),
            pending=pending,
            renderer=_Renderer({}, variables, self._personal),
        )
        plan.renderer.slots = plan.slots  # answers see slots as this turn leaves them
        waiting = self._intents[pending["intent"]] if pending else None
        waiting_slot = pending["slot"] if pending else ""
        cfg = self.config

        if turn.kind == "reminder" or not utterance:
            plan.say(cfg.reminder_line if turn.kind == "reminder" else cfg.unclear_line or cfg.fallback_line)
            if waiting:
                plan.say(waiting.cfg.ask[waiting_slot])
            return plan
        scores = self._index.scores(utterance)
        if cfg.escalation and _ESCALATION in scores:
            plan.say(cfg.escalation.handoff_line, protected=True)
            plan.action = Transfer(cfg.escalation.transfer_number, cfg.escalation.show_transferee_as_caller)
            return plan
        if cfg.goodbye and _GOODBYE in scores:
            plan.say(cfg.goodbye.closing_line, protected=True)
            plan.action = EndCall()
            return plan

        # Slots listened for always come first, and the words that gave them ("this is Maria")
        # are no evidence of an intent: match the rest, or the whole if the rest says nothing.
        rest = text
        for name, slot in self._slots.items():
            found = slot.extract(text, utterance) if slot.always else None
            if found is not None:
                plan.slots[name], span = found
                if span is not None:
                    rest = rest[: span[0]] + " " * (span[1] - span[0]) + rest[span[1] :]
        best = self._best_intent(scores if rest == text else self._index.scores(normalise(rest)))
        if best is None and rest != text:
            best = self._best_intent(scores)
        wanted: set[str] = set().union(*(intent.slots for intent in (waiting, best) if intent))
        for name in sorted(wanted):
            slot = self._slots[name]
            found = None if slot.always else slot.extract(text, utterance)
            if found is not None:
                plan.slots[name] = found[0]

        if waiting is None:
            if best is None:
                plan.say(cfg.fallback_line)
            else:
                self._handle(plan, best)
        elif best is None or best is waiting:
            if best is None and waiting_slot not in plan.slots:
                plan.say(cfg.unclear_line or cfg.fallback_line)
            self._handle(plan, waiting)
        elif self._handle(plan, best):
            self._handle(plan, waiting)  # answered the aside; back to what we were waiting for
        return plan


def load_flow_agent(path: str | Path) -> FlowAgent:
    """Load a flow agent from a YAML file; any problem raises ``AgentConfigError``."""
    return FlowAgent.from_dict(read_agent_yaml(path), source=str(path))
