"""Scenario suites for an agent: ``callray test`` (see docs/testing.md)."""
