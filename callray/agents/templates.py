"""callray's one template language, for every line an agent speaks and every prompt it sends.

- ``{name}`` or Retell's ``{{name}}``: a value (a flow slot, or one of the call's dynamic
  variables and metadata); ``{name|default}`` says ``default`` when there is none, and a
  placeholder with neither says nothing.
- ``[...]`` holding a placeholder: an optional segment, left out whole when a placeholder in it
  has neither a value nor a default: ``"I've pencilled you in for {day}[, {name}]."``.
- Everything else is literal text, brackets and braces that form no placeholder included (a
  prompt may show JSON or ``[Role]`` headings).

Values are filled in one pass, so a value is never read as a placeholder itself; where something
was left out, the spacing around it is tidied, so a line never says a placeholder aloud.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_VALUE = r"\{\{\s*(\w+)\s*(?:\|([^{}\[\]]*))?\}\}|\{(\w+)(?:\|([^{}\[\]]*))?\}"
_FIELD = re.compile(_VALUE)
_TOKEN = re.compile(rf"\[([^\[\]]*)\]|{_VALUE}")
_SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+([,.!?;:])")
_DOUBLE_SPACE = re.compile(r"[ \t]{2,}")

Lookup = Callable[[str], "str | None"]


def _name_default(match: re.Match[str], first: int) -> tuple[str, str | None]:
    """The placeholder's name and default (``first``: the group of the ``{{...}}`` form's name)."""
    if match.group(first) is not None:
        return match.group(first), match.group(first + 1)
    return match.group(first + 2), match.group(first + 3)


def fields(template: str) -> set[str]:
    """The names a template's placeholders read."""
    return {_name_default(m, 1)[0] for m in _FIELD.finditer(template)}


def render(template: str, lookup: Lookup, used: dict[str, str] | None = None) -> str:
    """``template`` with its placeholders filled from ``lookup`` (a name's value, or None);
    ``used``, when given, gains each value said (what the line depends on)."""
    dropped = False

    def value(match: re.Match[str], first: int) -> str:
        nonlocal dropped
        name, default = _name_default(match, first)
        found = lookup(name)
        if found is not None:
            if used is not None:
                used[name] = found
            return found
        dropped = dropped or not default
        return default or ""

    def token(match: re.Match[str]) -> str:
        nonlocal dropped
        segment = match.group(1)
        if segment is None:
            return value(match, 2)
        inside = list(_FIELD.finditer(segment))
        if not inside:
            return match.group(0)  # literal brackets
        if any(f.group(2) is None and f.group(4) is None and lookup(_name_default(f, 1)[0]) is None for f in inside):
            dropped = True
            return ""
        return _FIELD.sub(lambda f: value(f, 1), segment)

    text = _TOKEN.sub(token, template)
    if dropped:
        text = _DOUBLE_SPACE.sub(" ", _SPACE_BEFORE_PUNCT.sub(r"\1", text))
    return text


def check_line(text: str) -> str:
    """A spoken line's validator: every brace and bracket must belong to a placeholder or an
    optional segment (a stray one would be a typo, said aloud)."""
    bare = re.sub(r"\[[^\[\]]*\]", "", _FIELD.sub("", text))
    if "{" in bare or "}" in bare:
        raise ValueError("malformed placeholder: write {name}, {{name}} or {name|default}")
    if "[" in bare or "]" in bare:
        raise ValueError("unbalanced '[' ']': optional segments are [ ... ] and cannot nest")
    return text
