"""Agents and tools written in Python: ``kind: python`` agent files and ``module:name`` imports.

An agent is a folder: a YAML file (``kind: python``, ``class: "echo:Echo"``, optional
``options:``) beside the module that defines the class. The module is found beside the YAML
first, then on ``sys.path`` (an installed package). The same lookup finds an LLM agent's
Python function tools (``function: "tools:lookup_order"``).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from callray.agents.base import Agent
from callray.agents.config import AgentConfigError
from callray.env import describe_validation

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ImportPathError(ValueError):
    """An import path that names nothing importable; the message says what was tried."""


def import_object(spec: str, beside: Path | None) -> Any:
    """The object ``module:attr`` names. A module file or package in ``beside`` (the agent
    file's folder) wins over ``sys.path``; that folder stays importable, so the module's own
    imports of its neighbours keep working when called later."""
    if not _IMPORT_PATH.match(spec):
        raise ImportPathError(f"{spec!r} is not an import path: write 'module:name' (e.g. 'echo:Echo')")
    module_name, attr = spec.split(":")
    top = module_name.split(".")[0]
    local = beside is not None and ((beside / f"{top}.py").is_file() or (beside / top / "__init__.py").is_file())
    if local:
        folder = str(beside.resolve())
        if folder not in sys.path:
            sys.path.insert(0, folder)
        loaded = sys.modules.get(top)
        origin = getattr(loaded, "__file__", None)
        if loaded is not None and origin and not Path(origin).resolve().is_relative_to(folder):
            raise ImportPathError(f"module {top!r} is already imported from {origin}, not from {folder}: "
                                  "give the agent's module a name of its own")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            where = f"beside {beside} or " if beside is not None else ""
            raise ImportPathError(f"no module {module_name!r} {where}on sys.path") from None
        raise ImportPathError(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:  # the module itself raised while importing
        raise ImportPathError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ImportPathError(f"module {module_name!r} has no {attr!r}") from None
    return target


async def call_user_code(fn: Any, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
    """Call a user's function (a tool, an inbound hook) within ``timeout_s``: an async one is
    awaited, a sync one runs in a thread so it cannot stall every call of the replica."""
    async with asyncio.timeout(timeout_s):
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)


class PythonAgentConfig(BaseModel):
    """A Python agent definition (an agent YAML with ``kind: python``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    kind: Literal["python"] = Field(description="Agent type discriminator.")
    class_: str = Field(alias="class", description="Import path of the Agent subclass, 'module:Class'; the "
                        "module is found beside this file first, then on sys.path.")
    version: str | None = Field(default=None, min_length=1, description="Overrides the class's version "
                                "(part of response-cache keys).")
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the constructor: validated "
                                    "by the class's Options model if it declares one, else as keyword arguments.")


def load_python_agent(data: dict[str, Any], source: str) -> Agent:
    """Import, check and construct the agent an agent file names; every problem raises
    ``AgentConfigError`` naming the file and the field."""
    try:
        config = PythonAgentConfig.model_validate(data)
    except ValidationError as exc:
        raise AgentConfigError(source, describe_validation(exc)) from None
    try:
        cls = import_object(config.class_, Path(source).parent)
    except ImportPathError as exc:
        raise AgentConfigError(source, [f"class: {exc}"]) from exc
    if not (inspect.isclass(cls) and issubclass(cls, Agent)):
        raise AgentConfigError(source, [f"class: {config.class_} is not a subclass of callray.Agent"])
    if not inspect.isasyncgenfunction(cls.respond):
        raise AgentConfigError(source, [f"class: {config.class_}.respond must be an async generator "
                                        "('async def respond(self, turn):' that yields what to say)"])
    agent = _construct(cls, config, source)
    if config.version is not None:
        agent.version = config.version
    return agent


def _construct(cls: type[Agent], config: PythonAgentConfig, source: str) -> Agent:
    """``cls(options)`` with the options validated by its ``Options`` model, or ``cls(**options)``."""
    args: tuple[Any, ...] = ()
    kwargs = config.options
    if cls.Options is not None:
        try:
            args, kwargs = (cls.Options.model_validate(config.options),), {}
        except ValidationError as exc:
            raise AgentConfigError(source, describe_validation(exc, prefix="options")) from None
    try:
        return cls(*args, **kwargs)
    except TypeError as exc:
        raise AgentConfigError(source, [f"options: {config.class_}: {exc}"]) from None
    except Exception as exc:
        raise AgentConfigError(source, [f"class: constructing {config.class_} failed: {type(exc).__name__}: {exc}"]) from exc
