"""Redaction: what leaves a live call carries typed placeholders, not callers' identifiers.

With ``privacy.redact`` on, every event a call emits (and so the stream, the archive, the
analytics, the live page and escalation notices) and every log line have phone numbers, e-mail
addresses, card numbers and US social security numbers replaced by ``[PHONE]``, ``[EMAIL]``,
``[CARD]`` and ``[SSN]``. The agent still hears the caller's real words during the call: only
copies that leave it are redacted. Phone numbers are found by Google's ``phonenumbers`` (offline,
any format a number is written in for ``default_region``); card numbers must pass the Luhn check,
so order numbers and dates stay.

Erasure by phone number must still find a caller's calls: with ``caller_key`` set, a redacted
call object keeps ``caller_key``, a keyed hash (HMAC-SHA256) of the caller's number in E.164,
which nobody without the key can reverse by trying every number.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

import phonenumbers
from phonenumbers import Leniency, PhoneNumberMatcher

from callray.events import CallAnalyzed, CallEnded, CallTurn, EscalationRequested, Event

KINDS = ("card", "ssn", "email", "phone")
PLACEHOLDER = {kind: f"[{kind.upper()}]" for kind in KINDS}

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
#: Seven digits anywhere (no phone, card or social security number has fewer): the digit
#: kinds are looked for only then.
_SEVEN_DIGITS = re.compile(r"\d(?:\D*\d){6}")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
#: Keys of Retell's call object whose values are identifiers of ours or Retell's, not of callers.
_KEPT_KEYS = re.compile(r".*(_id|_timestamp|_url)$|caller_key$")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class Redactor:
    """Replaces the identifiers of ``kinds`` in text, call objects and events."""

    def __init__(self, *, kinds: tuple[str, ...] | list[str] = KINDS, default_region: str = "US",
                 caller_key: str | None = None):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown identifier kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        self.kinds, self.default_region = frozenset(kinds), default_region
        self._key = caller_key.encode() if caller_key else None

    def text(self, text: str) -> str:
        """``text`` with each identifier replaced by its placeholder."""
        if not text:
            return text
        digits = _SEVEN_DIGITS.search(text) is not None  # most lines have none: skip the digit kinds
        if digits and "card" in self.kinds:
            text = _CARD.sub(lambda m: PLACEHOLDER["card"] if luhn_valid(re.sub(r"\D", "", m.group(0))) else m.group(0),
                             text)
        if digits and "ssn" in self.kinds:
            text = _SSN.sub(PLACEHOLDER["ssn"], text)
        if "email" in self.kinds and "@" in text:
            text = _EMAIL.sub(PLACEHOLDER["email"], text)
        if digits and "phone" in self.kinds and _SEVEN_DIGITS.search(text):
            spans = [(m.start, m.end) for m in PhoneNumberMatcher(text, self.default_region, leniency=Leniency.POSSIBLE)]
            for start, end in reversed(spans):
                text = text[:start] + PLACEHOLDER["phone"] + text[end:]
        return text

    def value(self, value: Any, key: str = "") -> Any:
        """A copy of a JSON-like value with every string redacted, except the values of
        identifier keys (``call_id``, ``agent_id``, ``*_timestamp``, ``recording_url``...)."""
        if isinstance(value, str):
            return value if _KEPT_KEYS.fullmatch(key) else self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, key) for v in value]
        return value

    def call(self, call: dict[str, Any]) -> dict[str, Any]:
        """Retell's call object, redacted, with ``caller_key`` (when a key is set)."""
        redacted = self.value(call)
        caller = self.caller_key(call.get("from_number"))
        if caller is not None:
            redacted["caller_key"] = caller
        return redacted

    def caller_key(self, number: Any) -> str | None:
        """The keyed hash of a phone number in E.164 (None without a key or a parsable number:
        a withheld caller's "anonymous", or a number redacted before)."""
        if self._key is None or not isinstance(number, str):
            return None
        try:
            return keyed_number(normalise_number(number, self.default_region), self._key)
        except ValueError:
            return None

    def event(self, event: Event) -> Event:
        """A redacted copy of an event (the same object when it carries no caller content)."""
        changes: dict[str, Any] = {}
        if isinstance(event, CallTurn):
            changes = {"caller_text": self.text(event.caller_text), "agent_text": self.text(event.agent_text)}
        elif isinstance(event, (CallEnded, CallAnalyzed)):
            changes = {"call": self.call(event.call)}
            if isinstance(event, CallEnded):
                changes["reason"] = self.text(event.reason)
        elif isinstance(event, EscalationRequested):
            changes = {"reason": self.text(event.reason)}
        changes = {k: v for k, v in changes.items() if v is not getattr(event, k)}  # most lines hold none
        extra = {k: self.value(v, k) for k, v in (event.model_extra or {}).items()}
        if not changes and not extra:
            return event
        return event.model_copy(update={**changes, **extra})


def keyed_number(e164: str, key: bytes) -> str:
    """``key:`` and the HMAC-SHA256 of a number in E.164 under ``key`` (its first 128 bits, hex)."""
    return "key:" + hmac.new(key, e164.encode(), hashlib.sha256).hexdigest()[:32]


def normalise_number(number: str, default_region: str = "US") -> str:
    """A phone number in E.164 (``+15551234567``) however it was written; raises ValueError
    naming the number's form when it is not one."""
    try:
        parsed = phonenumbers.parse(number, default_region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {number!r} ({exc})") from None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)

