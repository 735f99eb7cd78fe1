"""Escalation: watch each call's turns and hand the caller to a human when a rule fires.

On a hit the consumer (1) sends a transfer command to the live call through an injected
callable, (2) records the call's one escalation (in Redis when a client is given, so
duplicates, restarts and several consumers do not escalate it again) and (3) POSTs a signed
JSON notification. It acts before it records, so a consumer that dies half-way leaves the turn
unacknowledged and the escalation happens on redelivery; acting twice is harmless, because a
call already being transferred to the number ignores the second command. If the command fails,
or reaches no live socket, an error is raised so the bus redelivers the turn (a turn that keeps
failing ends in the dead-letter stream, counted); ``escalation.performed`` is emitted only for a
transfer that happened. A failed notification is only logged (the caller was transferred).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import httpx
import redis.asyncio as aioredis
from cachetools import FIFOCache, LRUCache

from callray.agents.base import normalise
from callray.commands import CallCommand, TransferCall
from callray.consumers import PerEvent, SeenEvents
from callray.events import (
    ESCALATION_SEQ_BASE,
    CallEnded,
    CallTurn,
    EscalationPerformed,
    EscalationRequested,
    Event,
)
from callray.settings import EscalationRules
from callray.webhook import sign

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Callray-Signature"
_IGNORED_CALLER_TEXT = {"", "unintelligible audio"}

#: ``command(call_id, command)``: True when the call's live socket got it.
Command = Callable[[str, CallCommand], Awaitable[bool]]
Emit = Callable[[Event], None]


class EscalationConfigError(ValueError):
    """The escalation rules cannot work as configured (names the field)."""


class EscalationUndelivered(RuntimeError):
    """The transfer reached no live socket of the call; the turn is redelivered to retry."""


def _phrase_hit(text: str, phrases: list[str]) -> str | None:
    padded = f" {text} "
    for phrase in phrases:
        norm = normalise(phrase)
        if norm and f" {norm} " in padded:
            return phrase
    return None


@dataclass
class _CallWatch:
    caller_lines: deque[str]
    fallback_streak: int = 0
    repeats: Counter[str] = field(default_factory=Counter)
    counted: tuple[int, int] | None = None  # (epoch, seq) of the last turn counted in


class Escalation(PerEvent):
    """Consumer of ``call.turn`` events; at most one escalation per call."""

    kind = "escalation"

    def __init__(
        self,
        rules: EscalationRules,
        command: Command | None = None,
        *,
        emit: Emit | None = None,
        redis: aioredis.Redis | None = None,
        http: httpx.AsyncClient | None = None,
        max_calls: int = 10_000,
    ):
        self.rules, self.command, self.emit, self.redis = rules, command, emit, redis
        self._secret: str | None = None
        if rules.notify_url and rules.notify_secret_env:
            self._secret = os.environ.get(rules.notify_secret_env)
            if not self._secret:
                raise EscalationConfigError(
                    f"escalation.notify_secret_env: environment variable {rules.notify_secret_env!r} is not set "
                    f"(needed to sign notifications to {rules.notify_url!r}; set notify_secret_env: null to send unsigned)"
                )
        self._http, self._owns_http = http, http is None
        self._seen = SeenEvents(max_calls=max_calls)
        self._calls: LRUCache[str, _CallWatch] = LRUCache(max_calls)
        self._escalated: FIFOCache[str, None] = FIFOCache(max_calls)
        self.counts: Counter[str] = Counter()

    def _watch(self, call_id: str) -> _CallWatch:
        watch = self._calls.get(call_id)
        if watch is None:
            watch = self._calls[call_id] = _CallWatch(deque(maxlen=max(1, self.rules.caller_lines)))
        return watch

    async def handle(self, event: Event) -> None:
        if self._seen.seen(event):
            return
        if isinstance(event, CallEnded):
            self._calls.pop(event.call_id, None)
            self._seen.finalise(event.call_id)
            return
        if isinstance(event, CallTurn) and event.action in ("Transfer", "EndCall"):
            self._escalated[event.call_id] = None  # the agent itself handed over or hung up
        elif isinstance(event, CallTurn) and event.call_id not in self._escalated:
            watch = self._watch(event.call_id)
            hit = self._evaluate(watch, event)
            if hit is not None:
                await self._escalate(event, watch, *hit)
        self._seen.mark(event)

    def _evaluate(self, watch: _CallWatch, turn: CallTurn) -> tuple[str, str] | None:
        """Update the call's counters with this turn (once: a turn redelivered after a failed
        escalation is not counted again); (rule, reason) of the first rule that fires."""
        rules = self.rules
        text = normalise(turn.caller_text)
        if watch.counted != (turn.epoch, turn.seq):
            watch.counted = (turn.epoch, turn.seq)
            if turn.caller_text:
                watch.caller_lines.append(turn.caller_text)
            watch.fallback_streak = watch.fallback_streak + 1 if turn.fallback else 0
            if turn.kind == "response" and text not in _IGNORED_CALLER_TEXT:
                watch.repeats[text] += 1
        if (phrase := _phrase_hit(text, rules.human_phrases)) is not None:
            return "human_phrases", f"caller asked for a human ({phrase!r})"
        if (phrase := _phrase_hit(text, rules.keywords)) is not None:
            return "keywords", f"keyword {phrase!r}"
        if (phrase := _phrase_hit(text, rules.negative_phrases)) is not None:
            return "negative_phrases", f"caller frustrated ({phrase!r})"
        if rules.max_fallback_turns and watch.fallback_streak >= rules.max_fallback_turns:
            return "max_fallback_turns", f"{watch.fallback_streak} fallback turns in a row"
        if rules.repeated_question and text in watch.repeats and watch.repeats[text] >= rules.repeated_question:
            return "repeated_question", f"caller said {turn.caller_text!r} {watch.repeats[text]} times"
        return None

    def _key(self, call_id: str) -> str:
        return f"callray:escalated:{call_id}"

    async def _recorded(self, call_id: str) -> bool:
        """Whether the call was escalated already (by this consumer, a previous life or another)."""
        if call_id in self._escalated:
            return True
        return self.redis is not None and bool(await self.redis.exists(self._key(call_id)))

    async def _record(self, call_id: str) -> None:
        if self.redis is not None:
            await self.redis.set(self._key(call_id), b"1", ex=self.rules.claim_ttl_s)
        self._escalated[call_id] = None

    async def _escalate(self, turn: CallTurn, watch: _CallWatch, rule: str, reason: str) -> None:
        """Act, then record: nothing is claimed before the transfer, so a consumer that dies
        half-way leaves the turn to be redelivered and acted on. Acting twice is harmless: a call
        already being transferred to the number ignores the second command."""
        if await self._recorded(turn.call_id):
            self._escalated[turn.call_id] = None
            return
        self._emit(EscalationRequested(call_id=turn.call_id, seq=ESCALATION_SEQ_BASE, agent=turn.agent, rule=rule,
                                       reason=reason))
        number = self.rules.transfer_number
        if number and self.command is not None:
            try:
                delivered = await self.command(turn.call_id, TransferCall(number=number,
                                                                          line=self.rules.handoff_line))
            except Exception:
                self.counts["command_failed"] += 1
                raise
            if not delivered:
                self.counts["command_undelivered"] += 1
                raise EscalationUndelivered(f"call {turn.call_id}: no live socket took the transfer ({rule})")
        await self._record(turn.call_id)
        self.counts["escalated"] += 1
        self.counts[f"rule:{rule}"] += 1
        await self._notify(turn, watch, rule, reason)
        self._emit(EscalationPerformed(call_id=turn.call_id, seq=ESCALATION_SEQ_BASE + 1, agent=turn.agent, rule=rule,
                                       transfer_number=number or ""))

    def _emit(self, event: Event) -> None:
        if self.emit is not None:
            self.emit(event)

    async def _notify(self, turn: CallTurn, watch: _CallWatch, rule: str, reason: str) -> None:
        if not self.rules.notify_url:
            return
        summary = {
            "call_id": turn.call_id,
            "agent": turn.agent,
            "rule": rule,
            "reason": reason,
            "response_id": turn.response_id,
            "transfer_number": self.rules.transfer_number,
            "caller_lines": list(watch.caller_lines)[-self.rules.caller_lines:] if self.rules.caller_lines else [],
            "ts": time.time(),
        }
        body = json.dumps(summary, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(body, self._secret)
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.rules.notify_timeout_s)
        try:
            response = await self._http.post(self.rules.notify_url, content=body, headers=headers)
            response.raise_for_status()
            self.counts["notified"] += 1
        except httpx.HTTPError as exc:
            self.counts["notify_failed"] += 1
            log.warning("escalation of call %s: notification to %s failed: %r", turn.call_id, self.rules.notify_url, exc)

    async def close(self) -> None:
        if self._http is not None and self._owns_http:
            await self._http.aclose()
        self._http = None
