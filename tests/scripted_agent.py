"""A deterministic agent for conversation tests: what it does is spelled out in the caller's words."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from callray.agents.base import Agent, AgentOutput, EndCall, PressDigit, Speech, ToolCall, ToolResult, Transfer, Turn, normalise


class ScriptedAgent(Agent):
    """Echoes the caller. Words in the utterance trigger behaviours:
    ``slow`` (first phrase after 0.3 s), ``hang`` (never answers), ``fail`` (raises after one
    phrase), ``bye`` (end call), ``transfer`` (transfer), ``digit`` (press 1), ``tool``
    (tool frames), ``remember X`` (stores X in state). Records cancelled generations."""

    name = "scripted"
    version = "1"
    greeting_uses_call = False  # its begin_message reads no call data: greet at once

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.started: list[str] = []

    def begin_message(self, state: dict[str, Any], call: dict[str, Any]) -> str:
        return "Hello, this is the test agent."

    def cache_key(self, turn: Turn) -> str | None:
        return normalise(turn.last_user_text) if turn.kind == "response" and "cache" in turn.last_user_text else None

    @property
    def fallback_line(self) -> str:
        return "Sorry, something went wrong."

    @property
    def reminder_line(self) -> str:
        return "Are you still there?"

    async def respond(self, turn: Turn) -> AsyncIterator[AgentOutput]:
        text = turn.last_user_text
        self.started.append(text)
        try:
            if turn.kind == "reminder":
                yield Speech(self.reminder_line)
                return
            words = normalise(text).split()
            if "hang" in words:
                await asyncio.sleep(3600)
            if "slow" in words:
                await asyncio.sleep(0.3)
            if "remember" in words:
                turn.state["memory"] = words[words.index("remember") + 1]
            yield Speech(f"You said: {text}.")
            if "fail" in words:
                raise RuntimeError("the agent broke")
            if "tool" in words:
                yield ToolCall("t1", "lookup", '{"q": "x"}')
                yield ToolResult("t1", "found", True)
            if "bye" in words:
                yield Speech("Goodbye!", no_interruption_allowed=True)
                yield EndCall()
            if "transfer" in words:
                yield Transfer("+15550001111")
            if "digit" in words:
                yield PressDigit("1")
            yield Speech("Anything else?")
        except asyncio.CancelledError:
            self.cancelled.append(text)
            raise
