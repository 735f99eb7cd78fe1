"""Retell's side of the custom-LLM WebSocket, as a load and conformance tool.

Each simulated call opens ``{url}/{call_id}`` on a :class:`~callray.sim.client.RetellSocket`
(which judges every frame against Retell's protocol reference, answers ``config`` with
``call_details`` and pings every 2 s when asked to), waits for response 0 and plays caller
turns: early requests superseded by later ones, reminders, ``update_only`` frames, abrupt TCP
drops followed by a reconnect with the same call_id. It measures time to first chunk, first
sentence and completion, and counts every protocol violation by kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import multiprocessing
import queue as queue_mod
import random
import re
import secrets
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from websockets.exceptions import WebSocketException

from callray.sim.client import WARNING_KINDS, RetellSocket, call_url
from callray.sim.report import COUNT_KEYS, CallSample, SimResult, TurnSample

#: progress(calls_done, turns_answered), cumulative, called from the event loop.
ProgressFn = Callable[[int, int], None]
#: Progress is reported at most this often, and once more when the run ends. A report per turn
#: cost a forked simulator process a pickle, a queue put and a feeder-thread wake-up each, and
#: its parent a thread hop: a CPU second per 1000-call level, on the cores the server under test
#: shares.
PROGRESS_INTERVAL_S = 0.25

_SENTENCE_END = re.compile(r"[.!?]")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_SYLLABLES = ("ba", "de", "fi", "go", "ka", "le", "mi", "no", "pa", "re", "si", "to", "va", "ze", "lu", "ro")
#: Caller name tokens are pronounceable surnames ending in "quist", unique per call index.
_TOKEN_RE = re.compile(r"\b[A-Z][a-z]*quist\b")
_FIRST_NAMES = ("Dana", "Luis", "Priya", "Tom", "Mei", "Sam", "Olga", "Ken", "Ana", "Joe", "Rita", "Omar")

DEFAULT_CALLER_LINES = (
    "Hi, this is {name}, I'd like to book a check-up for next week.",
    "My name is {name} and I need to move my appointment on Thursday.",
    "Hello, {name} here. Do you have anything open on Friday morning?",
    "Yes, it's {name}, date of birth March third, nineteen eighty-two.",
    "Could you tell me if Doctor Patel takes new patients? This is {name}.",
    "I'm calling for my son, the account is under {name}.",
    "It's {name} again, sorry, I got cut off. Is the clinic open on Saturday?",
    "Um, I think I have a fever and a sore throat, this is {name}.",
    "Can I get a refill on my blood pressure prescription? The name is {name}.",
    "Okay great, thanks. And {name} is spelled the usual way.",
    "What's the address of the clinic? I'm {name}, a new patient.",
    "That works for me, please put it under {name}.",
)

def caller_token(index: int) -> str:
    """A pronounceable surname unique to call ``index`` (e.g. ``Babadequist``)."""
    digits = []
    while index or len(digits) < 3:
        index, d = divmod(index, len(_SYLLABLES))
        digits.append(_SYLLABLES[d])
    return "".join(reversed(digits)).capitalize() + "quist"


class SimConfig(BaseModel):
    """One simulation run: how many calls, how they behave, what counts as too slow."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Base LLM WebSocket URL, e.g. ws://127.0.0.1:8000/llm-websocket; "
                                 "'/{call_id}' is appended (before any query string), as Retell does.")
    calls: int = Field(10, ge=1, description="Number of calls to place.")
    turns: int = Field(3, ge=0, description="Caller turns per call (after the greeting).")
    concurrency: int | None = Field(None, ge=1, description="At most this many calls open at once (default: no limit).")
    ramp_s: float = Field(0.0, ge=0, description="Call starts are spread evenly over this many seconds.")
    think_s: float = Field(0.5, ge=0, description="Mean seconds the caller talks before each turn's request "
                                                   "(each pause is uniform in 0.5x..1.5x).")
    supersede_rate: float = Field(0.0, ge=0, le=1, description="Share of turns asked early (half the line), then "
                                                               "superseded by a higher id with the whole line.")
    supersede_gap_s: float = Field(0.1, ge=0, description="Mean seconds between the early request and the superseding one.")
    reminder_rate: float = Field(0.0, ge=0, le=1, description="Share of turns where the caller stays silent and "
                                                              "reminder_required is sent instead of a user line.")
    update_only: bool = Field(True, description="Send an update_only frame (partial transcript) while the caller talks.")
    ping_interval_s: float = Field(2.0, ge=0, description="Send ping_pong this often once config asks for "
                                                          "auto_reconnect, as Retell does (0: never).")
    ping_timeout_s: float = Field(5.0, gt=0, description="A ping not echoed within this many seconds is a violation.")
    reconnect_rate: float = Field(0.0, ge=0, le=1, description="Share of calls that drop the TCP socket without a close "
                                                               "frame right after one request and reconnect with "
                                                               "the same call_id, then ask again.")
    drop_reconnects: int = Field(0, ge=0, description="After the server drops a socket abnormally (1006: the TCP "
                                                      "connection gone without a close frame), reconnect with the "
                                                      "same call_id and ask the open request again, up to this many "
                                                      "times per call, as Retell does (Retell: 4; 0: the call is "
                                                      "dropped).")
    duration_s: float | None = Field(None, gt=0, description="Stop placing calls and starting turns after this many "
                                                             "seconds (a soak): calls in progress finish their turn "
                                                             "and hang up; calls never placed are not counted.")
    turn_timeout_s: float = Field(10.0, gt=0, description="A request without content_complete: true after this "
                                                          "many seconds is a violation (no_complete).")
    connect_timeout_s: float = Field(7.0, gt=0, description="Seconds to wait for the WebSocket handshake (Retell: 7).")
    connect_attempts: int = Field(3, ge=1, description="Attempts to open a socket before the call counts as dropped (Retell: 3).")
    connect_retry_s: float = Field(3.0, ge=0, description="Pause between connect attempts (Retell: 3 s).")
    caller_lines: list[str] = Field(default_factory=lambda: list(DEFAULT_CALLER_LINES),
                                    description="What callers say, picked at random; '{name}' becomes the call's "
                                                "unique caller name.")
    expect_echo: bool = Field(False, description="The agent repeats the caller's name: check each answer holds its "
                                                 "own call's name token and no other call's (cross-talk).")
    include_words: bool = Field(True, description="Add word timings to transcript entries, as Retell does.")
    holding_phrases: list[str] = Field(default_factory=list, description="What the server says to hold the line "
                                       "(e.g. callray's turns.holding_phrases): a chunk that is one of them, before "
                                       "any other content, is timed as holding_ms, not as the answer's first chunk "
                                       "or first sentence.")
    webhook_url: str | None = Field(None, description="After each call, POST Retell's signed call_ended webhook here "
                                                      "(e.g. http://host:8000/webhook), as Retell does.")
    webhook_key: str | None = Field(None, description="The key that signs it (the server's webhook.api_key).")
    call_id_prefix: str = Field("sim", description="Call ids are '{prefix}-{run_id}-{index}'.")
    run_id: str | None = Field(None, description="Tag making call ids unique per run (default: random).")
    seed: int | None = Field(None, description="Seed for the callers' choices (default: random).")
    processes: int = Field(1, ge=1, description="Split the calls across this many processes and merge the results.")
    lag_threshold_ms: float = Field(20.0, gt=0, description="Event-loop lag p99 above this marks the simulator "
                                                            "itself as the bottleneck.")

    @field_validator("url")
    @classmethod
    def _ws_url(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("ws", "wss"):
            raise ValueError(f"url must start with ws:// or wss://, got {v!r}")
        return v

    @model_validator(mode="after")
    def _lines(self) -> "SimConfig":
        if not self.caller_lines or not all(line.strip() for line in self.caller_lines):
            raise ValueError("caller_lines must be non-empty lines")
        if self.expect_echo and any("{name}" not in line for line in self.caller_lines):
            raise ValueError("expect_echo needs '{name}' in every caller line")
        return self


def _utterance(role: str, text: str, words: bool) -> dict[str, Any]:
    """A transcript entry; with ``words``, fake per-word timings as Retell's ASR adds them."""
    entry: dict[str, Any] = {"role": role, "content": text}
    if words:
        entry["words"] = [
            {"word": w, "start": round(0.3 * i, 2), "end": round(0.3 * i + 0.25, 2)}
            for i, w in enumerate(text.split())
        ]
    return entry


@dataclass
class _Request:
    """One response_id as Retell tracks it."""

    rid: int
    kind: str
    sent_at: float
    status: str = "open"  # open | complete | superseded | abandoned | timed_out
    parts: list[str] = field(default_factory=list)
    holding_at: float | None = None
    first_chunk_at: float | None = None
    first_sentence_at: float | None = None
    complete_at: float | None = None
    completes: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def content(self) -> str:
        return "".join(self.parts)


class _Socket(RetellSocket):
    """One WebSocket of a call, with what the simulator tracks on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.newest_rid = -1
        self.lost = False  # the server dropped it and the call may reconnect (drop_reconnects)
        self.regreeted = False


class SimObserver:
    """Hooks into an in-process run (``processes=1``), for harnesses that watch it live:
    override what you need."""

    def run_started(self, recorder: Recorder) -> None:
        """The run's recorder, whose counters and samples grow while it runs."""

    def socket_opened(self, call_id: str, at: float, reconnect: bool, ok: bool) -> None:
        """A (re)connect that started at unix time ``at`` finished; ``ok`` if a socket opened."""


class Recorder:
    """Counters and samples of one process's run."""

    def __init__(self, config: SimConfig, progress: ProgressFn | None, observer: SimObserver | None = None) -> None:
        self.config = config
        self.progress = progress
        self.observer = observer or SimObserver()
        self.t0 = time.monotonic()
        self.started_at = time.time()
        self.counts: Counter[str] = Counter()
        self.violations: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.dropped: Counter[str] = Counter()
        self.calls: list[CallSample] = []
        self.turns: list[TurnSample] = []
        self.reconnect_ms: list[float] = []
        self.loop_lag_ms: list[float] = []
        self.deadline = self.t0 + config.duration_s if config.duration_s else None
        self._next_progress = self.t0

    def past_deadline(self) -> bool:
        """True once ``duration_s`` has passed: no new call, no new turn."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def issue(self, kind: str, call_id: str, detail: str) -> None:
        (self.warnings if kind in WARNING_KINDS else self.violations)[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 3:
            ex.append(f"{call_id}: {detail}")

    def tick(self, final: bool = False) -> None:
        """Report progress if PROGRESS_INTERVAL_S has passed since the last report (``final``: now)."""
        if self.progress is None:
            return
        now = time.monotonic()
        if final or now >= self._next_progress:
            self._next_progress = now + PROGRESS_INTERVAL_S
            self.progress(len(self.calls), self.counts["turns_answered"])

    def result(self) -> SimResult:
        return SimResult(
            config=self.config.model_dump(mode="json"),
            started_at=self.started_at,
            duration_s=time.monotonic() - self.t0,
            calls=self.calls,
            turns=self.turns,
            reconnect_ms=self.reconnect_ms,
            counts={**{k: 0 for k in COUNT_KEYS}, **self.counts},
            violations=dict(self.violations),
            warnings=dict(self.warnings),
            examples=self.examples,
            dropped=dict(self.dropped),
            loop_lag_ms=self.loop_lag_ms,
            lag_threshold_ms=self.config.lag_threshold_ms,
        )


class _Call:
    """One simulated phone call: Retell's state for it across its sockets."""

    def __init__(self, cfg: SimConfig, index: int, rec: Recorder) -> None:
        self.cfg = cfg
        self.index = index
        self.rec = rec
        self.call_id = f"{cfg.call_id_prefix}-{cfg.run_id}-{index}"
        self.url = call_url(cfg.url, self.call_id)
        self.rng = random.Random(f"{cfg.seed}:{index}") if cfg.seed is not None else random.Random()
        self.token = caller_token(index)
        self.holding = frozenset(p.strip() for p in cfg.holding_phrases)
        self.name = f"{self.rng.choice(_FIRST_NAMES)} {self.token}"
        self.transcript: list[dict[str, Any]] = []
        self.requests: dict[int, _Request] = {}
        self.next_id = 1
        self.sock: _Socket | None = None
        self.end_call = False
        self.dropped: str | None = None
        self.reconnects = 0
        self.drop_recoveries = 0
        self.answered = 0
        self.loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ flow

    async def run(self) -> None:
        t_open = self.loop.time()
        setup_ms = None
        sock = await self._open()
        if sock is None:
            self._drop("connect_failed")
        else:
            begin, answered = await self._wait_answer(self.requests[0], None)
            if answered:
                setup_ms = (begin.complete_at - t_open) * 1000
                self._check_tokens(begin.content, expect_own=False)
                if begin.content:
                    self.transcript.append(_utterance("agent", begin.content, self.cfg.include_words))
            elif not self.dropped:
                self._issue("no_complete", "response 0 (the begin message)")
                begin.status = "timed_out"
            reconnect_turn = None
            if self.cfg.turns and self.rng.random() < self.cfg.reconnect_rate:
                reconnect_turn = self.rng.randrange(self.cfg.turns)
            for turn in range(self.cfg.turns):
                if self.dropped or self.end_call or self.rec.past_deadline():
                    break
                await self._turn(turn, reconnect=turn == reconnect_turn)
            await self._close()
        ended = f"dropped:{self.dropped}" if self.dropped else ("end_call" if self.end_call else "completed")
        if self.cfg.webhook_url and sock is not None:
            await self._call_ended(t_open)
        if not self.dropped:
            self.rec.counts["calls_completed"] += 1
        self.rec.calls.append(CallSample(
            call=self.index, call_id=self.call_id, t_s=round(t_open - self.rec.t0, 4), setup_ms=setup_ms,
            turns_answered=self.answered, reconnects=self.reconnects, ended=ended))
        self.rec.tick()

    async def _turn(self, turn: int, reconnect: bool) -> None:
        cfg, rng = self.cfg, self.rng
        line = rng.choice(cfg.caller_lines).replace("{name}", self.name)
        words = line.split()
        partial = " ".join(words[: max(1, len(words) // 2)])
        await self._speak(partial)
        self.rec.counts["turns_sent"] += 1
        if rng.random() < cfg.reminder_rate:
            kind, transcript = "reminder_required", list(self.transcript)
            self.rec.counts["reminders"] += 1
        else:
            kind = "response_required"
            user = _utterance("user", line, cfg.include_words)
            if rng.random() < cfg.supersede_rate:
                await self._request(kind, self.transcript + [_utterance("user", partial, cfg.include_words)])
                await asyncio.sleep(cfg.supersede_gap_s * rng.uniform(0.5, 1.5))
                self.rec.counts["superseded"] += 1
            self.transcript.append(user)
            transcript = list(self.transcript)
        if self.dropped:
            return
        req = await self._request(kind, transcript)
        if reconnect:
            if not await self._reconnect():
                return
            req = await self._request(kind, transcript)
        req, answered = await self._wait_answer(req, lambda: self._request(kind, transcript))
        if not answered:
            if not self.dropped:
                req.status = "timed_out"
                self._issue("no_complete", f"response_id {req.rid} ({kind}) after {cfg.turn_timeout_s} s")
            return
        self.answered += 1
        self.rec.counts["turns_answered"] += 1
        self.rec.turns.append(TurnSample(
            call=self.index, turn=turn, response_id=req.rid, kind=kind,
            t_s=round(req.sent_at - self.rec.t0, 4),
            holding_ms=None if req.holding_at is None else round((req.holding_at - req.sent_at) * 1000, 3),
            first_chunk_ms=None if req.first_chunk_at is None else round((req.first_chunk_at - req.sent_at) * 1000, 3),
            first_sentence_ms=round((req.first_sentence_at - req.sent_at) * 1000, 3),
            complete_ms=round((req.complete_at - req.sent_at) * 1000, 3)))
        self._check_tokens(req.content, expect_own=kind == "response_required")
        if req.content:
            self.transcript.append(_utterance("agent", req.content, cfg.include_words))
        self.rec.tick()

    async def _speak(self, partial: str) -> None:
        """The caller talks for a while; Retell streams the partial transcript meanwhile."""
        pause = self.cfg.think_s * self.rng.uniform(0.5, 1.5)
        if not self.cfg.update_only:
            await asyncio.sleep(pause)
            return
        await asyncio.sleep(pause / 2)
        await self._send({
            "interaction_type": "update_only",
            "transcript": self.transcript + [_utterance("user", partial, self.cfg.include_words)],
            "turntaking": "user_turn",
        })
        self.rec.counts["update_only_sent"] += 1
        await asyncio.sleep(pause / 2)

    async def _request(self, kind: str, transcript: list[dict[str, Any]]) -> _Request:
        """Send the next response_id; older open ids are superseded (Retell drops their content)."""
        rid = self.next_id
        self.next_id += 1
        for older in self.requests.values():
            if older.status == "open":
                older.status = "superseded"
        req = _Request(rid, kind, sent_at=self.loop.time())
        self.requests[rid] = req
        await self._send({"interaction_type": kind, "response_id": rid, "transcript": transcript})
        self.rec.counts["requests_sent"] += 1
        return req

    async def _reconnect(self) -> bool:
        """Drop the TCP connection without a close frame, then open a new socket for the call."""
        assert self.sock is not None
        await self.sock.abort()
        return await self._reopen()

    async def _reopen(self) -> bool:
        """Open a new socket for the call; requests still open on the old one are abandoned."""
        for req in self.requests.values():
            if req.status == "open":
                req.status = "abandoned"
        self.reconnects += 1
        self.rec.counts["reconnects"] += 1
        sock = await self._open(reconnect=True)
        if sock is None:
            self._drop("reconnect_failed")
            return False
        if await self._wait(sock.first_frame, sock):
            self.rec.reconnect_ms.append(round((self.loop.time() - sock.opened_at) * 1000, 3))
        elif not self.dropped and not sock.lost:
            self._issue("reconnect_silent", f"nothing within {self.cfg.turn_timeout_s} s")
        return not self.dropped

    async def _wait_answer(self, req: _Request,
                           again: Callable[[], Awaitable[_Request]] | None) -> tuple[_Request, bool]:
        """``_wait`` for ``req``; when the server dropped the socket (``drop_reconnects``), reconnect
        and ask again (``again``; None: wait for the new socket's response 0). Returns the request
        last asked and whether it completed."""
        while True:
            sock = self.sock
            assert sock is not None
            if await self._wait(req, sock):
                return req, True
            if not sock.lost or self.dropped:
                return req, False
            self.drop_recoveries += 1
            self.rec.counts["drop_reconnects"] += 1
            if not await self._reopen():
                return req, False
            req = await again() if again else self.requests[0]

    async def _close(self) -> None:
        if self.sock is not None:
            await self.sock.close(1000)

    async def _call_ended(self, t_open: float) -> None:
        """Retell's ``call_ended`` webhook for this call, signed with ``webhook_key``."""
        import httpx

        from callray.webhook import SIGNATURE_HEADER, sign

        now_ms = int(time.time() * 1000)
        reason = ("error_llm_websocket_lost_connection" if self.dropped
                  else "agent_hangup" if self.end_call else "user_hangup")
        body = json.dumps({"event": "call_ended", "call": {
            "call_id": self.call_id, "call_status": "ended", "disconnection_reason": reason,
            "start_timestamp": now_ms - int((self.loop.time() - t_open) * 1000), "end_timestamp": now_ms}}).encode()
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.post(self.cfg.webhook_url, content=body, headers={
                    "content-type": "application/json", SIGNATURE_HEADER: sign(body, self.cfg.webhook_key or "")})
            self.rec.counts["webhooks_sent" if response.status_code == 204 else "webhooks_refused"] += 1
        except httpx.HTTPError:
            self.rec.counts["webhooks_failed"] += 1

    # ------------------------------------------------------------------ sockets

    async def _open(self, reconnect: bool = False) -> _Socket | None:
        at = time.time()
        sock = await self._connect(reconnect)
        self.rec.observer.socket_opened(self.call_id, at, reconnect, sock is not None)
        return sock

    async def _connect(self, reconnect: bool) -> _Socket | None:
        for attempt in range(self.cfg.connect_attempts):
            if attempt:
                await asyncio.sleep(self.cfg.connect_retry_s)
            try:
                sock = await _Socket.open(
                    self.url, open_timeout_s=self.cfg.connect_timeout_s, on_frame=self._on_frame,
                    on_issue=self._issue, on_closed=self._on_closed, call_object=self._call_object,
                    ping_interval_s=self.cfg.ping_interval_s, ping_timeout_s=self.cfg.ping_timeout_s,
                    counts=self.rec.counts)
            except (OSError, asyncio.TimeoutError, WebSocketException):
                continue
            # no await since the reader started: it has not run, so response 0 is tracked first
            self.requests[0] = _Request(0, "reconnect" if reconnect else "begin", sent_at=sock.opened_at)
            self.sock = sock
            return sock
        return None

    def _on_closed(self, sock: RetellSocket) -> None:
        if not sock.by_us:
            code = sock.close_code
            if code in (None, 1006) and not self.end_call and self.drop_recoveries < self.cfg.drop_reconnects:
                sock.lost = True  # the call reconnects when it next waits on the socket
            elif not (self.end_call and code == 1000):
                self._drop("connection_lost" if code in (None, 1006) else f"server_close_{code}")

    async def _send(self, payload: dict[str, Any]) -> None:
        if self.sock is not None:
            await self.sock.send(payload)  # a closed socket: its reader records how it ended

    async def _wait(self, what: _Request | asyncio.Event, sock: _Socket) -> bool:
        """Until the request completes (or event is set), the socket closes or the turn timeout passes."""
        event = what.done if isinstance(what, _Request) else what
        if not event.is_set() and not sock.closed.is_set():
            waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(sock.closed.wait())]
            try:
                await asyncio.wait(waiters, timeout=self.cfg.turn_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        return event.is_set()

    # ------------------------------------------------------------------ frames

    def _on_frame(self, sock: RetellSocket, data: dict[str, Any], now: float) -> None:
        rtype = data["response_type"]
        if rtype == "response":
            self._on_response(sock, data, now)
        elif rtype == "agent_interrupt":
            self.rec.counts["agent_interrupts"] += 1
        elif rtype == "tool_call_invocation":
            self.rec.counts["tool_calls"] += 1

    def _on_response(self, sock: _Socket, data: dict[str, Any], now: float) -> None:
        rid, content, complete = data["response_id"], data["content"], data["content_complete"]
        req = self.requests.get(rid)
        if req is None:
            self._issue("unknown_response_id", f"response_id {rid}, latest requested {self.next_id - 1}")
            return
        if rid < sock.newest_rid:
            self._issue("stale_content", f"response_id {rid} after a frame for {sock.newest_rid}")
            return
        sock.newest_rid = rid
        if complete:
            req.completes += 1
            if req.completes > 1:
                self._issue("duplicate_complete", f"response_id {rid}")
                return
        elif req.completes and content:
            self._issue("content_after_complete", f"response_id {rid}: {content[:40]!r}")
            return
        if req.kind == "reconnect" and content and not sock.regreeted:
            sock.regreeted = True
            self._issue("greeting_repeated", f"{content[:60]!r}")
        if req.status != "open":
            return  # superseded, abandoned or timed out: Retell drops it
        if content:
            req.parts.append(content)
            if req.first_chunk_at is None and content.strip() in self.holding:
                self.rec.counts["holding_phrases"] += 1
                req.holding_at = req.holding_at or now
            else:
                if req.first_chunk_at is None:
                    req.first_chunk_at = now
                if req.first_sentence_at is None and _SENTENCE_END.search(content):
                    req.first_sentence_at = now
        if complete:
            req.status = "complete"
            req.complete_at = now
            self._check_repeats(rid, "".join(req.parts))
            if req.first_sentence_at is None:
                req.first_sentence_at = now
            if data.get("end_call") is True:
                self.end_call = True
                self.rec.counts["end_calls"] += 1
            elif data.get("transfer_number"):
                self.rec.counts["transfers"] += 1
            req.done.set()

    def _check_repeats(self, rid: int, text: str) -> None:
        sentences = Counter(s.strip().lower() for s in _SENTENCE_SPLIT.split(text) if len(s.split()) >= 3)
        repeated = next((s for s, n in sentences.items() if n > 1), None)
        if repeated:
            self._issue("sentence_repeated", f"response_id {rid}: {repeated[:60]!r}")

    def _check_tokens(self, content: str, expect_own: bool) -> None:
        if not self.cfg.expect_echo:
            return
        foreign = sorted({t for t in _TOKEN_RE.findall(content) if t != self.token})
        if foreign:
            self._issue("cross_talk", f"answer names {', '.join(foreign)}, caller is {self.token}")
        if expect_own and self.token not in content:
            self._issue("echo_missing", f"{self.token} not in {content[:60]!r}")

    def _call_object(self) -> dict[str, Any]:
        """A call object as in Retell's call_details (protocol §3)."""
        return {
            "call_id": self.call_id, "agent_id": "agent_sim", "agent_version": 1, "call_type": "phone_call",
            "call_status": "ongoing", "direction": "inbound", "from_number": f"+1555{self.index:07d}"[:12],
            "to_number": "+15550100000", "start_timestamp": int(time.time() * 1000), "metadata": {"sim": True},
            "retell_llm_dynamic_variables": {"caller_name": self.name},
        }

    def _issue(self, kind: str, detail: str) -> None:
        self.rec.issue(kind, self.call_id, detail)

    def _drop(self, reason: str) -> None:
        if self.dropped is None:
            self.dropped = reason
            self.rec.dropped[reason] += 1
            self.rec.counts["dropped_calls"] += 1


# ---------------------------------------------------------------------- running


async def _lag_monitor(samples: list[float], interval: float = 0.05) -> None:
    """How late the loop wakes from a sleep: large values mean the simulator is the bottleneck."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        samples.append(round((loop.time() - start - interval) * 1000, 3))


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """Leave the heap the run starts with out of garbage collection until it ends. A load
    generator must not stall: in a benchmark driver (Ray, rich and pydantic loaded, about 200k
    objects, inherited by forked simulator processes) each full collection held the loop for
    about 230 ms, and every answer arriving meanwhile was timed that much late."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _run_local(config: SimConfig, indices: list[int], progress: ProgressFn | None,
                     observer: SimObserver | None = None) -> SimResult:
    with _heap_frozen():
        return await _run_calls(config, indices, progress, observer)


async def _run_calls(config: SimConfig, indices: list[int], progress: ProgressFn | None,
                     observer: SimObserver | None) -> SimResult:
    rec = Recorder(config, progress, observer)
    rec.observer.run_started(rec)
    rec.counts["calls"] = len(indices)
    limit = asyncio.Semaphore(config.concurrency or len(indices) or 1)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(index: int) -> None:
        await asyncio.sleep(max(0.0, start + index * config.ramp_s / config.calls - loop.time()))
        async with limit:
            if rec.past_deadline():
                rec.counts["calls"] -= 1  # never placed
                return
            await _Call(config, index, rec).run()

    monitor = asyncio.create_task(_lag_monitor(rec.loop_lag_ms))
    try:
        await asyncio.gather(*(one(i) for i in indices))
    finally:
        monitor.cancel()
    rec.tick(final=True)
    return rec.result()


def _child(config_json: str, indices: list[int], slot: int, out: Any) -> None:
    """Entry point of one simulator process: run its share and send the result back."""
    try:
        config = SimConfig.model_validate_json(config_json)
        result = asyncio.run(_run_local(config, indices, lambda c, t: out.put(("progress", slot, c, t))))
        out.put(("result", slot, result.model_dump_json()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        out.put(("error", slot, traceback.format_exc()))


async def _run_processes(config: SimConfig, progress: ProgressFn | None) -> SimResult:
    n = min(config.processes, config.calls)
    child_cfg = config.model_copy(update={
        "processes": 1,
        "concurrency": math.ceil(config.concurrency / n) if config.concurrency else None,
    })
    # fork: children start in milliseconds and need no __main__ guard in the caller's script;
    # they only run this module's code on a fresh event loop.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(child_cfg.model_dump_json(), list(range(k, config.calls, n)), k, out),
                    daemon=True, name=f"callray-sim-{k}")
        for k in range(n)
    ]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results: dict[int, SimResult] = {}
    done: dict[int, tuple[int, int]] = {}
    try:
        while len(results) < n:
            try:
                msg = await asyncio.to_thread(out.get, True, 1.0)
            except queue_mod.Empty:
                dead = [p.name for k, p in enumerate(procs) if k not in results and not p.is_alive()]
                if dead and out.empty():
                    raise RuntimeError(f"simulator process(es) {', '.join(dead)} died without a result")
                continue
            kind, slot = msg[0], msg[1]
            if kind == "progress":
                done[slot] = (msg[2], msg[3])
                if progress:
                    progress(sum(c for c, _ in done.values()), sum(t for _, t in done.values()))
            elif kind == "result":
                results[slot] = SimResult.model_validate_json(msg[2])
            else:
                raise RuntimeError(f"simulator process {slot} failed:\n{msg[2]}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    merged = SimResult.merge([results[k] for k in sorted(results)], duration_s=time.monotonic() - t0)
    merged.config = config.model_dump(mode="json")
    return merged


async def run_simulation(config: SimConfig, progress: ProgressFn | None = None,
                         observer: SimObserver | None = None) -> SimResult:
    """Place ``config.calls`` simulated Retell calls against ``config.url`` and measure them.
    An ``observer`` watches the run live, so it runs in this process (``processes`` is ignored)."""
    if config.run_id is None:
        config = config.model_copy(update={"run_id": secrets.token_hex(4)})
    if config.processes > 1 and config.calls > 1 and observer is None:
        return await _run_processes(config, progress)
    return await _run_local(config, list(range(config.calls)), progress, observer)
