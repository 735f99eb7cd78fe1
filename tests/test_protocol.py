"""Retell frames both ways: lenient in, strict out, typed errors for bad frames."""

from __future__ import annotations

import json
import pickle

import pytest
from pydantic import ValidationError

from callray.protocol import (
    AgentInterruptFrame, CallDetails, ConfigBody, ConfigFrame, PingPong, PingPongFrame, ProtocolError, ReminderRequired, ResponseFrame, ResponseRequired,
    ToolCallInvocationFrame, ToolCallResultFrame, UnknownInteraction,
    UpdateOnly, parse_frame,
)


def test_response_required_with_unknown_fields_and_roles_round_trips():
    raw = {
        "interaction_type": "response_required", "response_id": 7, "new_field": {"x": 1},
        "transcript": [
            {"role": "agent", "content": "Hi", "words": [{"word": "Hi", "start": 0.1, "end": 0.3, "extra": 1}]},
            {"role": "user", "content": "(unintelligible audio)"},
            {"role": "transfer_target", "content": "hello?"},
            {"role": "brand_new_role"},
        ],
        "transcript_with_tool_calls": [{"role": "tool_call_invocation", "tool_call_id": "a", "name": "x"}],
    }
    event = parse_frame(json.dumps(raw))
    assert isinstance(event, ResponseRequired)
    assert event.response_id == 7 and [u["role"] for u in event.transcript][-2:] == ["transfer_target", "brand_new_role"]
    dumped = event.model_dump()
    assert dumped["new_field"] == {"x": 1} and dumped["transcript"][0] == {"role": "agent", "content": "Hi"}


@pytest.mark.parametrize("raw, cls", [
    ({"interaction_type": "ping_pong", "timestamp": 1700000000000}, PingPong),
    ({"interaction_type": "call_details", "call": {"call_id": "c", "whatever": [1]}}, CallDetails),
    ({"interaction_type": "update_only", "transcript": [], "turntaking": "agent_turn"}, UpdateOnly),
    ({"interaction_type": "reminder_required", "response_id": 3, "transcript": []}, ReminderRequired),
    ({"interaction_type": "something_new", "payload": 1}, UnknownInteraction),
])
def test_each_inbound_type(raw, cls):
    assert isinstance(parse_frame(json.dumps(raw)), cls)


@pytest.mark.parametrize("frame, kind", [
    (b"\x00\x01", "binary"),
    ("{not json", "not_json"),
    ("[1, 2]", "not_object"),
    ('{"response_id": 1}', "missing_type"),
    ('{"interaction_type": "response_required", "response_id": "one"}', "invalid"),
    ('{"interaction_type": "response_required", "response_id": -1}', "invalid"),
    ('{"interaction_type": "ping_pong"}', "invalid"),
])
def test_malformed_frames_are_typed_errors_not_exceptions(frame, kind):
    error = parse_frame(frame)
    assert isinstance(error, ProtocolError) and error.kind == kind
    assert str(error)


def test_invalid_error_names_the_field():
    error = parse_frame('{"interaction_type": "response_required", "response_id": "one"}')
    assert "response_id" in error.detail and error.interaction_type == "response_required"


def test_outbound_omits_unset_optionals_and_always_sets_response_type():
    frame = json.loads(ResponseFrame(response_id=3, content="Hi.", content_complete=False).to_json())
    assert frame == {"response_type": "response", "response_id": 3, "content": "Hi.", "content_complete": False}
    full = json.loads(ResponseFrame(response_id=4, content="", content_complete=True, end_call=True,
                                    no_interruption_allowed=True).to_json())
    assert full["end_call"] is True and full["no_interruption_allowed"] is True and "transfer_number" not in full


@pytest.mark.parametrize("bad", [
    {"response_id": "3", "content": "x", "content_complete": False},
    {"response_id": 3, "content": "x", "content_complete": "true"},
    {"response_id": 3.5, "content": "x", "content_complete": False},
    {"response_id": 3, "content": 5, "content_complete": False},
    {"response_id": 3, "content": "x", "content_complete": False, "end_call": "yes"},
    {"response_id": 3, "content": "x", "content_complete": False, "unknown": 1},
])
def test_outbound_is_strict(bad):
    with pytest.raises(ValidationError):
        ResponseFrame(**bad)


def test_an_outbound_frame_is_serialised_once_even_across_processes():
    """The producer serialises it (where a failure is caught); the writer, here or behind a Ray
    hop with dedicated placement, sends that same text."""
    frame = ResponseFrame(response_id=3, content="Hi there", content_complete=True)
    text = frame.to_json()
    assert frame.to_json() is text
    travelled = pickle.loads(pickle.dumps(frame))
    assert travelled == frame and travelled.to_json() == text and travelled._wire == text


def test_other_outbound_frames():
    assert json.loads(ConfigFrame(config=ConfigBody()).to_json()) == {"response_type": "config", "config": {
        "auto_reconnect": True, "call_details": True, "transcript_with_tool_calls": False}}
    assert json.loads(PingPongFrame(timestamp=123).to_json()) == {"response_type": "ping_pong", "timestamp": 123}
    interrupt = json.loads(AgentInterruptFrame(interrupt_id=1, content="Hold on", content_complete=True).to_json())
    assert interrupt["response_type"] == "agent_interrupt" and interrupt["interrupt_id"] == 1
    invocation = json.loads(ToolCallInvocationFrame(tool_call_id="t", name="n", arguments='{"a": 1}').to_json())
    assert invocation["arguments"] == '{"a": 1}'
    result = json.loads(ToolCallResultFrame(tool_call_id="t", content="ok", successful=False).to_json())
    assert result["successful"] is False


def test_word_timings_are_skipped_unchecked_and_update_only_transcripts_dropped():
    raw = {"interaction_type": "response_required", "response_id": 2,
           "transcript": [{"role": "user", "content": "hi", "words": [{"word": 5}, "odd"]}]}
    event = parse_frame(json.dumps(raw))
    assert isinstance(event, ResponseRequired) and event.transcript == [{"role": "user", "content": "hi"}]
    update = parse_frame(json.dumps({"interaction_type": "update_only", "transcript": [1, {"role": 2}]}))
    assert isinstance(update, UpdateOnly) and "transcript" not in update.model_dump()


def test_a_transcript_entry_without_a_string_role_or_content_is_refused():
    for entry in ({"content": "hi"}, {"role": "user", "content": 5}, "text"):
        error = parse_frame(json.dumps({"interaction_type": "response_required", "response_id": 1,
                                        "transcript": [entry]}))
        assert isinstance(error, ProtocolError) and error.kind == "invalid" and "transcript" in error.detail
