"""A scenario suite: calls to play against one agent, and what must happen in each.

A suite file (YAML) names the agent's route and lists scenarios; a scenario is the call object
a call starts with and its steps: a caller line, a silence that asks for a reminder, a barge-in
that supersedes the answer in flight, a dropped socket and its reconnect, a webhook. Each step
may carry expectations: what the agent says, the action it takes, the tools it calls, the
``update_agent``/``metadata`` it sends, and a latency budget. A bad file fails before any call
starts, naming the file, the scenario and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from callray.env import describe_validation
from callray.settings import TurnSettings


class SuiteError(ValueError):
    """A suite file that cannot be run; each line names the file, the scenario and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Says(_Strict):
    """What an answer's text must (not) hold; matching ignores case. A plain string in a
    suite means ``contains``."""

    contains: list[str] = Field(default_factory=list, description="Every one of these appears in the answer.")
    not_contains: list[str] = Field(default_factory=list, description="None of these appears in the answer.")
    one_of: list[str] = Field(default_factory=list, description="At least one of these appears in the answer.")
    regex: str | None = Field(default=None, description="The answer matches this regular expression (re.search).")
    empty: bool | None = Field(default=None, description="The answer is (or is not) empty.")

    @field_validator("contains", "not_contains", "one_of", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"contains": [data]} if isinstance(data, str) else data

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    def problems(self, text: str) -> list[str]:
        """Why ``text`` does not meet this expectation (empty: it does)."""
        low = text.lower()
        out = [f"expected it to contain {c!r}" for c in self.contains if c.lower() not in low]
        out += [f"expected it not to contain {c!r}" for c in self.not_contains if c.lower() in low]
        if self.one_of and not any(c.lower() in low for c in self.one_of):
            out.append(f"expected one of {self.one_of!r}")
        if self.regex is not None and not re.search(self.regex, text, re.IGNORECASE):
            out.append(f"expected it to match /{self.regex}/")
        if self.empty is not None and self.empty != (not text.strip()):
            out.append("expected no words" if self.empty else "expected some words")
        return out


class ToolExpectation(_Strict):
    """A tool the agent must call in this step, with at least these arguments."""

    name: str = Field(description="The tool's name.")
    arguments: dict[str, Any] = Field(default_factory=dict, description="A subset of the arguments it was called with.")


class Expect(_Strict):
    """What must happen in a step."""

    says: Says | None = Field(default=None, description="The answer's text.")
    end_call: bool | None = Field(default=None, description="The agent hangs up (true) or does not (false).")
    transfer: str | None = Field(default=None, description="The agent transfers the call to this number.")
    digit: str | None = Field(default=None, description="The agent presses this DTMF digit.")
    no_action: bool = Field(default=False, description="The agent neither hangs up, transfers nor presses a digit.")
    tools: list[ToolExpectation] = Field(default_factory=list, description="Tools called (tool_call_invocation).")
    update_agent: dict[str, Any] | None = Field(default=None, description="A subset of an update_agent frame's agent_config.")
    metadata: dict[str, Any] | None = Field(default=None, description="A subset of a metadata frame's metadata.")
    first_sentence_ms: float | None = Field(default=None, gt=0, description="The first sentence arrives within this "
                                            "many ms of the request (default: the scenario's, then the suite's).")
    holding: Literal["allowed", "forbidden"] = Field(default="allowed", description="Whether a holding phrase "
                                                     "(the latency budget missed) may come first.")


class Barge(_Strict):
    """A caller line interrupted: Retell asks for an answer, the caller keeps talking, Retell asks
    again with a newer id and the whole utterance. Only the newer request is answered."""

    first: str = Field(description="What the caller said when Retell first asked.")
    then: str = Field(description="What the caller added before the answer was spoken.")


class Step(_Strict):
    """One thing that happens in the call; exactly one of say, barge_in, silence, reconnect, webhook."""

    say: str | None = Field(default=None, description="The caller says this (response_required).")
    barge_in: Barge | None = Field(default=None, description="The caller talks over the answer in flight.")
    silence: bool = Field(default=False, description="The caller says nothing: Retell asks for a reminder.")
    reconnect: bool = Field(default=False, description="The socket drops without a close frame; Retell reconnects "
                                                      "with the same call id (the greeting must not be repeated).")
    webhook: str | None = Field(default=None, description="Retell posts this webhook event for the call (e.g. call_ended).")
    expect: Expect | None = Field(default=None, description="What must happen.")

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        acts = [name for name, on in (("say", self.say is not None), ("barge_in", self.barge_in is not None),
                                      ("silence", self.silence), ("reconnect", self.reconnect),
                                      ("webhook", self.webhook is not None)) if on]
        if len(acts) != 1:
            raise ValueError(f"a step does exactly one of say, barge_in, silence, reconnect, webhook (got {acts or 'none'})")
        if self.expect is not None and (self.reconnect or self.webhook):
            raise ValueError(f"{acts[0]}: nothing is answered here, so it takes no expect")
        return self

    @property
    def action(self) -> str:
        if self.say is not None:
            return f"say {self.say!r}"
        if self.barge_in is not None:
            return f"say {self.barge_in.first!r}, then {self.barge_in.then!r} over the answer"
        if self.silence:
            return "silence (reminder)"
        return "reconnect" if self.reconnect else f"webhook {self.webhook}"


class Scenario(_Strict):
    """One call: how it starts and its steps."""

    name: str = Field(min_length=1, description="Unique within the suite; names the test case.")
    variables: dict[str, str] = Field(default_factory=dict, description="Retell's dynamic variables for the call.")
    call: dict[str, Any] = Field(default_factory=dict, description="More fields of the call object (from_number, metadata, ...).")
    greeting: Says | None = Field(default=None, description="What response 0 says.")
    first_sentence_ms: float | None = Field(default=None, gt=0, description="The budget of every step of this scenario.")
    steps: list[Step] = Field(min_length=1, description="What happens, in order.")


class Suite(_Strict):
    """A suite file."""

    agent: str | None = Field(default=None, description="The agent's route segment (/llm-websocket/{agent}/{call_id}); "
                              "default: the server's default agent.")
    first_sentence_ms: float | None = Field(default=None, gt=0, description="Every step's latency budget unless it sets its own.")
    holding_phrases: list[str] = Field(default_factory=lambda: list(TurnSettings().holding_phrases),
                                       description="The server's holding phrases (to tell them from answers); "
                                       "default callray's; with a config, that config's.")
    scenarios: list[Scenario] = Field(min_length=1, description="The calls.")

    @model_validator(mode="after")
    def _unique_names(self) -> Suite:
        names = [s.name for s in self.scenarios]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"scenario names must be unique: {twice}")
        return self


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; problems raise ``SuiteError`` naming the file, the
    scenario (by name) and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: invalid YAML: {exc}") from None
    try:
        return Suite.model_validate(data)
    except ValidationError as exc:
        lines = [_with_scenario_name(problem, data) for problem in describe_validation(exc)]
        raise SuiteError("\n".join(f"{path}: {line}" for line in lines)) from None


def _with_scenario_name(problem: str, data: Any) -> str:
    """``scenarios.3.steps.1.say: ...`` -> ``scenario 'late caller' (scenarios.3): steps.1.say: ...``."""
    match = re.match(r"scenarios\.(\d+)\.?(.*)", problem)
    if not match or not isinstance(data, dict):
        return problem
    index = int(match.group(1))
    scenarios = data.get("scenarios")
    name = scenarios[index].get("name") if isinstance(scenarios, list) and index < len(scenarios) and \
        isinstance(scenarios[index], dict) else None
    return f"scenario {name!r} (scenarios.{index}): {match.group(2)}"
