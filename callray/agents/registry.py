"""The agents of one deployment, loaded from their YAML files, and routing between them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from callray.agents.base import Agent
from callray.agents.config import AgentConfigError, read_agent_yaml
from callray.settings import AgentsSettings

log = logging.getLogger("callray.agents")


def load_agent(path: str | Path) -> Agent:
    """Build the agent a YAML file defines; its ``kind`` picks the implementation."""
    data = read_agent_yaml(path)
    kind = data.get("kind", "flow")
    if kind == "flow":
        from callray.agents.flow import FlowAgent

        return FlowAgent.from_dict(data, source=str(path))
    if kind == "llm":
        from callray.agents.llm import LLMAgent

        return LLMAgent.from_dict(data, source=str(path))
    if kind == "python":
        from callray.agents.python import load_python_agent

        return load_python_agent(data, source=str(path))
    raise AgentConfigError(str(path), [f"kind: unknown agent kind {kind!r}; expected 'flow', 'llm' or 'python'"])


class AgentRegistry:
    """Agents by name, the default one, and the Retell ``agent_id`` routing table."""

    def __init__(self, agents: dict[str, Agent], default: str, by_retell_agent_id: dict[str, str] | None = None):
        if default not in agents:
            raise ValueError(f"default agent {default!r} is not defined (have {sorted(agents)})")
        self.agents, self.default_name = agents, default
        self.by_retell_agent_id = dict(by_retell_agent_id or {})

    @classmethod
    def from_settings(cls, settings: AgentsSettings) -> "AgentRegistry":
        agents = {name: load_agent(settings.resolve(name)) for name in settings.files}
        for name, agent in agents.items():
            agent.name = name  # the route and the cache know an agent by its configured name
        return cls(agents, settings.default, settings.by_retell_agent_id)

    def get(self, name: str | None) -> Agent:
        """The agent called ``name`` (the default for None). Unknown names raise KeyError."""
        if name is None:
            return self.agents[self.default_name]
        try:
            return self.agents[name]
        except KeyError:
            raise KeyError(f"unknown agent {name!r}; configured agents: {sorted(self.agents)}") from None

    async def aclose(self) -> None:
        """Close what the agents hold open (an LLM agent's pooled provider connections)."""
        for agent in self.agents.values():
            try:
                await agent.aclose()
            except Exception:  # one agent's broken close must not keep the others open
                log.exception("agent %s: aclose failed", agent.name)

    def route(self, call: dict[str, Any]) -> Agent | None:
        """The agent mapped to the call's Retell ``agent_id``, if any."""
        name = self.by_retell_agent_id.get(str(call.get("agent_id", "")))
        return self.agents[name] if name else None
