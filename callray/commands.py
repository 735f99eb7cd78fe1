"""What a background actor, a webhook or another process may ask of a live call.

Commands travel in-process or, between processes, through Redis as JSON (see
``callray/directory.py``), so each is a small validated model, told apart by ``kind``
(:data:`CallCommand`, a discriminated union; :func:`parse_command` reads one back).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Say(_Command):
    """Speak ``line`` now (an ``agent_interrupt``), cancelling any answer in flight."""

    kind: Literal["say"] = "say"
    line: str = Field(description="What the agent says.")


class HangUp(_Command):
    """Speak ``line`` now, then end the call."""

    kind: Literal["end_call"] = "end_call"
    line: str = Field(default="", description="What the agent says before hanging up.")


class TransferCall(_Command):
    """Speak ``line`` now, then transfer the call to ``number``."""

    kind: Literal["transfer"] = "transfer"
    number: str = Field(min_length=1, description="Where to (E.164).")
    line: str = Field(default="", description="What the agent says before the transfer.")


class Ended(_Command):
    """Retell reported the call over (its webhook): record it; deactivate a call without a socket."""

    kind: Literal["ended"] = "ended"
    reason: str = Field(default="", description="Retell's disconnection reason.")
    call: dict[str, Any] = Field(default_factory=dict, description="Retell's call object.")


class Superseded(_Command):
    """A newer activation holds the call (under owner ``epoch``): this one is lost."""

    kind: Literal["superseded"] = "superseded"
    epoch: int = Field(ge=0, description="The owner epoch that took the call over.")


class Release(_Command):
    """A new socket of the call is activating elsewhere: save the call and let it go."""

    kind: Literal["release"] = "release"


CallCommand = Annotated[Union[Say, HangUp, TransferCall, Ended, Superseded, Release], Field(discriminator="kind")]
_COMMANDS: TypeAdapter[CallCommand] = TypeAdapter(CallCommand)


def parse_command(data: Any) -> CallCommand:
    """A command from its JSON form (raises pydantic's ValidationError naming the bad field)."""
    return _COMMANDS.validate_python(data)
