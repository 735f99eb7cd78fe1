"""The flow agent: matching, slots across turns, actions, chunking, cache keys, config errors."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callray.agents.base import Agent, EndCall, Speech, Transfer, Turn, normalise, plain_letters
from callray.agents.flow import AgentConfigError, FlowAgent, load_flow_agent

CLINIC = Path(__file__).resolve().parents[1] / "config" / "agents" / "clinic.yaml"

SMALL: dict[str, Any] = {
    "name": "test-flow",
    "version": "1",
    "greeting": "Hello[ {customer_name}], this is the test desk.",
    "fallback_line": "Sorry, I can't help with that.",
    "unclear_line": "Sorry, I didn't catch that.",
    "reminder_line": "Are you still there?",
    "escalation": {
        "phrases": ["real person", "representative", "talk to a person"],
        "exact": ["human"],
        "handoff_line": "Let me put you through.",
        "transfer_number": "+15550100200",
    },
    "goodbye": {"phrases": ["goodbye", "bye"], "exact": ["thanks"], "closing_line": "Goodbye[, {name}]!"},
    "slots": {
        "name": {
            "listen": "always",
            "personal": True,
            "capitalize": True,
            "patterns": [r"(?i:\b(?:my name is|this is|i'm))\s+([A-Za-z][a-z'-]+)"],
            "reject": ["calling"],
        },
        "day": {"values": [{"value": "Tuesday", "synonyms": ["tuesdays"]}, "Friday", "tomorrow"]},
    },
    "intents": [
        {"name": "hours", "phrases": ["opening hours", "what are your hours"], "keywords": ["open|close*"],
         "answer": "We are open nine to five."},
        {"name": "parking", "keywords": ["park*", "car garage"], "answer": "Park behind the building."},
        {"name": "book", "phrases": ["book an appointment"], "keywords": ["book appointment*"],
         "requires": ["day"], "ask": {"day": "What day works best for you[, {name}]?"},
         "answer": "I've pencilled you in for {day}[, {name}]."},
        {"name": "greet", "phrases": ["my name is"], "answer": "Nice to meet you[, {name}]."},
        {"name": "tie_a", "keywords": ["alpha"], "answer": "A."},
        {"name": "tie_b", "keywords": ["alpha"], "answer": "B."},
        {"name": "secret", "phrases": ["secret"], "answer": "Not cached.", "cacheable": False},
        {"name": "vip", "phrases": ["vip"], "answer": "Welcome back[, {name}].", "cacheable": True},
    ],
}


@pytest.fixture
def agent() -> FlowAgent:
    return FlowAgent.from_dict(copy.deepcopy(SMALL))


def make_turn(text: str | None, state: dict[str, Any] | None = None, kind: str = "response", **extra: Any) -> Turn:
    transcript: list[dict[str, Any]] = [{"role": "agent", "content": "Hello, this is the test desk."}]
    if text is not None:
        transcript.append({"role": "user", "content": text})
    state = {} if state is None else state
    return Turn(call_id="c1", kind=kind, transcript=transcript, state=state, **extra)  # type: ignore[arg-type]


async def collect(agent: FlowAgent, turn: Turn) -> list[Any]:
    return [out async for out in agent.respond(turn)]


def spoken(outputs: list[Any]) -> str:
    return "".join(o.text for o in outputs if isinstance(o, Speech))


async def say(agent: FlowAgent, text: str | None, state: dict[str, Any] | None = None) -> str:
    return spoken(await collect(agent, make_turn(text, state)))


# --------------------------------------------------------------------------- interface


def test_implements_agent_protocol(agent: FlowAgent) -> None:
    assert isinstance(agent, Agent)
    assert (agent.name, agent.version) == ("test-flow", "1")
    assert agent.fallback_line == "Sorry, I can't help with that."


def test_greeting_fills_variables_and_survives_missing_ones(agent: FlowAgent) -> None:
    assert agent.begin_message({}, {}) == "Hello, this is the test desk."
    call = {"retell_llm_dynamic_variables": {"customer_name": "Maria"}}
    assert agent.begin_message({}, call) == "Hello Maria, this is the test desk."
    lenient = FlowAgent.from_dict({**copy.deepcopy(SMALL), "greeting": "Hi {who|there}, {missing} welcome!"})
    assert lenient.begin_message({}, {}) == "Hi there, welcome!"
    # Values are inserted verbatim, never read as placeholders.
    odd = {"metadata": {"customer_name": "{who}"}}
    assert agent.begin_message({}, odd) == "Hello {who}, this is the test desk."


# --------------------------------------------------------------------------- matching


async def test_intent_by_phrase_and_by_keyword(agent: FlowAgent) -> None:
    assert await say(agent, "What are your opening hours?") == "We are open nine to five."
    assert await say(agent, "when do you close today") == "We are open nine to five."  # keyword close*
    assert await say(agent, "Is there a garage for my car?") == "Park behind the building."  # word set
    assert await say(agent, "where can I park") == "Park behind the building."  # prefix park*


async def test_phrase_beats_keyword_and_ties_go_to_first_declared(agent: FlowAgent) -> None:
    # "open" is a keyword of hours; "book an appointment" a phrase of book: the phrase wins.
    assert await say(agent, "Are you open? I want to book an appointment") == "What day works best for you?"
    assert await say(agent, "alpha") == "A."


async def test_unicode_and_punctuation_are_normalised(agent: FlowAgent) -> None:
    variants = ["WHAT ARE YOUR HOURS?!", "Whát áre yóur hoürs…", "  what   are\tyour hours  ", "What’re… what are your hours"]
    for text in variants:
        assert await say(agent, text) == "We are open nine to five.", text


async def test_unknown_roles_and_missing_content_are_tolerated(agent: FlowAgent) -> None:
    turn = make_turn("what are your hours")
    odd_entries: list[Any] = [{"role": "tool_call_result"}, {"role": "node_transition", "content": None}, "junk"]
    turn.transcript += odd_entries
    assert spoken(await collect(agent, turn)) == "We are open nine to five."
    no_content = Turn(call_id="c1", kind="response", transcript=[{"role": "user"}, {"content": "x"}], state={})
    assert spoken(await collect(agent, no_content)) == "Sorry, I didn't catch that."


async def test_fallback_when_nothing_matches(agent: FlowAgent) -> None:
    state: dict[str, Any] = {}
    assert await say(agent, "Tell me a joke about penguins", state) == "Sorry, I can't help with that."
    assert state == {}


async def test_unintelligible_audio_is_not_understood(agent: FlowAgent) -> None:
    assert await say(agent, "(unintelligible audio)") == "Sorry, I didn't catch that."
    assert await say(agent, "") == "Sorry, I didn't catch that."
    assert agent.cache_key(make_turn("(unintelligible audio)")) is None


# --------------------------------------------------------------------------- slots and pending intents


async def test_slots_are_remembered_across_turns(agent: FlowAgent) -> None:
    state: dict[str, Any] = {}
    assert await say(agent, "Hi, my name is maria", state) == "Nice to meet you, Maria."
    assert state["slots"] == {"name": "Maria"}
    assert await say(agent, "What are your hours?", state) == "We are open nine to five."
    assert await say(agent, "I'd like to book an appointment", state) == "What day works best for you, Maria?"
    assert await say(agent, "Tuesday please", state) == "I've pencilled you in for Tuesday, Maria."
    assert state == {"slots": {"name": "Maria"}}  # the day is forgotten once booked, the name stays


async def test_words_that_gave_a_name_do_not_pick_the_intent(agent: FlowAgent) -> None:
    state: dict[str, Any] = {}
    # "my name is" is the greet intent's phrase, but here the name is said in passing.
    assert await say(agent, "My name is Maria, where can I park?", state) == "Park behind the building."
    assert state == {"slots": {"name": "Maria"}}
    assert await say(agent, "my name is Ann", state) == "Nice to meet you, Ann."  # nothing else said


async def test_pending_intent_is_completed_by_the_next_utterance(agent: FlowAgent) -> None:
    state: dict[str, Any] = {}
    assert await say(agent, "I'd like to book an appointment", state) == "What day works best for you?"
    assert state == {"pending": {"intent": "book", "slot": "day"}}
    # Something unrelated: say so, ask again, keep waiting.
    assert await say(agent, "umm let me think", state) == "Sorry, I didn't catch that. What day works best for you?"
    # A question on the side: answer it, then ask again.
    assert await say(agent, "what are your hours", state) == "We are open nine to five. What day works best for you?"
    assert state == {"pending": {"intent": "book", "slot": "day"}}
    assert await say(agent, "Tuesdays are good", state) == "I've pencilled you in for Tuesday."
    assert state == {}


async def test_slot_given_up_front_answers_at_once(agent: FlowAgent) -> None:
    state: dict[str, Any] = {}
    assert await say(agent, "Can I book an appointment for tomorrow?", state) == "I've pencilled you in for tomorrow."
    assert state == {}


async def test_name_pattern_rejects_non_names(agent: FlowAgent) -> None:
    state: dict[str, Any] = {}
    await say(agent, "I'm calling about parking", state)
    assert "slots" not in state


async def test_stale_or_garbage_state_is_ignored(agent: FlowAgent) -> None:
    state: dict[str, Any] = {"slots": "oops", "pending": {"intent": "removed_intent", "slot": "day"}}
    assert await say(agent, "what are your hours", state) == "We are open nine to five."


async def test_cancelled_generation_leaves_state_untouched(agent: FlowAgent) -> None:
    state: dict[str, Any] = {"pending": {"intent": "book", "slot": "day"}}
    # Answers the aside, then completes the booking (one frame), and the pending intent clears.
    gen = agent.respond(make_turn("what are your hours? Friday is fine", state))
    await gen.aclose()  # superseded before it spoke: the caller kept talking
    assert state == {"pending": {"intent": "book", "slot": "day"}}
    gen = agent.respond(make_turn("what are your hours? Friday is fine", state))
    assert await gen.__anext__() == Speech("We are open nine to five. I've pencilled you in for Friday.")
    assert state == {}  # the state changed with the (last) output
    await gen.aclose()


# --------------------------------------------------------------------------- actions


async def test_escalation_says_handoff_then_transfers(agent: FlowAgent) -> None:
    state: dict[str, Any] = {"pending": {"intent": "book", "slot": "day"}}
    for text in ["I want to talk to a person", "Can I get a REAL person please?", "Human!", "representative"]:
        outputs = await collect(agent, make_turn(text, state))
        assert isinstance(outputs[-1], Transfer) and outputs[-1].number == "+15550100200", text
        assert all(isinstance(o, Speech) for o in outputs[:-1])
        assert spoken(outputs) == "Let me put you through."
    assert agent.cache_key(make_turn("representative")) is None


async def test_goodbye_says_protected_closing_then_ends_call(agent: FlowAgent) -> None:
    state = {"slots": {"name": "Maria"}}
    outputs = await collect(agent, make_turn("OK, goodbye!", state))
    assert isinstance(outputs[-1], EndCall)
    speech = outputs[:-1]
    assert speech and all(isinstance(o, Speech) and o.no_interruption_allowed for o in speech)
    assert spoken(outputs) == "Goodbye, Maria!"
    # "thanks" ends the call only as the whole utterance.
    assert isinstance((await collect(agent, make_turn("thanks")))[-1], EndCall)
    assert await say(agent, "thanks, what are your hours") == "We are open nine to five."


async def test_reminder_speaks_the_reminder_line_without_changing_state(agent: FlowAgent) -> None:
    state: dict[str, Any] = {"pending": {"intent": "book", "slot": "day"}}
    before = copy.deepcopy(state)
    outputs = await collect(agent, make_turn("I'd like to book an appointment", state, kind="reminder"))
    assert spoken(outputs) == "Are you still there? What day works best for you?"
    assert state == before
    assert spoken(await collect(agent, make_turn(None, {}, kind="reminder"))) == "Are you still there?"


# --------------------------------------------------------------------------- chunking


async def test_an_answer_is_one_frame_unless_its_protection_changes() -> None:
    """The whole answer is known at once: phrases would only add frames for the proxy."""
    agent = load_flow_agent(CLINIC)
    outputs = await collect(agent, make_turn("Do you take my insurance?"))
    answer = next(i.answer for i in agent.config.intents if i.name == "insurance")
    assert [o.text for o in outputs] == [" ".join(answer.split())]
    goodbye = await collect(agent, make_turn("That's all, bye"))
    speech = [o for o in goodbye if isinstance(o, Speech)]
    assert len(speech) == 1 and speech[0].no_interruption_allowed and isinstance(goodbye[-1], EndCall)


# --------------------------------------------------------------------------- cache keys


def test_cache_key_same_for_same_question_and_state_and_differs_with_state(agent: FlowAgent) -> None:
    k1 = agent.cache_key(make_turn("What are your hours?"))
    k2 = agent.cache_key(make_turn("what are your hours"))
    assert k1 is not None and k1 == k2
    waiting = {"pending": {"intent": "book", "slot": "day"}}
    k3 = agent.cache_key(make_turn("what are your hours", copy.deepcopy(waiting)))
    assert k3 is not None and k3 != k1
    assert agent.cache_key(make_turn("what are your hours", copy.deepcopy(waiting))) == k3
    k4 = agent.cache_key(make_turn("what are your hours", {"slots": {"day": "Friday"}}))
    assert k4 is not None and k4 not in (k1, k3)
    # A slot value the answer uses is part of the key.
    friday = agent.cache_key(make_turn("book an appointment for friday"))
    tuesday = agent.cache_key(make_turn("book an appointment for tuesday"))
    assert friday and tuesday and friday != tuesday and "Friday" in friday


def test_cache_key_none_for_reminder_empty_personal_and_state_changes(agent: FlowAgent) -> None:
    assert agent.cache_key(make_turn("what are your hours", kind="reminder")) is None
    assert agent.cache_key(make_turn(None)) is None
    assert agent.cache_key(make_turn("   ...  ")) is None
    named = {"slots": {"name": "Maria"}}
    # Uses the caller's name: personal.
    assert agent.cache_key(make_turn("book an appointment for friday", copy.deepcopy(named))) is None
    assert agent.cache_key(make_turn("book an appointment")) is None  # sets a pending intent
    assert agent.cache_key(make_turn("secret")) is None  # cacheable: false
    # cacheable: true shares even a personal answer, keyed by the value it used.
    vip = agent.cache_key(make_turn("vip", copy.deepcopy(named)))
    assert vip is not None and "Maria" in vip
    assert agent.cache_key(make_turn("vip", {"slots": {"name": "Ann"}})) != vip
    # Does not use the name: shareable among callers who gave one.
    assert agent.cache_key(make_turn("what are your hours", copy.deepcopy(named))) is not None


async def test_cache_key_does_not_touch_the_turn_and_respond_marks_personal_answers(agent: FlowAgent) -> None:
    state = {"slots": {"name": "Maria"}}
    turn = make_turn("book an appointment for friday", state)
    agent.cache_key(turn)
    assert turn.state == {"slots": {"name": "Maria"}} and turn.cacheable
    assert spoken(await collect(agent, turn)) == "I've pencilled you in for Friday, Maria."
    assert turn.cacheable is False
    plain = make_turn("what are your hours")
    await collect(agent, plain)
    assert plain.cacheable is True


# --------------------------------------------------------------------------- configuration errors


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_invalid_config_names_file_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name: broken
version: "1"
greeting: Hi
fallback_line: Sorry
reminder_line: Still there?
intents:
  - {name: a, phrases: [a], answer: A}
  - {name: b, phrases: [b], answer: B}
  - {name: c, phrases: [c]}
""",
    )
    with pytest.raises(AgentConfigError) as info:
        load_flow_agent(path)
    assert str(info.value) == f"{path}: intents.2.answer: Field required"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"fallbak_line": "x"}, "fallbak_line: unknown field"),
        ({"kind": "llm"}, "kind: Input should be 'flow'"),
        ({"slots": {"day": {"patterns": ["(a)(b)"]}}}, "slots.day.patterns.0: needs exactly one capturing group"),
        ({"slots": {"day": {"patterns": ["(unclosed"]}}}, "slots.day.patterns.0: invalid regular expression"),
        ({"escalation": {"phrases": ["human"], "handoff_line": "ok"}}, "escalation.transfer_number: Field required"),
        ({"greeting": "Hi {name"}, "greeting: malformed placeholder"),
        ({"intents": [{"name": "x", "answer": "A"}]}, "intents.0: needs at least one of phrases, exact or keywords"),
        ({"intents": [{"name": "x", "phrases": ["x"], "answer": "A", "requires": ["dy"], "ask": {"dy": "?"}}]},
         "intents.0.requires.0: unknown slot 'dy'"),
        ({"intents": [{"name": "x", "phrases": ["x"], "answer": "A", "requires": ["day"]}]},
         "intents.0: ask: no prompt for required slot 'day'"),
        ({"intents": [{"name": "x", "keywords": ["check-up"], "answer": "A"}]},
         "intents.0.keywords.0: 'check-up' is not one word"),
        ({"intents": [{"name": "x", "phrases": ["?!"], "answer": "A"}]},
         "intents.0.phrases.0: '?!' is empty after normalisation"),
    ],
)
def test_config_errors_point_at_the_field(patch: dict[str, Any], expected: str) -> None:
    data = {**copy.deepcopy(SMALL), **patch}
    with pytest.raises(AgentConfigError) as info:
        FlowAgent.from_dict(data, source="my.yaml")
    assert f"my.yaml: {expected}" in str(info.value)


def test_unreadable_or_malformed_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="missing.yaml: cannot read"):
        load_flow_agent(tmp_path / "missing.yaml")
    with pytest.raises(AgentConfigError, match=r"agent.yaml: invalid YAML at line \d+, column \d+"):
        load_flow_agent(write(tmp_path, "name: x\nintents: [a, b\n"))
    with pytest.raises(AgentConfigError, match="expected a mapping"):
        load_flow_agent(write(tmp_path, "- just a list\n"))


# --------------------------------------------------------------------------- the shipped clinic agent


async def test_clinic_agent_holds_a_realistic_conversation() -> None:
    agent = load_flow_agent(CLINIC)
    assert agent.begin_message({}, {}) == (
        "Hi, thanks for calling Maple Street Family Clinic, this is Ava. How can I help you today?"
    )
    state: dict[str, Any] = {}
    transcript: list[dict[str, Any]] = [{"role": "agent", "content": agent.begin_message({}, {})}]

    async def turn(text: str) -> list[Any]:
        transcript.append({"role": "user", "content": text, "words": []})
        outputs = await collect(agent, Turn(call_id="c9", kind="response", transcript=list(transcript), state=state))
        transcript.append({"role": "agent", "content": spoken(outputs)})
        return outputs

    said = spoken(await turn("Hi, this is Maria. Are you open on Saturdays?"))
    assert "Saturdays we're open from 9 AM to 1 PM" in said
    assert state["slots"] == {"name": "Maria"}

    assert spoken(await turn("Great. I'd like to book an appointment.")) == "What day works best for you, Maria?"
    said = spoken(await turn("Tuesday, please."))
    assert said.startswith("Great, I've pencilled you in for Tuesday, Maria.")

    assert "Blue Cross Blue Shield" in spoken(await turn("Do you take Blue Cross?"))
    assert "412 Maple Street" in spoken(await turn("And where do I park?"))
    assert "Our nurse line is open on weekdays" in spoken(await turn("Could I speak to a nurse about my cough?"))
    outputs = await turn("No, that's all, thanks. Bye!")
    assert isinstance(outputs[-1], EndCall)
    assert spoken(outputs) == (
        "Thanks for calling Maple Street Family Clinic, Maria. Take care, and have a lovely day. Goodbye!"
    )


async def test_clinic_agent_escalates_and_handles_emergencies() -> None:
    agent = load_flow_agent(CLINIC)
    outputs = await collect(agent, make_turn("I want to talk to a person"))
    assert outputs[-1] == Transfer("+15550100200")
    assert "front desk" in spoken(outputs)
    assert "hang up and dial 911" in await say(agent, "I think this is an emergency, my dad has chest pain")
    state: dict[str, Any] = {}
    await say(agent, "This is an emergency", state)
    assert state == {}  # "this is an emergency" is not a name
    assert "Sundays" in await say(agent, "Are you open on Sunday?")
    state = {}
    said = await say(agent, "Hi this is John Smith, I need to cancel tomorrow's appointment", state)
    assert said.startswith("All right, I've cancelled your appointment for tomorrow, John Smith.")
    assert state == {"slots": {"name": "John Smith"}}
    assert (await say(agent, "Can you move my Tuesday appointment to Thursday?")).startswith(
        "Done, I've moved your appointment to Thursday."
    )
    assert "refill" in await say(agent, "I need more of my blood pressure meds")


def _reference_score(matcher, utterance: str):
    """The matching rules as written in the docs, one matcher at a time (the slow way)."""
    from callray.agents.flow.matching import EXACT, KEYWORDS, PHRASE

    best = None
    for phrase in matcher.exact + matcher.phrases:
        if utterance == phrase:
            best = max(best or (0, 0), (EXACT, phrase.count(" ") + 1))
    for phrase in matcher.phrases:
        if f" {phrase} " in f" {utterance} ":
            best = max(best or (0, 0), (PHRASE, phrase.count(" ") + 1))
    if best is None:
        words = utterance.split()
        for terms in matcher.keywords:
            if all(any(w == alt or (prefix and w.startswith(alt)) for w in words for alt, prefix in alts)
                   for alts in terms):
                best = max(best or (0, 0), (KEYWORDS, len(terms)))
    return best


@functools.cache
def _clinic_matchers() -> tuple[dict, Any]:
    from callray.agents.flow.matching import MatchIndex

    config = load_flow_agent(CLINIC).config
    matchers = {i.name: i.compile() for i in config.intents}
    matchers["esc:"] = config.escalation.compile()
    return matchers, MatchIndex(matchers)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_match_index_scores_exactly_like_matching_each_intent_in_turn(data):
    matchers, index = _clinic_matchers()
    vocabulary = sorted({w for m in matchers.values() for p in m.phrases + m.exact for w in p.split()}
                        | {alt for m in matchers.values() for terms in m.keywords for alts in terms for alt, _ in alts}
                        | {"please", "hello", "maria", "tuesdays", "appointmentish"})
    words = data.draw(st.lists(st.sampled_from(vocabulary), max_size=12))
    phrase_pool = [p for m in matchers.values() for p in m.phrases + m.exact]
    if phrase_pool and data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(words)))
        words[at:at] = data.draw(st.sampled_from(phrase_pool)).split()
    utterance = " ".join(words)
    expected = {k: s for k, m in matchers.items() if (s := _reference_score(m, utterance)) is not None}
    assert index.scores(utterance) == expected


@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_ascii_has_no_accents_to_strip_so_normalise_may_skip_that_step(text):
    assert plain_letters(text) == text


@pytest.mark.parametrize("text, expected", [
    ("Crème BRÛLÉE, s'il vous plaît!", "creme brulee sil vous plait"),
    ("I\u2019m Zoë \u2018the\u2019 caller", "im zoe the caller"),
    ("Don`t  STOP -- it's 9:30?", "dont stop its 9 30"),
    ("", ""),
])
def test_normalise_lowers_strips_accents_apostrophes_and_punctuation(text, expected):
    assert normalise(text) == expected
