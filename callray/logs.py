"""Structured, privacy-safe logs: one JSON object per line, phone numbers and secrets masked.

Calls carry personal data (phone numbers, what the caller said) and the process holds
secrets (API keys, the socket secret, Redis passwords). Log lines end up in files, log
shippers and bug reports, so masking happens before a record is formatted, in one filter
every callray handler uses. Records logged with ``extra={"call_id": ...}`` (as the whole
code base does) get a ``call_id`` field, so one call's lines can be filtered out of a host
that serves thousands.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Callable, TextIO

SECRET_KEYS = frozenset({
    "api_key", "apikey", "api-key", "key", "token", "access_token", "refresh_token", "secret", "client_secret",
    "password", "passwd", "authorization", "x-retell-signature", "signature", "cookie", "set-cookie",
})
CALLER_TEXT_KEYS = frozenset({
    "caller_text", "user_text", "last_user_text", "utterance", "transcript", "transcript_object",
    "transcript_with_tool_calls",
})
MASK = "***"

# attributes every LogRecord has; anything else on a record came from ``extra=``
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

_SECRET_NAMES = r"api[_-]?key|apikey|access_token|refresh_token|client_secret|token|secret|password|passwd|authorization|x-retell-signature|signature"
# "api_key": "v" / 'token': 'v'  (JSON and Python reprs)
_QUOTED_SECRET = re.compile(rf"""(?i)(["'])({_SECRET_NAMES})\1(\s*:\s*)(["'])(?:\\.|(?!\4)[^\\])*\4""")
# api_key=v, token: v, ?token=v&, password='v'
_KV_SECRET = re.compile(rf"""(?i)(?<![\w-])({_SECRET_NAMES})(\s*[=:]\s*)(?:(["'])(?:\\.|(?!\3)[^\\])*\3|(?!\*\*\*|(?i:bearer|basic)\s)[^\s"';&)}}\]]+)""")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_OPENAI_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{12,}")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^@\s/]+@")

_CALLER_NAMES = "|".join(sorted(CALLER_TEXT_KEYS, key=len, reverse=True))
_QUOTED_CALLER = re.compile(rf"""(?i)(?<![\w-])(["']?)({_CALLER_NAMES})\1(\s*[=:]\s*)(["'])(?!\[caller text)((?:\\.|(?!\4)[^\\])*)\4""")

_E164 = re.compile(r"(?<![\w+])\+(\d{8,15})(?!\d)")
_US_PHONE = re.compile(r"(?<![\w+])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\w)")


# --------------------------------------------------------------------------- masking


def mask_phone_numbers(text: str) -> str:
    """E.164 keeps up to 4 leading and the last 2 digits (``+15551234500`` -> ``+1555*****00``);
    US formats keep their punctuation and the last 2 digits (``(555) 123-4567`` -> ``(***) ***-**67``)."""

    def e164(match: re.Match[str]) -> str:
        digits = match.group(1)
        lead = min(4, max(1, len(digits) - 7))
        return "+" + digits[:lead] + "*" * (len(digits) - lead - 2) + digits[-2:]

    def us(match: re.Match[str]) -> str:
        chars, seen, total = list(match.group(0)), 0, sum(c.isdigit() for c in match.group(0))
        for i, c in enumerate(chars):
            if c.isdigit():
                seen += 1
                if seen <= total - 2:
                    chars[i] = "*"
        return "".join(chars)

    return _US_PHONE.sub(us, _E164.sub(e164, text))


def is_secret_field(name: str) -> bool:
    """A setting whose value is a secret (``secret``, ``api_key``, ``read_token``, ``password``...)."""
    name = name.lower()
    return name in SECRET_KEYS or name.endswith(("secret", "token", "api_key", "password"))


def masked_value(where: tuple[Any, ...] | list[Any], value: Any) -> str:
    """``repr(value)`` for an error message, never a secret: the whole value when any part of
    the field path is a secret field, else with secret-looking parts masked (URL passwords,
    keys, tokens inside a mapping)."""
    if any(is_secret_field(str(part)) for part in where):
        return MASK
    return mask_secrets(repr(value))


def mask_secrets(text: str) -> str:
    """Mask values of secret-looking keys, bearer tokens, OpenAI-style keys and URL passwords."""
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _QUOTED_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}{m.group(4)}{MASK}{m.group(4)}", text)
    text = _KV_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{MASK}{m.group(3) or ''}", text)
    text = _OPENAI_KEY.sub("sk-" + MASK, text)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}@", text)


def _caller_mask(value: Any) -> str:
    return f"[caller text: {len(value)} chars]" if isinstance(value, str) else "[caller text]"


def mask_caller_text(text: str) -> str:
    """Mask quoted values of caller-text keys in reprs (``caller_text='...'``, ``"transcript": "..."``)."""
    return _QUOTED_CALLER.sub(
        lambda m: f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}{m.group(4)}{_caller_mask(m.group(5))}{m.group(4)}",
        text)


class Masker:
    """The masking rules, applicable to text and to nested dict/list values."""

    def __init__(self, *, phones: bool = True, caller_text: bool = True, redact: Callable[[str], str] | None = None):
        self.phones, self.caller_text, self.redact = phones, caller_text, redact

    def text(self, text: str) -> str:
        text = mask_secrets(text)
        if self.redact is not None:  # privacy.redact: e-mail addresses, card numbers... as placeholders
            text = self.redact(text)
        if self.caller_text:
            text = mask_caller_text(text)
        return mask_phone_numbers(text) if self.phones else text

    def value(self, value: Any, key: str | None = None) -> Any:
        """A copy of ``value`` with secret keys, caller text and phone numbers masked."""
        lowered = key.lower() if isinstance(key, str) else None
        if lowered in SECRET_KEYS and value is not None:
            return MASK
        if self.caller_text and lowered in CALLER_TEXT_KEYS and value:
            return value if isinstance(value, str) and value.startswith("[caller text") else _caller_mask(value)
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(v, k) for k, v in value.items()}
        if type(value) in (list, tuple):  # subclasses (named tuples) are masked as rendered text
            return type(value)(self.value(v) for v in value)
        return value


# --------------------------------------------------------------------------- logging


class MaskingFilter(logging.Filter):
    """Masks a record in place before any handler formats it; never drops a record.

    Dict arguments and dict messages are masked by key (``api_key``, ``token``, ``caller_text``...),
    then the rendered message, ``extra`` fields and the traceback are masked as text.
    """

    def __init__(self, *, mask_phones: bool = True, mask_caller_text: bool = True,
                 redact: Callable[[str], str] | None = None):
        super().__init__()
        self.masker = Masker(phones=mask_phones, caller_text=mask_caller_text, redact=redact)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._mask(record)
        except Exception as exc:  # masking must never lose a line; say so instead of leaking it
            record.msg, record.args = f"[log line withheld: masking failed: {type(exc).__name__}]", None
        return True

    def _mask(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, Mapping):
            record.msg = self.masker.value(record.msg)
        if isinstance(record.args, Mapping):
            record.args = self.masker.value(record.args)
        elif record.args:
            record.args = tuple(self.masker.value(a) if isinstance(a, (Mapping, list, tuple)) else a for a in record.args)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # bad %-args: keep both parts visible, masked
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = self.masker.text(str(message)), None
        for name, value in list(vars(record).items()):
            if name not in _RECORD_ATTRS and name != "call_id":
                if not isinstance(value, (str, int, float, bool, type(None), Mapping, list, tuple)):
                    value = str(value)  # rendered here, masked, so no formatter prints it unmasked
                setattr(record, name, self.masker.value(value, name))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.masker.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.masker.text(record.stack_info)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC ISO 8601), ``level``, ``logger``, ``message``,
    ``call_id`` when the record has one, other ``extra`` fields, and ``exc`` for a traceback.
    ASCII-escaped so no byte sequence in a caller's text can break the line or the encoding."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        call_id = getattr(record, "call_id", None)
        if call_id is not None:
            entry["call_id"] = call_id
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRS and name not in entry:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=True)


class _CallrayHandler(logging.StreamHandler):
    """The handler :func:`configure_logging` owns (found again by its type, so re-configuring replaces it)."""


def configure_logging(level: str | int = "INFO", json: bool = True, mask_pii: bool = True, *,
                      mask_caller_text: bool | None = None, stream: TextIO | None = None,
                      redact: Callable[[str], str] | None = None) -> logging.Handler:
    """Send the ``callray`` loggers to one stream handler (stderr by default); idempotent.

    ``json`` picks :class:`JsonFormatter` over a plain text line; ``mask_pii`` masks phone
    numbers and caller text (``mask_caller_text`` overrides the latter); ``redact`` (the
    ``privacy`` redactor's ``text``) replaces identifiers in every line. Secrets are masked
    always. The ``callray`` logger stops propagating to the root logger, so lines are not
    written twice. Calling it again replaces the handler instead of adding one.
    """
    logger = logging.getLogger("callray")
    for old in [h for h in logger.handlers if isinstance(h, _CallrayHandler)]:
        logger.removeHandler(old)
    handler = _CallrayHandler(stream or sys.stderr)
    caller_text = mask_pii if mask_caller_text is None else mask_caller_text
    handler.addFilter(MaskingFilter(mask_phones=mask_pii, mask_caller_text=caller_text, redact=redact))
    handler.setFormatter(JsonFormatter() if json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False
    return handler
