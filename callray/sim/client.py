"""The one Retell client: a call's WebSocket as Retell's platform holds it.

The simulator, ``callray call``, the benchmark, the tests and the multinode demo all reach a
server through :class:`RetellSocket`. It connects with Retell's options, judges every frame as
Retell would (:func:`validate_frame`, written from the protocol reference, not from callray's
code), answers ``config`` as Retell does when asked to (``call_details``, ``ping_pong`` every
2 s, unanswered pings reported) and sends. What a frame means is its user's business: each
valid frame goes to ``on_frame``, each problem to ``on_issue``. :class:`RetellClient` is the
scripted caller of the tests and demos built on it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

#: Every kind a client reports, with what it means. Violations fail a run; warnings do not.
VIOLATION_KINDS: dict[str, str] = {
    "not_json": "a text frame that is not one JSON object",
    "binary_frame": "a binary frame (Retell closes the socket with 1007)",
    "missing_response_type": "a frame without response_type (read as a response)",
    "missing_field": "a required field is missing (Retell drops the frame)",
    "wrong_type": "a field has the wrong JSON type, e.g. \"true\" for true (Retell drops the frame)",
    "no_complete": "a request got no content_complete: true within the turn timeout",
    "duplicate_complete": "more than one content_complete: true for one response_id",
    "content_after_complete": "content for a response_id after its content_complete: true",
    "stale_content": "a frame for an older response_id after a frame for a newer one",
    "unknown_response_id": "a response for an id this call never requested",
    "ping_unanswered": "a ping_pong not echoed with the same timestamp in time",
    "echo_missing": "expect_echo: the answer lacks the caller's own name token",
    "cross_talk": "expect_echo: the answer holds another call's name token",
    "sentence_repeated": "one answer says the same sentence twice (e.g. regenerated after a fault)",
}
WARNING_KINDS: dict[str, str] = {
    "first_frame_not_config": "the first frame on a socket is not config",
    "config_not_nested": "config fields sent at the top level instead of under \"config\"",
    "null_optional_field": "an optional field sent as null instead of omitted",
    "unknown_response_type": "a response_type the protocol does not define",
    "greeting_repeated": "a reconnect got a non-empty response 0 (the caller hears the greeting twice)",
    "reconnect_silent": "no frame on a reconnected socket within the turn timeout",
}

# Required and optional fields with their JSON types, per response_type (protocol §1).
_FRAME_FIELDS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "config": ({}, {"config": dict}),
    "ping_pong": ({"timestamp": int}, {}),
    "response": (
        {"response_id": int, "content": str, "content_complete": bool},
        {"no_interruption_allowed": bool, "end_call": bool, "transfer_number": str,
         "show_transferee_as_caller": bool, "digit_to_press": str},
    ),
    "agent_interrupt": (
        {"interrupt_id": int, "content": str, "content_complete": bool},
        {"no_interruption_allowed": bool, "end_call": bool, "transfer_number": str, "digit_to_press": str},
    ),
    "tool_call_invocation": ({"tool_call_id": str, "name": str, "arguments": str}, {}),
    "tool_call_result": ({"tool_call_id": str, "content": str}, {"successful": bool}),
    "update_agent": ({"agent_config": dict}, {}),
    "metadata": ({"metadata": dict}, {}),
}
_CONFIG_FIELDS = ("auto_reconnect", "call_details", "transcript_with_tool_calls")

Issue = tuple[str, str]
#: on_frame(socket, frame, received_at): a valid frame, with the loop time it arrived.
FrameHandler = Callable[["RetellSocket", dict[str, Any], float], None]


def call_url(base: str, call_id: str) -> str:
    """``{base}/{call_id}``, keeping a query string (where a URL secret may live) at the end."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + call_id))


def _is_type(value: Any, expected: type) -> bool:
    if expected is int:  # bool is an int in Python but not on the wire
        return type(value) is int
    if expected is bool:
        return type(value) is bool
    return isinstance(value, expected)


def validate_frame(raw: str | bytes) -> tuple[dict[str, Any] | None, list[Issue]]:
    """Judge one server frame as Retell would.

    Returns the parsed object (None when Retell would drop it) and the issues found, each a
    ``(kind, detail)`` from VIOLATION_KINDS or WARNING_KINDS. A frame without
    ``response_type`` is returned with ``response_type`` set to ``response``, as Retell reads it.
    """
    if isinstance(raw, bytes):
        return None, [("binary_frame", f"{len(raw)} bytes")]
    try:
        data = json.loads(raw)
    except ValueError:
        return None, [("not_json", raw[:80])]
    if not isinstance(data, dict):
        return None, [("not_json", f"a JSON {type(data).__name__}, not an object")]
    issues: list[Issue] = []
    rtype = data.get("response_type")
    if rtype is None:
        issues.append(("missing_response_type", raw[:80]))
        data = {**data, "response_type": "response"}
        rtype = "response"
    elif not isinstance(rtype, str):
        return None, [("wrong_type", f"response_type={rtype!r}")]
    if rtype not in _FRAME_FIELDS:
        return data, issues + [("unknown_response_type", rtype)]
    required, optional = _FRAME_FIELDS[rtype]
    blocking = False
    for name, expected in required.items():
        if name not in data:
            issues.append(("missing_field", f"{rtype}.{name} in {raw[:80]}"))
            blocking = True
        elif not _is_type(data[name], expected):
            issues.append(("wrong_type", f"{rtype}.{name}={data[name]!r} (want {expected.__name__})"))
            blocking = True
    for name, expected in optional.items():
        if name in data and data[name] is None:
            issues.append(("null_optional_field", f"{rtype}.{name}"))
        elif name in data and not _is_type(data[name], expected):
            issues.append(("wrong_type", f"{rtype}.{name}={data[name]!r} (want {expected.__name__})"))
            blocking = True
    if rtype == "response" and _is_type(data.get("response_id"), int) and data["response_id"] < 0:
        issues.append(("wrong_type", f"response.response_id={data['response_id']} is negative"))
        blocking = True
    if rtype == "tool_call_invocation" and isinstance(data.get("arguments"), str):
        try:
            json.loads(data["arguments"])
        except ValueError:
            issues.append(("wrong_type", f"tool_call_invocation.arguments is not a JSON string: {data['arguments'][:60]!r}"))
    if rtype == "config":
        body = data.get("config")
        if body is None:
            body = {k: data[k] for k in _CONFIG_FIELDS if k in data}
            if body:
                issues.append(("config_not_nested", ", ".join(body)))
        for name in _CONFIG_FIELDS:
            if isinstance(body, dict) and name in body and not _is_type(body[name], bool):
                issues.append(("wrong_type", f"config.{name}={body[name]!r} (want bool)"))
                blocking = True
        data = {**data, "config": body or {}}
    return (None if blocking else data), issues


class RetellSocket:
    """One WebSocket of a call (a reconnect opens a new one). ``open`` connects and starts
    reading; ``close`` ends it with a close frame, ``abort`` drops the TCP connection as a
    network failure would. ``counts`` tallies frames_received, pings_sent and pings_answered."""

    def __init__(self, ws: ClientConnection, opened_at: float, *, on_frame: FrameHandler,
                 on_issue: Callable[[str, str], None], call_object: Callable[[], dict[str, Any]] | None = None,
                 on_closed: Callable[[RetellSocket], None] | None = None, ping_interval_s: float = 2.0,
                 ping_timeout_s: float = 5.0, counts: Counter[str] | None = None):
        self.ws, self.opened_at = ws, opened_at
        self.on_frame, self.on_issue, self.on_closed = on_frame, on_issue, on_closed
        self.call_object = call_object  # None: a config asking for call_details is not answered
        self.ping_interval_s, self.ping_timeout_s = ping_interval_s, ping_timeout_s  # 0: no keepalives
        self.counts: Counter[str] = counts if counts is not None else Counter()
        self.frames = 0
        self.by_us = False  # we closed or aborted it: its end is not a drop
        self.pending_pings: dict[int, float] = {}
        self.first_frame = asyncio.Event()
        self.closed = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self._sent_details = False
        self._pinger: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, *, open_timeout_s: float = 7.0, **options: Any) -> RetellSocket:
        """Connect as Retell does (no WebSocket-level pings or compression; Retell waits up to
        7 s); raises OSError, TimeoutError or WebSocketException when it cannot."""
        opened_at = asyncio.get_running_loop().time()
        ws = await connect(url, open_timeout=open_timeout_s, ping_interval=None, close_timeout=5, max_size=None,
                           compression=None, proxy=None)
        return cls(ws, opened_at, **options)

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def send(self, payload: dict[str, Any]) -> bool:
        """Send one frame; False when the socket is already closed (its reader records how)."""
        if self.closed.is_set():
            return False
        try:
            await self.ws.send(json.dumps(payload))
        except ConnectionClosed:
            return False
        return True

    async def close(self, code: int = 1000) -> None:
        """End the socket with a close frame (aborted if the server does not answer in 5 s)."""
        if not self.closed.is_set():
            self.check_pings()
            self.by_us = True
            try:
                await asyncio.wait_for(self.ws.close(code), 5)
            except (asyncio.TimeoutError, WebSocketException, OSError):
                self.ws.transport.abort()
        await asyncio.gather(self.reader, return_exceptions=True)

    async def abort(self) -> None:
        """Drop the TCP connection without a close frame, as a network failure does."""
        self.check_pings()
        self.by_us = True
        self.ws.transport.abort()
        await self.closed.wait()

    def check_pings(self) -> None:
        """Report every ping not echoed within ``ping_timeout_s``."""
        now = self.loop.time()
        for ts, sent in list(self.pending_pings.items()):
            if now - sent > self.ping_timeout_s:
                del self.pending_pings[ts]
                self.on_issue("ping_unanswered", f"timestamp {ts} not echoed within {self.ping_timeout_s} s")

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self._on_raw(raw)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            if self._pinger:
                self._pinger.cancel()
            if self.on_closed:
                self.on_closed(self)

    def _on_raw(self, raw: str | bytes) -> None:
        now = self.loop.time()
        self.frames += 1
        self.counts["frames_received"] += 1
        self.first_frame.set()
        data, issues = validate_frame(raw)
        for kind, detail in issues:
            self.on_issue(kind, detail)
        rtype = data.get("response_type") if data else None
        if self.frames == 1 and rtype != "config":
            self.on_issue("first_frame_not_config", f"first frame: {str(raw)[:80]}")
        if data is None:
            return
        if rtype == "config":
            self._answer_config(data["config"])
        elif rtype == "ping_pong" and self.pending_pings.pop(data["timestamp"], None) is not None:
            self.counts["pings_answered"] += 1
        self.on_frame(self, data, now)

    def _answer_config(self, body: dict[str, Any]) -> None:
        if body.get("call_details") is True and self.call_object is not None and not self._sent_details:
            self._sent_details = True
            task = asyncio.create_task(self.send({"interaction_type": "call_details", "call": self.call_object()}))
            self._background.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._background.discard)
        if body.get("auto_reconnect") is True and self.ping_interval_s > 0 and self._pinger is None:
            self._pinger = asyncio.create_task(self._ping())

    async def _ping(self) -> None:
        """ping_pong every interval, as Retell does once config asked for auto_reconnect."""
        last = 0
        while not self.closed.is_set():
            await asyncio.sleep(self.ping_interval_s)
            if self.closed.is_set():
                return
            self.check_pings()
            last = max(int(time.time() * 1000), last + 1)
            self.pending_pings[last] = self.loop.time()
            if not await self.send({"interaction_type": "ping_pong", "timestamp": last}):
                return
            self.counts["pings_sent"] += 1


class RetellClient:
    """A scripted caller: keeps every frame and every issue, waits for frames by predicate, and
    plays turns with a growing transcript. Keepalives are off unless asked for, so a test sees
    exactly what it sends. Like Retell, it answers a config asking for call_details, with
    ``call_object`` (default: just the call id; ``call_details=False`` never answers). When the
    server asks for ``transcript_with_tool_calls``, each request carries one, with the tool
    frames the server sent in place."""

    def __init__(self, base_url: str, call_id: str, *, call_object: dict[str, Any] | None = None,
                 call_details: bool = True, ping_interval_s: float = 0.0):
        self.url = call_url(base_url, call_id)
        self.call_id = call_id
        self.frames: list[dict[str, Any]] = []
        self.arrived: list[float] = []  # the loop time each frame arrived
        self.issues: list[Issue] = []
        self.transcript: list[dict[str, str]] = []
        self.socket: RetellSocket | None = None
        if call_details and call_object is None:
            call_object = {"call_id": call_id}
        self._call_object, self._ping_interval_s = call_object, ping_interval_s
        self.history: list[dict[str, Any]] = []  # transcript_with_tool_calls
        self.wants_history = False
        self._waiters: list[asyncio.Future] = []

    async def connect(self, open_timeout_s: float = 30.0) -> RetellClient:
        details = self._call_object
        self.socket = await RetellSocket.open(
            self.url, open_timeout_s=open_timeout_s, on_frame=self._on_frame, on_issue=self._on_issue,
            on_closed=lambda _: self._wake(), call_object=(lambda: details) if details is not None else None,
            ping_interval_s=self._ping_interval_s)
        return self

    async def __aenter__(self) -> RetellClient:
        return await self.connect()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self.socket is not None and self.socket.closed.is_set()

    @property
    def close_code(self) -> int | None:
        return self.socket.close_code if self.closed else None

    def _on_frame(self, _: RetellSocket, frame: dict[str, Any], received_at: float) -> None:
        self.frames.append(frame)
        self.arrived.append(received_at)
        kind = frame.get("response_type")
        if kind == "config":
            self.wants_history = frame["config"].get("transcript_with_tool_calls") is True
        elif kind in ("tool_call_invocation", "tool_call_result"):
            self.history.append({"role": kind, **{k: v for k, v in frame.items() if k != "response_type"}})
        self._wake()

    def _on_issue(self, kind: str, detail: str) -> None:
        self.issues.append((kind, detail))

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> dict[str, Any]:
        """The first frame (old or new) matching ``predicate``."""
        async def find() -> dict[str, Any]:
            seen = 0
            while True:
                for frame in self.frames[seen:]:
                    if predicate(frame):
                        return frame
                seen = len(self.frames)
                if self.closed:
                    raise ConnectionError(f"socket closed ({self.close_code}) before the frame arrived")
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter
        return await asyncio.wait_for(find(), timeout)

    def responses(self, response_id: int) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("response_id") == response_id and f.get("response_type") == "response"]

    async def complete(self, response_id: int, timeout: float = 15.0) -> str:
        """Wait for ``content_complete`` of ``response_id``; return the whole content."""
        await self.wait_for(lambda f: f.get("response_id") == response_id and f.get("content_complete"), timeout)
        return "".join(f.get("content", "") for f in self.responses(response_id))

    async def send(self, payload: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(payload))

    async def send_raw(self, message: str | bytes) -> None:
        """Send one frame as it is (a test of bad input); raises on a closed socket."""
        assert self.socket is not None, "connect() first"
        await self.socket.ws.send(message)

    async def say(self, response_id: int, text: str, kind: str = "response_required") -> None:
        if text:
            self.hear("user", text)
        request = {"interaction_type": kind, "response_id": response_id, "transcript": list(self.transcript)}
        if self.wants_history:
            request["transcript_with_tool_calls"] = list(self.history)
        await self.send(request)

    def hear(self, role: str, text: str) -> None:
        """Add an utterance to the transcript (and to the one with tool calls)."""
        self.transcript.append({"role": role, "content": text})
        self.history.append({"role": role, "content": text})

    async def turn(self, response_id: int, text: str, kind: str = "response_required") -> str:
        await self.say(response_id, text, kind)
        answer = await self.complete(response_id)
        self.hear("agent", answer)
        return answer

    async def close(self, code: int = 1000) -> None:
        if self.socket is not None:
            await self.socket.close(code)
