"""callray's one template language (callray/agents/templates.py), as every agent's lines and
prompts use it: the flow agent's slots and optional segments, Retell's {{name}}, literal text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callray.agents.base import Agent
from callray.agents.flow import FlowAgent
from callray.agents.templates import check_line, fields, render

VALUES = {"name": "Ada", "day": "Tuesday"}


@pytest.mark.parametrize("template, said", [
    ("Hi {name}!", "Hi Ada!"),
    ("Hi {{name}}! Hi {{ name }}!", "Hi Ada! Hi Ada!"),
    ("Hi {caller|there}, {{caller|friend}}.", "Hi there, friend."),
    ("Booked for {day}[, {name}].", "Booked for Tuesday, Ada."),
    ("Booked for {day}[, {caller}].", "Booked for Tuesday."),
    ("Booked[ for {caller|you}].", "Booked for you."),
    ("Hi {caller}, welcome!", "Hi, welcome!"),
    ("[Role] You help {name}. Reply as {\"say\": \"...\"}.", "[Role] You help Ada. Reply as {\"say\": \"...\"}."),
    ("Keep  two  spaces\n  and indents for {name}.", "Keep  two  spaces\n  and indents for Ada."),
])
def test_what_a_template_says(template, said):
    assert render(template, VALUES.get) == said


@given(st.text(alphabet="{}[]|ab ", max_size=12))
def test_a_value_is_never_read_as_a_placeholder(value):
    assert render("<{name}>[ ({day})]", {"name": value, "day": value}.get) == f"<{value}> ({value})"


def test_used_names_the_values_said_and_not_those_of_a_dropped_segment():
    used: dict[str, str] = {}
    render("For {day}[, {name} {caller}].", VALUES.get, used)
    assert used == {"day": "Tuesday"}
    assert fields("{a} {{b}} [{c|x}] {{d|y}}") == {"a", "b", "c", "d"}


@pytest.mark.parametrize("line, problem", [("Hi {name", "malformed placeholder"), ("Hi [name", "unbalanced")])
def test_a_spoken_line_with_a_stray_brace_is_refused(line, problem):
    with pytest.raises(ValueError, match=problem):
        check_line(line)


def test_every_agent_speaks_the_same_language():
    """The flow agent's greeting and any agent's greeting fill Retell's {{name}} and defaults alike."""
    call = {"retell_llm_dynamic_variables": {"customer_name": "Ada"}}
    greeting = "Hello {{customer_name}}[, calling about {topic}], {{mood|welcome}}!"

    class Plain(Agent):
        pass

    plain = Plain()
    plain.greeting = greeting
    flow = FlowAgent.from_dict({"name": "t", "version": "1", "greeting": greeting, "fallback_line": "Sorry?",
                                "reminder_line": "Still there?"})
    assert plain.begin_message({}, call) == flow.begin_message({}, call) == "Hello Ada, welcome!"
    assert plain.greeting_uses_call and flow.greeting_uses_call
