"""JSON log lines with call ids; phone numbers, caller text and secrets masked."""

from __future__ import annotations

import io
import json
import logging

import pytest

from callray.logs import (
    JsonFormatter, Masker, MaskingFilter, configure_logging, mask_caller_text, mask_phone_numbers, mask_secrets,
)


@pytest.fixture
def capture():
    """configure_logging on a private stream; the callray logger restored afterwards."""
    logger = logging.getLogger("callray")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    stream = io.StringIO()

    def setup(**kw) -> io.StringIO:
        configure_logging(stream=stream, **kw)
        return stream

    yield setup
    logger.handlers[:], logger.level, logger.propagate = saved


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# ------------------------------------------------------------------ formatter


def test_json_line_has_ts_level_logger_message_and_call_id(capture):
    stream = capture()
    logging.getLogger("callray.conversation").info("call %s answered %d", "c1", 3, extra={"call_id": "c1", "response_id": 3})
    logging.getLogger("callray.gateway").warning("no call id here")
    first, second = lines(stream)
    assert first["level"] == "INFO" and first["logger"] == "callray.conversation"
    assert first["message"] == "call c1 answered 3" and first["call_id"] == "c1" and first["response_id"] == 3
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "WARNING" and "call_id" not in second


def test_one_line_per_record_even_with_newlines_and_odd_text(capture):
    stream = capture()
    log = logging.getLogger("callray.x")
    log.info("two\nlines \u00e9 \ud800 \x00", extra={"call_id": "c\n2"})
    try:
        raise ValueError("boom api_key=abc123")
    except ValueError:
        log.exception("failed")
    out = stream.getvalue().splitlines()
    assert len(out) == 2
    first, second = (json.loads(line) for line in out)
    assert first["message"].startswith("two\nlines \u00e9") and first["call_id"] == "c\n2"
    assert "ValueError: boom api_key=***" in second["exc"] and "abc123" not in second["exc"]


def test_unserialisable_extra_is_rendered_as_text():
    record = logging.LogRecord("callray.t", logging.INFO, __file__, 1, "m", None, None)
    record.thing = object()
    assert json.loads(JsonFormatter().format(record))["thing"].startswith("<object object")


def test_level_and_idempotence(capture):
    stream = capture(level="WARNING")
    configure_logging(level="WARNING", stream=stream)
    logger = logging.getLogger("callray")
    assert sum(type(h).__name__ == "_CallrayHandler" for h in logger.handlers) == 1 and not logger.propagate
    logging.getLogger("callray.a").info("hidden")
    logging.getLogger("callray.a").warning("shown")
    assert [entry["message"] for entry in lines(stream)] == ["shown"]


def test_plain_text_format(capture):
    stream = capture(json=False)
    logging.getLogger("callray.a").info("token=abc")
    text = stream.getvalue()
    assert text.rstrip().endswith("INFO callray.a: token=***") and not text.startswith("{")


# ------------------------------------------------------------------ phone numbers


@pytest.mark.parametrize("raw, masked", [
    ("+15551234500", "+1555*****00"),
    ("call +442071838750 now", "call +4420******50 now"),
    ("+12345678", "+1*****78"),
    ("(555) 123-4567", "(***) ***-**67"),
    ("555-123-4567", "***-***-**67"),
    ("555.123.4567", "***.***.**67"),
    ("555 123 4567", "*** *** **67"),
    ("+1 (555) 123-4567", "+* (***) ***-**67"),
    ("1-555-123-4567", "*-***-***-**67"),
])
def test_phone_numbers_keep_only_their_last_two_digits(raw, masked):
    assert mask_phone_numbers(raw) == masked


@pytest.mark.parametrize("text", [
    "response 12 at 1712345678901 ms", "2024-01-15 10:22:33", "call_9f8e7d6c5b4a", "10.0.0.1:8000", "v1.2.3",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
])
def test_ids_dates_and_timestamps_are_not_taken_for_phone_numbers(text):
    assert mask_phone_numbers(text) == text


# ------------------------------------------------------------------ secrets


@pytest.mark.parametrize("raw, masked", [
    ("api_key=sk-abcdefghijklmnop1234", "api_key=***"),
    ("token: abc123&x=1", "token: ***&x=1"),
    ("/llm-websocket?token=s3cr3t&call=c1", "/llm-websocket?token=***&call=c1"),
    ('{"api_key": "k-1", "n": 1}', '{"api_key": "***", "n": 1}'),
    ("{'secret': 'a b c', 'ok': 2}", "{'secret': '***', 'ok': 2}"),
    ("Authorization: Bearer eyJhbGciOi.abc", "Authorization: Bearer ***"),
    ("redis://:hunter2@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
    ("redis://user:hunter2@host/0", "redis://user:***@host/0"),
    ("client made with sk-proj-ABCDEFGHIJKLMNOP", "client made with sk-***"),
    ("x-retell-signature: v=1700000000000,d=abcdef0123", "x-retell-signature: ***"),
    ("password='p w'", "password='***'"),
])
def test_secrets_are_masked_in_text(raw, masked):
    assert mask_secrets(raw) == masked


@pytest.mark.parametrize("text", ["max_tokens=100", "secret_in=path", "tokens: 12", "keyword=x"])
def test_similar_names_are_left_alone(text):
    assert mask_secrets(text) == text


def test_nested_values_are_masked_by_key():
    value = {"openai": {"api_key": "sk-x", "model": "gpt"}, "headers": [{"Authorization": "Bearer t"}],
             "from_number": "+15551234500", "caller_text": "I live at 5 Main St", "transcript": [{"role": "user"}],
             "n": 3, "token": None}
    assert Masker().value(value) == {
        "openai": {"api_key": "***", "model": "gpt"}, "headers": [{"Authorization": "***"}],
        "from_number": "+1555*****00", "caller_text": "[caller text: 19 chars]", "transcript": "[caller text]",
        "n": 3, "token": None,
    }
    kept = Masker(phones=False, caller_text=False).value(value)
    assert kept["caller_text"] == "I live at 5 Main St" and kept["from_number"] == "+15551234500"
    assert kept["openai"]["api_key"] == "***"  # secrets are masked whatever the options


def test_caller_text_in_reprs():
    assert mask_caller_text("CallTurn(caller_text='hi there', agent_text='ok')") == \
        "CallTurn(caller_text='[caller text: 8 chars]', agent_text='ok')"
    assert mask_caller_text('{"transcript": "a \\"b\\" c", "x": 1}') == '{"transcript": "[caller text: 9 chars]", "x": 1}'


# ------------------------------------------------------------------ the filter on real records


def test_dict_arguments_messages_and_extras_are_masked(capture):
    stream = capture()
    log = logging.getLogger("callray.t")
    log.info("settings %s", {"openai": {"api_key": "sk-secretvalue123456"}, "redis_url": "redis://:pw@h/0"})
    log.info({"event": "turn", "caller_text": "my card is 4111", "to_number": "+15550001111"})
    log.info("turn done", extra={"call_id": "c1", "caller_text": "hello", "token": "t0k3n", "number": "555-123-4567"})
    log.info("%(who)s called", {"who": "+15551234500"})
    log.info("settings", extra={"settings": type("S", (), {"__str__": lambda self: "S(api_key='sk-x', n=1)"})()})
    first, second, third, fourth, fifth = lines(stream)
    assert "sk-secretvalue" not in first["message"] and "'api_key': '***'" in first["message"]
    assert "pw@" not in first["message"]
    assert "4111" not in second["message"] and "+1555*****11" in second["message"]
    assert third["caller_text"] == "[caller text: 5 chars]" and third["token"] == "***" and third["number"] == "***-***-**67"
    assert third["call_id"] == "c1"
    assert fourth["message"] == "+1555*****00 called"
    assert fifth["settings"] == "S(api_key='***', n=1)"


def test_caller_text_can_be_kept_but_phones_and_secrets_still_go(capture):
    stream = capture(mask_caller_text=False)
    logging.getLogger("callray.t").info("x", extra={"caller_text": "call me at +15551234500", "api_key": "k"})
    (entry,) = lines(stream)
    assert entry["caller_text"] == "call me at +1555*****00" and entry["api_key"] == "***"


def test_mask_pii_off_keeps_phone_numbers_but_not_secrets(capture):
    stream = capture(mask_pii=False)
    logging.getLogger("callray.t").info("from +15551234500 with token=abc", extra={"caller_text": "hi"})
    (entry,) = lines(stream)
    assert entry["message"] == "from +15551234500 with token=***" and entry["caller_text"] == "hi"


def test_named_tuples_and_objects_are_masked_as_text():
    from collections import namedtuple
    Creds = namedtuple("Creds", "user password")
    record = logging.LogRecord("callray.t", logging.INFO, __file__, 1, "creds %s", (Creds("bob", "hunter2"),), None)
    MaskingFilter().filter(record)
    assert record.getMessage() == "creds Creds(user='bob', password='***')"


def test_bad_format_arguments_still_log_masked():
    record = logging.LogRecord("callray.t", logging.INFO, __file__, 1, "%d apples token=%s", ("x",), None)
    assert MaskingFilter().filter(record)
    assert "token=***" in record.getMessage() and "apples" in record.getMessage()


def test_masking_twice_changes_nothing_more():
    record = logging.LogRecord("callray.t", logging.INFO, __file__, 1, "turn caller_text='hi there' token=%s", ("abc",), None)
    record.caller_text = "hello"
    masking = MaskingFilter()
    masking.filter(record)
    once = (record.getMessage(), record.caller_text)
    masking.filter(record)
    assert (record.getMessage(), record.caller_text) == once
    assert once == ("turn caller_text='[caller text: 8 chars]' token=***", "[caller text: 5 chars]")


@pytest.mark.parametrize("text", ['"api_key": "' + "\\x" * 64, "caller_text='" + "\\'" * 64, "token='" + "\\\\" * 64])
def test_unterminated_quoted_values_do_not_backtrack_forever(text):
    """Escapes in an unclosed quote once made the regexes exponential (a log call that never returns)."""
    import threading

    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(Masker().text(text)), daemon=True)
    worker.start()
    worker.join(10)  # a liveness bound, not a speed measurement: the old pattern needed hours here
    assert result and result[0].startswith(text[:5])
