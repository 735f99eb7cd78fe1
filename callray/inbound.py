"""Retell's inbound call webhook: who answers an incoming call, and with what variables.

While the phone rings Retell POSTs ``{"event": "call_inbound", "call_inbound": {"agent_id",
"from_number", "to_number"}}`` and waits (10 s, three retries; then it drops the call with
``error_inbound_webhook``). callray answers from a table keyed by the dialled number and, over
it, a Python hook; a hook that raises, returns something unusable or is slower than
``inbound.timeout_s`` is logged and the call rings on with the table's answer (or none), never
an error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from callray.agents.python import ImportPathError, call_user_code, import_object
from callray.env import SettingsError, describe_validation
from callray.settings import InboundAnswer, InboundSettings

log = logging.getLogger("callray.inbound")


class InboundCalls:
    """Answers ``call_inbound`` webhooks (see the module docstring)."""

    def __init__(self, settings: InboundSettings):
        self.settings = settings
        self.hook: Callable[..., Any] | None = None
        if settings.hook:
            try:
                self.hook = import_object(settings.hook, Path.cwd())
            except ImportPathError as exc:
                raise SettingsError(f"inbound.hook: {exc}") from None
            if not callable(self.hook):
                raise SettingsError(f"inbound.hook: {settings.hook} is not callable")

    async def answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The ``call_inbound`` object of the reply: the table's entry for the dialled number,
        with what the hook returns laid over it."""
        answer = self.settings.numbers.get(str(payload.get("to_number") or ""), InboundAnswer())
        if self.hook is not None:
            answer = await self._ask_hook(payload, answer)
        return answer.model_dump(exclude_none=True, exclude_defaults=True)

    async def _ask_hook(self, payload: dict[str, Any], answer: InboundAnswer) -> InboundAnswer:
        number = str(payload.get("from_number") or "")
        try:
            result = await call_user_code(self.hook, payload, timeout_s=self.settings.timeout_s)
            if result is None:
                return answer
            if isinstance(result, BaseModel):
                result = result.model_dump(exclude_unset=True)
            return answer.model_copy(update=InboundAnswer.model_validate(result).model_dump(exclude_unset=True))
        except TimeoutError:
            log.error("inbound hook gave no answer within %s s (caller %s): ringing on without it",
                      self.settings.timeout_s, number)
        except ValidationError as exc:
            log.error("inbound hook returned an unusable answer (caller %s): %s", number,
                      "; ".join(describe_validation(exc)))
        except Exception as exc:
            log.error("inbound hook failed (caller %s): ringing on without it", number, exc_info=exc)
        return answer
