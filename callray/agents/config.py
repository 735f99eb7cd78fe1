"""Reading agent definitions: one error type and one way to report a bad file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from callray.env import SettingsError, expand_env


class AgentConfigError(ValueError):
    """An agent definition is invalid; each line names the file and the field path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {problem}" for problem in problems))


def read_agent_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping an agent file holds, ``${VAR}`` / ``${VAR:-default}`` read from the
    environment; unreadable or malformed files, and unset variables, raise AgentConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AgentConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise AgentConfigError(source, [f"invalid YAML{where}: {getattr(exc, 'problem', None) or exc}"]) from None
    if not isinstance(data, dict):
        raise AgentConfigError(source, [f"expected a mapping of fields, got {type(data).__name__}"])
    try:
        return expand_env(data)
    except SettingsError as exc:
        raise AgentConfigError(source, [str(exc)]) from None
