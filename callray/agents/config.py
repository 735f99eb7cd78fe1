"""Reading agent definitions: one error type and one way to report a bad file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from callray.env import SettingsError, expand_env
from callray.logs import masked_value


class AgentConfigError(ValueError):
    """An agent definition is invalid; each line names the file and the field path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {problem}" for problem in problems))


def describe_validation(exc: ValidationError) -> list[str]:
    """``field.path: message`` per problem, with spelling hints for unknown fields."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        elif not isinstance(error.get("input"), (dict, list)):
            message += f" (got {masked_value(error['loc'], error.get('input'))})"
        problems.append(f"{where}: {message}" if where else message)
    return problems


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
