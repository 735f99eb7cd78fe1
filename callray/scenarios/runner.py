"""Playing a suite's scenarios against a server, as Retell would, and judging each step.

Each scenario is one call through :class:`~callray.sim.client.RetellClient` (which also judges
every frame against the protocol). Steps run in order and each waits for its answer, so a
verdict never depends on timing except where a step sets a latency budget; the measured value
is reported either way. Scenarios run concurrently.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from callray.scenarios.suite import Expect, Says, Scenario, Step, Suite
from callray.sim.client import VIOLATION_KINDS, RetellClient
from callray.webhook import SIGNATURE_HEADER, sign

_SENTENCE = re.compile(r"[.!?](\s|$)")
ANSWER_TIMEOUT_S = 30.0


@dataclass
class StepResult:
    """What one step did: its answer, its latency and what went wrong (empty: it passed)."""

    index: int  # -1: the greeting
    action: str
    answer: str = ""
    first_sentence_ms: float | None = None
    budget_ms: float | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class ScenarioResult:
    suite: str
    scenario: str
    attempt: int
    call_id: str
    seconds: float = 0.0
    steps: list[StepResult] = field(default_factory=list)
    transcript: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None  # the scenario could not be played (server unreachable, ...)

    @property
    def passed(self) -> bool:
        return self.error is None and not any(step.problems for step in self.steps)

    @property
    def failed_step(self) -> StepResult | None:
        return next((step for step in self.steps if step.problems), None)


@dataclass(frozen=True)
class Target:
    """Where the scenarios call: the LLM WebSocket base and, for webhook steps, the webhook URL
    and the key that signs it."""

    ws_url: str
    webhook_url: str | None = None
    webhook_key: str | None = None


class _Call:
    """One scenario's call, step by step."""

    def __init__(self, target: Target, suite: Suite, scenario: Scenario, result: ScenarioResult):
        self.target, self.suite, self.scenario, self.result = target, suite, scenario, result
        self.url = target.ws_url.rstrip("/") + (f"/{suite.agent}" if suite.agent else "")
        self.call_object = {**scenario.call, "call_id": result.call_id, "call_status": "ongoing"}
        if scenario.variables:
            self.call_object["retell_llm_dynamic_variables"] = dict(scenario.variables)
        self.client = RetellClient(self.url, result.call_id, call_object=self.call_object)
        self.next_id = 1

    async def play(self) -> None:
        await self.client.connect(open_timeout_s=10)
        try:
            greeting = StepResult(-1, "greeting")
            self.result.steps.append(greeting)
            greeting.answer = await self.client.complete(0, ANSWER_TIMEOUT_S)
            if self.scenario.greeting is not None:
                greeting.problems += _said(self.scenario.greeting, greeting.answer)
            for index, step in enumerate(self.scenario.steps):
                outcome = StepResult(index, step.action)
                self.result.steps.append(outcome)
                await self.step(step, outcome)
                if outcome.problems:
                    break
        finally:
            self.result.transcript = list(self.client.transcript)
            await self.client.close()

    async def step(self, step: Step, outcome: StepResult) -> None:
        if step.reconnect:
            await self.reconnect(outcome)
            return
        if step.webhook is not None:
            await self.webhook(step.webhook, outcome)
            return
        seen = len(self.client.frames)
        rid = self.next_id
        if step.barge_in is not None:  # asked early; the caller went on; asked again with the whole line
            await self.client.say(rid, step.barge_in.first)
            self.client.transcript[-1]["content"] += " " + step.barge_in.then
            self.client.history[-1]["content"] += " " + step.barge_in.then
            rid += 1
            sent = asyncio.get_running_loop().time()
            await self.client.say(rid, "")
        else:
            sent = asyncio.get_running_loop().time()
            await self.client.say(rid, step.say or "", "reminder_required" if step.silence else "response_required")
        self.next_id = rid + 1
        try:
            outcome.answer = await self.client.complete(rid, ANSWER_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            outcome.problems.append(f"no complete answer: {exc or type(exc).__name__}")
            return
        self.client.hear("agent", outcome.answer)
        frames = list(zip(self.client.frames[seen:], self.client.arrived[seen:]))
        self.judge(step, rid, sent, frames, outcome)

    def judge(self, step: Step, rid: int, sent: float, frames: list[tuple[dict, float]], outcome: StepResult) -> None:
        expect = step.expect or Expect()
        mine = [(f, t) for f, t in frames if f.get("response_type") == "response" and f.get("response_id") == rid]
        problems = outcome.problems
        if step.barge_in is not None:
            first_new = next((i for i, (f, _) in enumerate(frames) if f.get("response_id") == rid), len(frames))
            late = [f for f, _ in frames[first_new:] if f.get("response_id") == rid - 1]
            if late:
                problems.append(f"the superseded answer went on after the newer one started: {late[0].get('content')!r}")
        text, holding = "", False
        for frame, at in mine:
            content = frame.get("content", "")
            if not text and content.strip() in self.suite.holding_phrases:
                holding = True
            text += content
            if outcome.first_sentence_ms is None and _SENTENCE.search(text):
                outcome.first_sentence_ms = round((at - sent) * 1000, 1)
        if outcome.first_sentence_ms is None and mine:
            outcome.first_sentence_ms = round((mine[-1][1] - sent) * 1000, 1)
        outcome.budget_ms = expect.first_sentence_ms or self.scenario.first_sentence_ms or self.suite.first_sentence_ms
        if outcome.budget_ms is not None and (outcome.first_sentence_ms or 0) > outcome.budget_ms:
            problems.append(f"first sentence after {outcome.first_sentence_ms:.0f} ms; budget {outcome.budget_ms:.0f} ms")
        if holding and expect.holding == "forbidden":
            problems.append("a holding phrase came first (the latency budget was missed)")
        if expect.says is not None:
            problems += _said(expect.says, outcome.answer)
        repeated = _repeated_sentence(outcome.answer)
        if repeated:
            problems.append(f"says one sentence twice: {repeated!r}")
        problems += _action_problems(expect, mine[-1][0] if mine else {})
        problems += _frame_problems(expect, [f for f, _ in frames])
        problems += [f"protocol: {kind}: {detail}" for kind, detail in self.client.issues if kind in VIOLATION_KINDS]
        self.client.issues.clear()

    async def reconnect(self, outcome: StepResult) -> None:
        """Drop the socket as a network failure does; Retell opens a new one for the call."""
        old = self.client
        await old.socket.abort()
        self.client = RetellClient(self.url, self.result.call_id, call_object=self.call_object)
        self.client.transcript, self.client.history = old.transcript, old.history
        await self.client.connect(open_timeout_s=10)
        outcome.answer = await self.client.complete(0, ANSWER_TIMEOUT_S)
        if outcome.answer:
            outcome.problems.append(f"the greeting was said again on the reconnect: {outcome.answer!r}")

    async def webhook(self, event: str, outcome: StepResult) -> None:
        target = self.target
        if not target.webhook_url or not target.webhook_key:
            outcome.problems.append("a webhook step needs --webhook-url and a key (--webhook-key or RETELL_API_KEY)")
            return
        body = json.dumps({"event": event, "call": {**self.call_object, "call_status": "ended",
                                                     "disconnection_reason": "user_hangup"}}).encode()
        request = urllib.request.Request(target.webhook_url, data=body, method="POST", headers={
            "content-type": "application/json", SIGNATURE_HEADER: sign(body, target.webhook_key)})

        def post() -> int:
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError as exc:
                raise ConnectionError(str(exc)) from None

        try:
            status = await asyncio.to_thread(post)
        except ConnectionError as exc:
            outcome.problems.append(f"webhook {event} not delivered: {exc}")
            return
        outcome.answer = f"HTTP {status}"
        if status >= 300:
            outcome.problems.append(f"webhook {event} answered HTTP {status}")


def _said(says: Says, text: str) -> list[str]:
    problems = says.problems(text)
    return [f"{p}; it said {text!r}" for p in problems[:1]] + problems[1:]


def _repeated_sentence(text: str) -> str | None:
    seen: set[str] = set()
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        key = " ".join(sentence.lower().split())
        if len(key) > 12 and key in seen:
            return sentence
        seen.add(key)
    return None


def _action_problems(expect: Expect, last: dict[str, Any]) -> list[str]:
    problems = []
    hung_up = last.get("end_call") is True
    if expect.end_call is not None and expect.end_call != hung_up:
        problems.append("expected the agent to hang up" if expect.end_call else "the agent hung up")
    if expect.transfer is not None and last.get("transfer_number") != expect.transfer:
        problems.append(f"expected a transfer to {expect.transfer}, got {last.get('transfer_number')!r}")
    if expect.digit is not None and last.get("digit_to_press") != expect.digit:
        problems.append(f"expected digit {expect.digit!r}, got {last.get('digit_to_press')!r}")
    if expect.no_action:
        taken = [k for k in ("end_call", "transfer_number", "digit_to_press") if last.get(k) not in (None, False)]
        if taken:
            problems.append(f"expected no action, got {taken}")
    return problems


def _subset(expected: dict[str, Any], got: Any) -> bool:
    return isinstance(got, dict) and all(k in got and got[k] == v for k, v in expected.items())


def _frame_problems(expect: Expect, frames: list[dict[str, Any]]) -> list[str]:
    problems = []
    calls = [f for f in frames if f.get("response_type") == "tool_call_invocation"]
    for tool in expect.tools:
        found = [json.loads(c.get("arguments") or "{}") for c in calls if c.get("name") == tool.name]
        if not any(_subset(tool.arguments, arguments) for arguments in found):
            problems.append(f"expected a call of tool {tool.name} with {tool.arguments}; "
                            f"tools called: {[(c.get('name'), c.get('arguments')) for c in calls]}")
    for kind, key, wanted in (("update_agent", "agent_config", expect.update_agent), ("metadata", "metadata", expect.metadata)):
        if wanted is not None and not any(_subset(wanted, f.get(key)) for f in frames if f.get("response_type") == kind):
            problems.append(f"expected a {kind} frame with {wanted}")
    return problems


async def run_scenario(target: Target, suite_name: str, suite: Suite, scenario: Scenario,
                       attempt: int = 1) -> ScenarioResult:
    slug = re.sub(r"[^a-z0-9]+", "-", scenario.name.lower()).strip("-")[:40] or "scenario"
    result = ScenarioResult(suite_name, scenario.name, attempt, f"test-{slug}-{uuid.uuid4().hex[:8]}")
    started = time.monotonic()
    try:
        await _Call(target, suite, scenario, result).play()
    except Exception as exc:  # the server is unreachable or closed the call: the scenario fails, the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.monotonic() - started
    return result


async def run_suites(target: Target, suites: list[tuple[str, Suite]], *, repeat: int = 1, concurrency: int = 8,
                     on_result: Any = None) -> list[ScenarioResult]:
    """Every scenario of every suite, ``repeat`` times, at most ``concurrency`` calls at once."""
    gate = asyncio.Semaphore(concurrency)

    async def one(name: str, suite: Suite, scenario: Scenario, attempt: int) -> ScenarioResult:
        async with gate:
            result = await run_scenario(target, name, suite, scenario, attempt)
        if on_result is not None:
            on_result(result)
        return result

    jobs = [one(name, suite, scenario, attempt) for name, suite in suites for scenario in suite.scenarios
            for attempt in range(1, repeat + 1)]
    return list(await asyncio.gather(*jobs))
