"""callray: a Retell AI custom-LLM backend on Ray Serve.

What an agent author writes against (see docs/agents.md)::

    from callray import Agent, Speech, EndCall

    class Echo(Agent):
        async def respond(self, turn):
            yield Speech(f"You said: {turn.last_user_text}.")

This package is the plain library: it never imports Ray.
"""

from callray.agents.base import (
    Agent,
    AgentOutput,
    EndCall,
    Metadata,
    PressDigit,
    Speech,
    ToolCall,
    ToolExchange,
    ToolResult,
    Transfer,
    Turn,
    UpdateAgent,
    Usage,
)
from callray.agents.phrases import chunk_phrases as phrases

__all__ = [
    "Agent", "AgentOutput", "EndCall", "Metadata", "PressDigit", "Speech", "ToolCall", "ToolExchange",
    "ToolResult", "Transfer", "Turn", "UpdateAgent", "Usage", "phrases",
]
