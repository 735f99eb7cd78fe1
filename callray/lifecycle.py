"""A life as an explicit state machine: its transitions declared, an illegal one raising (as
Starlette's WebSocket does), so a socket or a call can never drift into a state nobody meant."""

from __future__ import annotations

import enum
from typing import Generic, Mapping, TypeVar

S = TypeVar("S", bound=enum.Enum)


class IllegalTransition(RuntimeError):
    """Something was asked to move to a state it cannot reach from its current one."""


class Lifecycle(Generic[S]):
    """The current state of ``what`` and the transitions allowed from each state."""

    def __init__(self, what: str, initial: S, transitions: Mapping[S, frozenset[S]]):
        self.what, self.state, self._transitions = what, initial, transitions

    def move(self, new: S) -> None:
        if new not in self._transitions[self.state]:
            raise IllegalTransition(f"{self.what} cannot go from {self.state.value} to {new.value}")
        self.state = new
