"""The flow agent: callray's embedded default agent, a receptionist defined in YAML.

It needs no API key and no network, so it is what a newcomer hears first. It matches the
caller's normalised words against intents (``matching.py``), fills slots (a day, the caller's
name) over several turns, hands off to a person and hangs up politely. Everything it remembers
about a call lives in ``Turn.state`` (``slots`` and ``pending``), so a call resumed on another
host continues where it was. Its lines are templates (``callray/agents/templates.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from pydantic import ValidationError

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
from callray.agents.config import AgentConfigError, read_agent_yaml
from callray.agents.flow.config import FlowAgentConfig, IntentConfig, SlotConfig
from callray.agents.flow.matching import Matcher, MatchIndex, Score, contains
from callray.agents.templates import fields, render
from callray.env import describe_validation

_UNINTELLIGIBLE = re.compile(r"\(\s*unintelligible audio\s*\)", re.IGNORECASE)


class Renderer:
    """Fills one turn's lines from its slots and the call's variables, recording the values
    said (the response cache's key) and whether any is about one caller (then not shared)."""

    def __init__(self, slots: dict[str, str], variables: dict[str, str], personal_slots: set[str]):
        self.slots, self.variables, self.personal_slots = slots, variables, personal_slots
        self.used: dict[str, str] = {}
        self.personal = False

    def _lookup(self, name: str) -> str | None:
        return self.slots[name] if name in self.slots else self.variables.get(name)

    def render(self, template: str) -> str:
        said: dict[str, str] = {}
        text = render(template, self._lookup, said).strip()
        # Call variables are per-call data (a caller's name, an account): personal too.
        self.personal = self.personal or any(n in self.personal_slots or n not in self.slots for n in said)
        self.used.update(said)
        return text


@dataclass
class Slot:
    name: str
    patterns: list[re.Pattern[str]]
    values: list[tuple[str, list[str]]]  # canonical value, normalised forms
    reject: frozenset[str]
    capitalize: bool
    always: bool

    @classmethod
    def build(cls, name: str, cfg: SlotConfig) -> Slot:
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
                pos = contains(utterance, form)
                if pos >= 0 and (best is None or (pos, -len(form)) < (best[0], -best[1])):
                    best = (pos, len(form), canonical)
        return (best[2], None) if best else None


@dataclass
class Intent:
    cfg: IntentConfig
    slots: frozenset[str]  # slots it requires or mentions


_ESCALATION, _GOODBYE = "escalation:", "goodbye:"  # index keys that no intent name (\w+) can take


@dataclass
class Plan:
    """What one turn will say and do, computed without touching the turn (so ``cache_key``
    and ``respond`` agree)."""

    utterance: str
    slots_before: dict[str, str]
    pending_before: dict[str, str] | None
    slots: dict[str, str]
    pending: dict[str, str] | None
    renderer: Renderer
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

    answers_at_once = True  # it plans from the turn alone, never waiting on I/O

    def __init__(self, config: FlowAgentConfig):
        self.config = config
        self.name = config.name
        self.version = config.version
        self.common_questions = config.common_questions
        self._slots = {name: Slot.build(name, cfg) for name, cfg in config.slots.items()}
        self._personal = {name for name, cfg in config.slots.items() if cfg.personal}
        self._greeting_uses_call = bool(fields(config.greeting) - self._slots.keys())  # asked on every attach
        self._intents: dict[str, Intent] = {}
        matchers: dict[str, Matcher] = {}
        for intent in config.intents:
            mentioned = fields(intent.answer).union(*(fields(a) for a in intent.ask.values()))
            self._intents[intent.name] = Intent(cfg=intent, slots=frozenset(intent.requires) | (mentioned & self._slots.keys()))
            matchers[intent.name] = intent.compile()
        if config.escalation:
            matchers[_ESCALATION] = config.escalation.compile()
        if config.goodbye:
            matchers[_GOODBYE] = config.goodbye.compile()
        self._index = MatchIndex(matchers)

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
        return Renderer({}, {}, set()).render(self.config.fallback_line)

    def begin_message(self, state: dict[str, Any], call: dict[str, Any]) -> str:
        return Renderer(self._stored_slots(state), _variables(call), self._personal).render(self.config.greeting)

    @property
    def greeting_uses_call(self) -> bool:
        return self._greeting_uses_call

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

    def _planned(self, turn: Turn) -> Plan:
        """The turn's plan, computed once whether ``cache_key``, ``respond`` or both ask."""
        plan = turn.memo.get("flow_plan")
        if plan is None:
            plan = turn.memo["flow_plan"] = self._plan(turn)
        return plan

    def _best_intent(self, scores: dict[str, Score]) -> Intent | None:
        best: tuple[Score, Intent] | None = None
        for name, intent in self._intents.items():
            score = scores.get(name)
            if score is not None and (best is None or score > best[0]):  # strict: first declared wins ties
                best = (score, intent)
        return best[1] if best else None

    def _handle(self, plan: Plan, intent: Intent) -> bool:
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

    def _plan(self, turn: Turn) -> Plan:
        slots = self._stored_slots(turn.state)
        pending = self._stored_pending(turn.state)
        try:
            variables = turn.variables
        except AttributeError:
            variables = {}
        text = _UNINTELLIGIBLE.sub(" ", _last_user_text(turn.transcript)) if turn.kind == "response" else ""
        utterance = normalise(text)
        plan = Plan(
            utterance=utterance,
            slots_before=dict(slots),
            pending_before=pending,
            slots=dict(slots),
            pending=pending,
            renderer=Renderer({}, variables, self._personal),
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
