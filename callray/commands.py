"""What a background actor, a webhook or another replica may ask of a live call.

Commands travel in-process or, between gateway replicas, through Redis (see
``callray/directory.py``), so they are a small validated model rather than loose dicts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CallCommand(BaseModel):
    """One command to the activation that holds a call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["transfer", "say", "end_call", "ended", "superseded", "release"] = Field(
        description="transfer / say / end_call: speak ``line`` now (agent_interrupt), then act. "
        "ended: Retell reported the call over (webhook). superseded: a newer activation holds the call. "
        "release: a new socket of the call is activating elsewhere; save the call and let it go.")
    line: str = Field(default="", description="What the agent says (transfer, say, end_call).")
    number: str = Field(default="", description="transfer: where to (E.164).")
    reason: str = Field(default="", description="ended: Retell's disconnection reason.")
    call: dict[str, Any] = Field(default_factory=dict, description="ended: Retell's call object.")
    epoch: int = Field(default=0, ge=0, description="superseded: the owner epoch that took the call over.")

    @model_validator(mode="after")
    def _transfer_has_a_number(self) -> CallCommand:
        if self.kind == "transfer" and not self.number:
            raise ValueError("a transfer command needs a number")
        return self
