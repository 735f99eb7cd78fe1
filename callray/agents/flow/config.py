"""The flow agent's file: pydantic models of its YAML, whose fields carry descriptions and
whose validators name what is wrong (``callray check`` and the loader print them)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from callray.agents.base import normalise
from callray.agents.flow.matching import Matcher, check_keywords, check_phrase, check_regex, parse_keywords
from callray.agents.templates import check_line

Template = Annotated[str, AfterValidator(check_line)]
Phrase = Annotated[str, AfterValidator(check_phrase)]
KeywordSet = Annotated[str, AfterValidator(check_keywords)]
Regex = Annotated[str, AfterValidator(check_regex)]


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

    def compile(self) -> Matcher:
        return Matcher(
            phrases=tuple(normalise(p) for p in self.phrases),
            exact=tuple(normalise(p) for p in self.exact),
            keywords=tuple(parse_keywords(k) for k in self.keywords),
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
