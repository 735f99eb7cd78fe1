"""The three stores behind every architecture: call state, response cache, event sink.

Each is a small interface with an in-memory backend (``memory.py``; for events ``bus.py``'s
``MemoryBus``: the single-server architecture) and a Redis backend (``redis.py``; for events
``bus.py``'s ``RedisStreamBus``: the distributed and event-driven ones).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, Union, runtime_checkable

from pydantic import BaseModel, Field

from callray.events import Event


class StaleStateError(RuntimeError):
    """A save lost the optimistic-concurrency race: a newer version of the call is stored."""

    def __init__(self, call_id: str, expected: int, found: int | None):
        super().__init__(f"call {call_id}: state version {expected} is stale (store has {found})")
        self.call_id, self.expected, self.found = call_id, expected, found


class CallFencedError(StaleStateError):
    """A save from an activation that lost the call: a newer socket activated it elsewhere
    (a higher owner epoch is stored). The writer must drop the call without writing."""

    def __init__(self, call_id: str, epoch: int, found: int):
        RuntimeError.__init__(self, f"call {call_id}: owner epoch {epoch} was fenced off by epoch {found}")
        self.call_id, self.expected, self.found, self.epoch = call_id, epoch, found, epoch


class StoreUnavailableError(RuntimeError):
    """The backend cannot be reached (e.g. Redis is down). Callers retry later."""


class TurnRecord(BaseModel):
    """One answered request: what the caller said and what the agent said back."""

    response_id: int
    kind: str = "response"
    user: str = ""
    agent: str = ""
    at: float = Field(default_factory=time.time)


class PendingEndCall(BaseModel):
    """The agent hung up on this call's last turn."""

    type: Literal["EndCall"] = "EndCall"


class PendingTransfer(BaseModel):
    """A transfer is under way (the agent's, or an escalation's: acting twice says nothing twice)."""

    type: Literal["Transfer"] = "Transfer"
    number: str
    show_transferee_as_caller: bool | None = None


class PendingDigit(BaseModel):
    """The agent pressed a key on this call's last turn."""

    type: Literal["PressDigit"] = "PressDigit"
    digit: str


#: The action a call's last turn took, kept with its state ("type" tells which, as stored).
PendingAction = Annotated[Union[PendingEndCall, PendingTransfer, PendingDigit], Field(discriminator="type")]


class CallState(BaseModel):
    """Everything about one call that must survive a restart, keyed by ``call_id``."""

    call_id: str
    agent: str = ""
    version: int = Field(default=0, description="Store-managed; 0 means never saved.")
    epoch: int = Field(default=0, description="Store-managed owner epoch of the activation holding this state; "
                                              "a save under an older epoch than the stored one is refused.")
    greeted: bool = Field(default=False, description="Response 0 has been delivered once.")
    latest_response_id: int = 0
    turns: list[TurnRecord] = Field(default_factory=list)
    agent_state: dict[str, Any] = Field(default_factory=dict)
    tool_results: dict[str, Any] = Field(default_factory=dict, description="Idempotency key -> result.")
    pending_action: PendingAction | None = Field(default=None, description="The action the last turn took.")
    call: dict[str, Any] = Field(default_factory=dict, description="Retell's call object.")
    ended: bool = False
    event_seq: int = Field(default=0, description="Sequence number of the last event this call emitted.")
    interrupt_id: int = Field(default=0, description="The server's agent_interrupt counter.")
    updated_at: float = Field(default_factory=time.time)


@dataclass(frozen=True)
class Claim:
    """The outcome of activating a call: its state (None if never saved), the owner epoch this
    activation holds, and the owner that held the call before (None if nobody). Epoch 0: not
    claimed, because ``previous_owner`` holds it (``claim(..., unless_held=True)``)."""

    state: CallState | None
    epoch: int
    previous_owner: str | None


@runtime_checkable
class StateStore(Protocol):
    async def load(self, call_id: str) -> CallState | None:
        """The stored state, or None for a call never saved (or expired)."""

    async def claim(self, call_id: str, owner: str, *, unless_held: bool = False) -> Claim:
        """Activate: bump the call's owner epoch, record ``owner``, return the stored state
        (with ``epoch`` set to the new epoch). Every later save under an older epoch fails.
        ``unless_held``: when another owner is recorded, claim nothing and return it (epoch 0),
        so it can be asked to let go first; a new call is claimed in the same round trip."""

    async def owner(self, call_id: str) -> tuple[str, int] | None:
        """Who holds the call now: (owner, epoch), or None if no activation ever claimed it."""

    #: Whether ``save`` writes a call's events to the event stream together with its state
    #: (a transactional outbox: both land or neither).
    carries_events: bool

    async def save(self, state: CallState, events: list[Event] | None = None) -> int:
        """Compare-and-set on ``state.version`` and ``state.epoch``: store it as version + 1,
        set ``state.version`` to the new version and return it. Raises CallFencedError when a
        newer epoch holds the call, StaleStateError when the store holds another version,
        StoreUnavailableError when the backend is down.

        ``events`` (a store that ``carries_events``): the owner's list of the call's events not
        yet written, in ``seq`` order. The write writes them with the state and removes them from
        the list, then or when a deferred write lands; one written before is not written again."""

    async def delete(self, call_id: str) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class ResponseCache(Protocol):
    async def get(self, agent: str, version: str, key: str) -> list[str] | None:
        """The cached phrases of an answer, or None. Counts a hit or a miss for ``agent``."""

    async def put(self, agent: str, version: str, key: str, phrases: list[str], call_id: str | None = None) -> None:
        """Store an answer; ``call_id`` (the call whose turn produced it) lets erasure find it."""

    async def erase_call(self, call_id: str) -> int:
        """Delete the answers ``call_id`` wrote; how many."""

    def stats(self) -> dict[str, dict[str, int]]:
        """``{agent: {"hits": n, "misses": n}}`` as counted by this process."""

    async def close(self) -> None: ...


@runtime_checkable
class EventSink(Protocol):
    def emit(self, event: Event) -> None:
        """Hand an event to the bus. Never blocks and never raises: the turn must not wait."""
