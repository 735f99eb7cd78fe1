"""``callray test``: the shipped suites pass, a mutated agent fails them, bad suite files are
refused before any call, verdicts repeat, and a failure reads in one screen."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from callray.scenarios.command import run_tests, local_settings
from callray.scenarios.server import LocalServer
from callray.settings import PROJECT_DIR
from callray.sim.fake_llm import FakeLLMSettings, running_fake_llm

SUITES = PROJECT_DIR / "tests" / "scenarios"
CLINIC = PROJECT_DIR / "config" / "agents" / "clinic.yaml"


@pytest.fixture
def fake_llm_env(monkeypatch):
    with running_fake_llm(FakeLLMSettings(ttft_ms=20, tokens_per_s=400)) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        yield fake


def console() -> tuple[Console, list[str]]:
    out = Console(record=True, width=200, soft_wrap=True)
    return out, out


def config_with_clinic(tmp_path: Path, clinic: Path) -> Path:
    doc = yaml.safe_load((PROJECT_DIR / "config" / "serve.yaml").read_text())
    doc["applications"][0]["args"]["agents"]["files"]["clinic"] = str(clinic)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_the_shipped_suites_pass_and_write_junit(tmp_path, fake_llm_env):
    out = Console(record=True, width=200)
    junit = tmp_path / "junit.xml"
    code = await _run([SUITES], config=PROJECT_DIR / "config/serve.yaml", junit=junit, console=out)
    assert code == 0, out.export_text()
    cases = ET.parse(junit).getroot().findall(".//testcase")
    assert len(cases) >= 15 and not ET.parse(junit).getroot().findall(".//failure")
    assert {c.get("classname").rsplit("/", 1)[-1] for c in cases} == {"clinic.yaml", "assistant.yaml", "echo.yaml"}


async def _run(paths, **kw) -> int:
    import asyncio

    return await asyncio.to_thread(run_tests, paths, **kw)  # run_tests owns its event loop


MUTATIONS = {  # what a careless edit of the clinic agent changes -> the scenario that must catch it
    "hours": (("8 AM to 6 PM", "8 AM to 5 PM"), "greets a known caller by name"),
    "transfer number": (('transfer_number: "+15550100200"', 'transfer_number: "+15550100299"'),
                        "hands a caller who asks for a person to the front desk"),
    "greeting name": (("Hi[ {customer_name}]", "Hi"), "greets a known caller by name"),
    "emergency line": (("dial 911", "call us"), "sends an emergency to 911 at once"),
    "reminder": (("Are you still there?", "Hello?"), "checks in when the caller goes quiet and picks up again"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
async def test_the_clinic_suite_catches_a_mutated_agent(tmp_path, mutation):
    (old, new), catches = MUTATIONS[mutation]
    text = CLINIC.read_text()
    assert old in text, f"the mutation {mutation!r} no longer applies to {CLINIC}"
    clinic = tmp_path / "clinic.yaml"
    clinic.write_text(text.replace(old, new))
    out = Console(record=True, width=200)
    code = await _run([SUITES / "clinic.yaml"], config=config_with_clinic(tmp_path, clinic), console=out)
    report = out.export_text()
    assert code == 1
    failed = re.findall(r"^FAIL \S+ :: (.+)$", report, re.MULTILINE)
    assert catches in failed, report


async def test_a_bad_suite_is_refused_before_any_call_naming_file_scenario_and_field(tmp_path):
    suite = tmp_path / "bad.yaml"
    suite.write_text("agent: clinic\nscenarios:\n  - name: fine\n    steps: [{say: hi}]\n"
                     "  - name: late caller\n    steps:\n      - say: hi\n        expect: {says: {contians: x}}\n")
    out = Console(record=True, width=200)
    code = await _run([suite], config=tmp_path / "never-read.yaml", console=out)
    text = out.export_text()
    assert code == 2 and "cannot start" not in text  # refused before anything was started
    assert f"{suite}: scenario 'late caller' (scenarios.1): steps.0.expect.says.contians: unknown field" in text


async def test_verdicts_repeat_and_a_failure_fits_one_screen(tmp_path):
    suite = tmp_path / "mixed.yaml"
    suite.write_text(yaml.safe_dump({"agent": "clinic", "scenarios": [
        {"name": "right", "steps": [{"say": "What are your hours?", "expect": {"says": "Monday to Friday"}}]},
        {"name": "wrong", "steps": [{"say": "Hello"}, {"say": "What are your hours?",
                                                       "expect": {"says": "open 24 hours", "end_call": True}}]},
    ]}))
    out = Console(record=True, width=120)
    code = await _run([suite], config=PROJECT_DIR / "config/serve.yaml", repeat=3, console=out)
    text = out.export_text()
    assert code == 1
    assert len(re.findall(r"^PASS .* :: right #\d", text, re.MULTILINE)) == 3
    assert len(re.findall(r"^FAIL .* :: wrong #\d", text, re.MULTILINE)) == 3
    assert "pass rate 0/3" in text and "scenarios: 3 passed, 3 failed" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("FAIL"))
    end = next(i for i, line in enumerate(lines[start + 1:], start + 1) if re.match(r"(FAIL|PASS|scenarios:|  pass rate)", line))
    failure = "\n".join(lines[start:end])
    assert "step 2 (say 'What are your hours?')" in failure and "expected it to contain 'open 24 hours'" in failure
    assert "expected the agent to hang up" in failure and "agent: We're open Monday" in failure
    assert len(failure.splitlines()) <= 24  # one screen


async def test_a_running_server_is_tested_by_url(tmp_path):
    settings = local_settings(PROJECT_DIR / "config/serve.yaml", str(tmp_path))
    with LocalServer(settings) as server:
        out = Console(record=True, width=200)
        code = await _run([SUITES / "clinic.yaml"], url=server.ws, webhook_url=f"{server.http}/webhook",
                          webhook_key=settings.webhook.api_key, console=out)
    assert code == 0, out.export_text()
    assert "callray for" not in out.export_text()  # nothing was started for it


async def test_a_missed_latency_budget_fails_its_step_and_reports_the_measured_time(tmp_path):
    """A budget no answer can meet (a microsecond): the verdict does not depend on how fast the
    machine is, and the report names the budget and what was measured."""
    suite = tmp_path / "budget.yaml"
    suite.write_text(yaml.safe_dump({"agent": "clinic", "scenarios": [
        {"name": "impossible budget", "steps": [{"say": "What are your hours?", "expect": {"first_sentence_ms": 0.001}}]},
    ]}))
    out = Console(record=True, width=200)
    code = await _run([suite], config=PROJECT_DIR / "config/serve.yaml", console=out)
    text = out.export_text()
    assert code == 1 and re.search(r"first sentence after \d+ ms; budget 0 ms", text), text
