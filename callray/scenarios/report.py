"""What a run of suites says: one line per scenario, a failure in one screen, JUnit XML for CI."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from callray.scenarios.runner import ScenarioResult

TRANSCRIPT_LINES = 6  # of the transcript shown under a failure


def describe_failure(result: ScenarioResult) -> str:
    """Which step failed, what was expected, what came, and the transcript's end."""
    if result.error is not None:
        return f"could not be played: {result.error}"
    step = result.failed_step
    if step is None:
        return ""
    where = "the greeting" if step.index < 0 else f"step {step.index + 1} ({step.action})"
    lines = [f"{where}:"] + [f"  - {problem}" for problem in step.problems]
    if step.first_sentence_ms is not None:
        budget = f" (budget {step.budget_ms:.0f} ms)" if step.budget_ms else ""
        lines.append(f"  first sentence after {step.first_sentence_ms:.0f} ms{budget}")
    if result.transcript:
        lines.append("  transcript so far:")
        lines += [f"    {u['role']}: {u.get('content', '')[:160]}" for u in result.transcript[-TRANSCRIPT_LINES:]]
    lines.append(f"  call id: {result.call_id}")
    return "\n".join(lines)


def print_result(result: ScenarioResult, console: Console, repeat: int) -> None:
    attempt = f" #{result.attempt}" if repeat > 1 else ""
    slowest = max((s.first_sentence_ms or 0 for s in result.steps), default=0)
    if result.passed:
        console.print(f"[green]PASS[/] {escape(result.suite)} :: {escape(result.scenario)}{attempt} "
                      f"[dim]({result.seconds:.2f} s, slowest first sentence {slowest:.0f} ms)[/]")
    else:
        console.print(f"[red]FAIL[/] {escape(result.suite)} :: {escape(result.scenario)}{attempt}")
        console.print(escape(describe_failure(result)), highlight=False)


def print_summary(results: list[ScenarioResult], console: Console, seconds: float, repeat: int) -> None:
    if repeat > 1:
        rates: dict[tuple[str, str], list[bool]] = defaultdict(list)
        for r in results:
            rates[(r.suite, r.scenario)].append(r.passed)
        for (suite, scenario), passes in sorted(rates.items()):
            if not all(passes):
                console.print(f"  pass rate {sum(passes)}/{len(passes)}: {escape(suite)} :: {escape(scenario)}")
    passed = sum(r.passed for r in results)
    console.print(f"scenarios: {passed} passed, {len(results) - passed} failed in {seconds:.1f} s")


def write_junit(results: list[ScenarioResult], path: Path) -> None:
    """One <testsuite> per suite file, one <testcase> per scenario (and attempt)."""
    root = ET.Element("testsuites")
    by_suite: dict[str, list[ScenarioResult]] = defaultdict(list)
    for r in results:
        by_suite[r.suite].append(r)
    for suite, cases in by_suite.items():
        failures = sum(not c.passed for c in cases)
        node = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(failures),
                             time=f"{sum(c.seconds for c in cases):.3f}")
        for case in cases:
            name = case.scenario + (f" #{case.attempt}" if case.attempt > 1 else "")
            element = ET.SubElement(node, "testcase", classname=suite, name=name, time=f"{case.seconds:.3f}")
            if not case.passed:
                message = describe_failure(case)
                failure = ET.SubElement(element, "failure", message=" ".join(message.splitlines()[:2]).strip() or "failed")
                failure.text = message
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
