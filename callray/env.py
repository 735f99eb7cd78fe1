"""``${VAR}`` and ``${VAR:-default}`` in config files (the Serve config and agent files)."""

from __future__ import annotations

import os
import re
import types
import typing
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from callray.logs import masked_value

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class SettingsError(ValueError):
    """Invalid callray settings; the message names the source and the field."""


def expand_env(value: Any, *, where: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a nested structure. What a
    variable holds is taken as it is (a password with ``${`` in it stays so)."""
    if isinstance(value, dict):
        return {k: expand_env(v, where=f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, where=f"{where}.{i}" if where else str(i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise SettingsError(f"{where + ': ' if where else ''}environment variable {name} is not set "
                            f"(referenced as {match.group(0)!r})")

    return _ENV_REF.sub(substitute, value)


class EnvSection(BaseModel):
    """A config section: unknown fields refused; ``${VAR}`` expanded exactly once in each of its
    own values, the defaults' included (``validate_default``); a nested section expands its own."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _expand_env(cls, value: Any, info: ValidationInfo) -> Any:
        return value if info.field_name in _sections_of(cls) else expand_env(value)


def moved(**where: str) -> Any:
    """A section's validator refusing fields an earlier release had, each with where it went
    (``old_field="moved to ..."``): an old config file fails naming the way to write it now."""
    def refuse(cls: type, data: Any) -> Any:
        if isinstance(data, dict):
            for field, now in where.items():
                if field in data:
                    raise ValueError(f"{field} {now}")
        return data
    return model_validator(mode="before")(classmethod(refuse))


@cache
def _sections_of(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` that hold nested sections (which expand their own values)."""
    def holds_section(annotation: Any) -> bool:
        if isinstance(annotation, type) and issubclass(annotation, EnvSection):
            return True
        return typing.get_origin(annotation) in (typing.Union, types.UnionType) and \
            any(holds_section(arg) for arg in typing.get_args(annotation))
    return frozenset(name for name, field in model.model_fields.items() if holds_section(field.annotation))


def describe_validation(exc: ValidationError, prefix: str = "") -> list[str]:
    """``field.path: message`` per problem of a config file (under ``prefix``, when the model
    is a part of the file), with spelling hints for unknown fields, and the value shown only
    masked (never a secret)."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in ([prefix] if prefix else []) + list(error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        elif not isinstance(error.get("input"), (dict, list)):
            message += f" (got {masked_value(error['loc'], error.get('input'))})"
        problems.append(f"{where}: {message}" if where else message)
    return problems
