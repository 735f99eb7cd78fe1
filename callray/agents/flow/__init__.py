"""The flow agent: a receptionist defined in YAML (``agent.py``), its file's models
(``config.py``) and how it matches what callers say (``matching.py``)."""

from callray.agents.config import AgentConfigError
from callray.agents.flow.agent import FlowAgent, load_flow_agent
from callray.agents.flow.config import (
    EscalationConfig,
    FlowAgentConfig,
    GoodbyeConfig,
    IntentConfig,
    SlotConfig,
    SlotValue,
)

__all__ = [
    "AgentConfigError",
    "EscalationConfig",
    "FlowAgent",
    "FlowAgentConfig",
    "GoodbyeConfig",
    "IntentConfig",
    "SlotConfig",
    "SlotValue",
    "load_flow_agent",
]
