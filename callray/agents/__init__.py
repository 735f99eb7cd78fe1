"""Agents: the flow agent (YAML, no network) and the OpenAI-compatible LLM agent."""
