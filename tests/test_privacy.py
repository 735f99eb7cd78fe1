"""Redaction (``privacy.redact``): each identifier kind, each place that leaves a live call, and
what must stay (the agent hears the real words; dates, prices and order numbers survive)."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callray.events import CallEnded, CallTurn, EscalationRequested
from callray.logs import configure_logging
from callray.privacy import Redactor, luhn_valid, normalise_number
from callray.settings import CallraySettings, SettingsError, PrivacySettings
from callray.sim.client import RetellClient
from callray.webhook import sign
from tests.test_serve_events import eventually

PHONE, EMAIL, CARD, SSN = "415-555-2671", "jane.doe+clinic@example.co.uk", "4111 1111 1111 1111", "123-45-6789"
SAID = f"My number is {PHONE}, mail {EMAIL}, card {CARD}, ssn {SSN}."


@pytest.mark.parametrize("text, expected", [
    ("call me at +1 (415) 555-2671 please", "call me at [PHONE] please"),
    ("it's 415.555.2671 or +44 20 7946 0958", "it's [PHONE] or [PHONE]"),
    ("write to jane.doe+clinic@example.co.uk.", "write to [EMAIL]."),
    ("card 4111-1111-1111-1111 expires", "card [CARD] expires"),
    ("amex 378282246310005", "amex [CARD]"),
    ("ssn 123-45-6789", "ssn [SSN]"),
])
def test_each_identifier_kind_becomes_its_typed_placeholder(text, expected):
    assert Redactor().text(text) == expected


@pytest.mark.parametrize("text", [
    "see you on 2026-12-06 at 10:30", "it costs $1,250,000", "order 12345678", "room 204, zip 94107",
    "card 4111 1111 1111 1112",  # fails the Luhn check: not a card number
    "ssn 000-12-3456", "five five five one two", "",
])
def test_what_is_not_an_identifier_stays(text):
    assert Redactor().text(text) == text


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")


def test_only_the_kinds_asked_for_are_redacted():
    assert Redactor(kinds=["email"]).text(f"{PHONE} {EMAIL}") == f"{PHONE} [EMAIL]"
    with pytest.raises(ValueError, match="unknown identifier kinds"):
        Redactor(kinds=["dna"])


def test_an_event_with_nothing_to_redact_is_passed_on_as_it_is():
    redactor = Redactor()
    plain = CallTurn(call_id="c", seq=1, response_id=1, caller_text="What are your hours?", agent_text="9 to 5.")
    assert redactor.event(plain) is plain
    mixed = redactor.event(plain.model_copy(update={"agent_text": f"Call {PHONE}."}))
    assert mixed.caller_text == "What are your hours?" and mixed.agent_text == "Call [PHONE]."


def test_events_carry_placeholders_and_a_keyed_caller_hash_but_keep_identifiers_of_their_own():
    redactor = Redactor(caller_key="s3cret")
    turn = redactor.event(CallTurn(call_id="call_4155552671", seq=3, response_id=2, caller_text=SAID,
                                   agent_text=f"I have {PHONE} on file."))
    assert turn.call_id == "call_4155552671" and turn.seq == 3
    assert turn.caller_text == "My number is [PHONE], mail [EMAIL], card [CARD], ssn [SSN]."
    assert turn.agent_text == "I have [PHONE] on file."
    call = {"call_id": "call_4155552671", "agent_id": "agent_4155552671", "from_number": "+14155552671",
            "to_number": "+14155550000", "transcript": f"User: {SAID}", "start_timestamp": 1765000000000,
            "transcript_object": [{"role": "user", "content": SAID, "words": [{"word": EMAIL}]}],
            "metadata": {"note": f"callback {PHONE}"}}
    ended = redactor.event(CallEnded(call_id="call_4155552671", seq=1, reason="user_hangup", call=call))
    assert ended.call["call_id"] == ended.call["agent_id"].replace("agent", "call") == "call_4155552671"
    assert ended.call["from_number"] == ended.call["to_number"] == "[PHONE]"
    assert ended.call["start_timestamp"] == 1765000000000
    text = json.dumps(ended.call)
    for identifier in (PHONE, "+14155552671", EMAIL, CARD, SSN):
        assert identifier not in text
    # the keyed hash: the same for any way of writing the number, different under another key
    assert ended.call["caller_key"] == redactor.caller_key("(415) 555-2671") != Redactor(caller_key="x").caller_key(PHONE)
    assert ended.call["caller_key"].startswith("key:") and "4155552671" not in ended.call["caller_key"]
    assert call["from_number"] == "+14155552671"  # the original is not touched
    reason = redactor.event(EscalationRequested(call_id="c", seq=1, rule="repeated", reason=f"caller said {PHONE!r}"))
    assert reason.reason == "caller said '[PHONE]'"


@pytest.mark.parametrize("from_number", ["anonymous", "", "[PHONE]"])
def test_a_caller_without_a_number_is_redacted_without_a_key_and_nothing_is_lost(from_number):
    """A withheld caller's number ("anonymous"), or one redacted before, is no phone number:
    redacting its call used to raise, which lost the call's call.ended event and answered
    Retell's webhook with 500 (retried for good)."""
    ended = Redactor(caller_key="k").event(CallEnded(call_id="c", seq=1, call={"call_id": "c",
                                                                          "from_number": from_number}))
    assert "caller_key" not in ended.call and ended.call["call_id"] == "c"


def test_privacy_settings_name_what_is_wrong():
    with pytest.raises(SettingsError, match="privacy.default_region"):
        CallraySettings.parse({"privacy": {"default_region": "XX"}})
    with pytest.raises(SettingsError, match="privacy.kinds"):
        CallraySettings.parse({"privacy": {"kinds": ["dna"]}})
    with pytest.raises(SettingsError, match="admin_token must differ from read_token"):
        CallraySettings.parse({"gateway": {"read_token": "same", "admin_token": "same"}})
    assert PrivacySettings(caller_key="k").caller("(415) 555-2671") == [
        "+14155552671", Redactor(caller_key="k").caller_key("+14155552671")]
    with pytest.raises(ValueError, match="not a phone number"):
        normalise_number("call me maybe")


def test_log_lines_are_redacted_too():
    out = io.StringIO()
    settings = CallraySettings.parse({"logging": {"json_lines": False}})
    redactor = settings.privacy.redactor()
    configure_logging("INFO", json=False, stream=out, redact=redactor.text)
    try:
        logging.getLogger("callray.test").warning("agent said %s", SAID)
    finally:
        configure_logging("INFO")
    line = out.getvalue()
    assert "[EMAIL]" in line and "[CARD]" in line and "[SSN]" in line
    for identifier in (EMAIL, CARD, SSN, "2671"):
        assert identifier not in line


# --------------------------------------------------------------------------- every sink, on a real server

READ, ADMIN, KEY = "read-token-privacy", "admin-token-privacy", "key_privacy_test"


def get(served, path: str, token: str = READ) -> tuple[int, dict]:
    from tests.test_gateway import get as http_get

    return http_get(f"{served.http}{path}", token)


@pytest.fixture(scope="module")
def private_gateway(tmp_path_factory):
    from tests.test_gateway import Served

    with Served({"gateway": {"read_token": READ, "admin_token": ADMIN}, "webhook": {"api_key": KEY},
                 "privacy": {"caller_key": "privacy-test-key"},
                 "archive": {"dir": str(tmp_path_factory.mktemp("archive-private"))}}) as served:
        yield served


async def test_what_leaves_the_call_is_redacted_while_the_agent_hears_the_real_words(private_gateway):
    served = private_gateway
    call = {"call_id": "call-private", "from_number": "+14155552671", "to_number": "+14155550000"}
    async with RetellClient(served.ws, "call-private", call_object=call) as caller:
        await caller.complete(0)
        await caller.turn(1, SAID)
        # the live page, while the call is on
        status, live = await asyncio.to_thread(get, served, "/ui/state")
        assert status == 200 and "[PHONE]" in json.dumps(live)
        # the agent's own copy keeps the words
        state = served.runtime.host.calls["call-private"].state
        assert state.turns[-1].user == SAID
    body = json.dumps({"event": "call_ended", "call": {**call, "disconnection_reason": "user_hangup",
                                                       "transcript": f"User: {SAID}"}}).encode()
    import urllib.request

    request = urllib.request.Request(f"{served.http}/webhook", data=body, method="POST", headers={
        "content-type": "application/json", "x-retell-signature": sign(body, KEY)})
    assert (await asyncio.to_thread(urllib.request.urlopen, request)).status == 204

    def ended_record():
        status, record = get(served, "/calls/call-private")
        return record if status == 200 and record.get("ended") else None

    def analysed():  # analytics has taken in the call's end (it trails the archive by a batch at most)
        status, snap = get(served, "/analytics")
        return snap if status == 200 and snap["overall"]["disconnections"].get("user_hangup") else None

    record = await eventually(ended_record)
    assert record, "the call's record was not archived"
    analytics = await eventually(analysed)
    assert analytics, "analytics did not count the call's end"
    sinks = {"archive": record, "live page": get(served, "/ui/state")[1], "analytics": analytics}
    for sink, content in sinks.items():
        text = json.dumps(content)
        for identifier in (PHONE, "+14155552671", EMAIL, CARD, SSN):
            assert identifier not in text, f"{identifier} in the {sink}"
    assert record["turns"][-1]["caller"] == "My number is [PHONE], mail [EMAIL], card [CARD], ssn [SSN]."
    assert record["call"]["from_number"] == "[PHONE]" and record["call"]["caller_key"].startswith("key:")


@given(st.text(alphabet="0123456789 -().+abc\n", max_size=40))
def test_the_phone_matcher_runs_exactly_when_the_text_has_seven_digits(text):
    from callray.privacy import _SEVEN_DIGITS

    assert bool(_SEVEN_DIGITS.search(text)) == (sum(c.isdigit() for c in text) >= 7)
