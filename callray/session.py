"""One Retell socket's life: the transport, apart from where the call is hosted.

A :class:`SocketSession` accepts at once (Retell waits at most 7 s and does nothing slow
first), sends ``config``, answers ``ping_pong`` itself (keepalives never wait on a host or an
LLM), parses each frame once, and hands the rest to a :class:`CallLink`: the call's actor in
this process (``callray.host.LocalLink``, local placement) or in a Ray actor (dedicated
placement, in ``actors/``); it knows neither, only the transport. Frames the call sends go
through the socket's :class:`Outbox` to one writer.

Its states, each transition checked (an illegal one raises, as Starlette's WebSocket does):
CONNECTING -> ATTACHING -> LIVE -> CLOSING -> CLOSED; ATTACHING or CONNECTING may also close.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections import deque
from typing import Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from callray.lifecycle import Lifecycle
from callray.outbox import Outbox, StreamEnd
from callray.protocol import ConfigBody, ConfigFrame, InboundEvent, PingPong, PingPongFrame, ProtocolError, parse_frame
from callray.settings import GatewaySettings

log = logging.getLogger("callray.session")

# The close-code policy (docs/reliability.md). Retell ends a live call on any close frame but
# 1000 (which means the agent hung up) and reconnects only after an abnormal closure. So a
# condition the call can survive (a drain, a deactivation, a call that cannot be activated now)
# ends the socket with no close frame at all: the handler returns and the server drops the
# connection, which Retell sees as 1006, as when a replica dies. Close frames are sent only for
# what must not come back: a socket superseded by a newer one of the same call, and abuse.
# callray never sends 1000 or 1011.
CLOSE_FLOOD = 1008  # policy violation: more frames per second than gateway.max_frames_per_s
CLOSE_TOO_BIG = 1009  # a frame over gateway.max_frame_bytes (Retell's own traffic stays far below)
CLOSE_NOT_READING = 1013  # try again later: the client let gateway.max_queued_frames pile up
CLOSE_SUPERSEDED = 4001  # a newer socket of the same call took over
CLOSE_CODES = {StreamEnd.SUPERSEDED: CLOSE_SUPERSEDED, StreamEnd.OVERFLOW: CLOSE_NOT_READING}
#: A socket may send this many seconds' worth of frames at once (gateway.max_frames_per_s).
BURST_S = 3.0
#: Seconds a close frame may take to leave; a client that does not read gets no longer.
CLOSE_TIMEOUT_S = 5.0

#: Frames that arrive while the call is still being activated wait for it, up to this many.
MAX_EARLY_FRAMES = 64


class SessionState(enum.Enum):
    CONNECTING = "connecting"
    ATTACHING = "attaching"
    LIVE = "live"
    CLOSING = "closing"
    CLOSED = "closed"


_TRANSITIONS = {
    SessionState.CONNECTING: frozenset({SessionState.ATTACHING, SessionState.CLOSING}),
    SessionState.ATTACHING: frozenset({SessionState.LIVE, SessionState.CLOSING}),
    SessionState.LIVE: frozenset({SessionState.CLOSING}),
    SessionState.CLOSING: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


class CallLink(Protocol):
    """How a socket reaches its call's actor."""

    #: Errors of ``attach`` that mean "not now" (the store or host restarts): retried.
    retryable: tuple[type[BaseException], ...]

    async def attach(self, outbox: Outbox) -> None:
        """Activate the call and bind ``outbox``; its frames (config excepted) come from here."""

    def deliver(self, event: InboundEvent) -> None:
        """Hand over one parsed frame (never a ping), in arrival order, without waiting."""

    async def detach(self) -> None:
        """The socket is gone (the call itself lives on, for a reconnect)."""


class SocketSession:
    """One Retell socket of one call (see the module docstring)."""

    def __init__(self, websocket: WebSocket, call_id: str, link: CallLink, settings: GatewaySettings):
        self.ws, self.call_id, self.link, self.settings = websocket, call_id, link, settings
        self.life = Lifecycle(f"call {call_id}: socket", SessionState.CONNECTING, _TRANSITIONS)
        self.outbox = Outbox(uuid.uuid4().hex, settings.max_queued_frames)
        self.close_code: int | None = None
        self._early: deque[InboundEvent] | None = deque()  # None once attached

    @property
    def state(self) -> SessionState:
        return self.life.state

    def _closing(self, code: int | None = None) -> None:
        """Enter CLOSING (once) with ``code``; later reasons do not override the first."""
        if self.state not in (SessionState.CLOSING, SessionState.CLOSED):
            self.life.move(SessionState.CLOSING)
            self.close_code = code

    async def run(self) -> None:
        """Accept at once, then live until either side closes."""
        await self.ws.accept()
        self.life.move(SessionState.ATTACHING)
        self.outbox.put(ConfigFrame(config=ConfigBody(  # the first frame on every socket (protocol §1)
            auto_reconnect=self.settings.auto_reconnect, call_details=self.settings.call_details,
            transcript_with_tool_calls=self.settings.transcript_with_tool_calls)))
        tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write())]
        attaching = asyncio.create_task(self._attach())
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._closing()
            for task in (attaching, *tasks):
                task.cancel()
            await asyncio.gather(attaching, *tasks, return_exceptions=True)
            await self._close_socket()
            await self.link.detach()
            self.outbox.close(StreamEnd.DETACHED)

    # ------------------------------------------------------------------ tasks

    async def _attach(self) -> None:
        """Activate the call (retrying while its store or host restarts), then deliver what
        arrived meanwhile."""
        failing_since = None
        while True:
            try:
                await self.link.attach(self.outbox)
                break
            except asyncio.CancelledError:
                raise
            except self.link.retryable as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.settings.activate_timeout_s:
                    log.error("call %s: not activated within %s s: %s", self.call_id, self.settings.activate_timeout_s,
                              exc, extra={"call_id": self.call_id})
                    self.outbox.close(StreamEnd.UNAVAILABLE)
                    return
                await asyncio.sleep(0.2)
            except Exception as exc:  # not worth retrying: never leave the socket silent
                log.error("call %s: activation failed", self.call_id, exc_info=exc, extra={"call_id": self.call_id})
                self.outbox.close(StreamEnd.UNAVAILABLE)
                return
        if self.state is not SessionState.ATTACHING:
            return
        self.life.move(SessionState.LIVE)
        early, self._early = self._early, None
        for event in early or ():
            self.link.deliver(event)

    async def _read(self) -> None:
        limit, rate = self.settings.max_frame_bytes, self.settings.max_frames_per_s
        tokens, at = rate * BURST_S, time.monotonic()
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            now = time.monotonic()
            tokens, at = min(rate * BURST_S, tokens + (now - at) * rate) - 1, now
            if tokens < 0:
                log.warning("call %s: more than %g frames/s; closing the socket", self.call_id, rate,
                            extra={"call_id": self.call_id})
                self._closing(CLOSE_FLOOD)
                return
            frame = message.get("text")
            if frame is None:
                log.warning("call %s: skipped a binary frame (Retell sends text)", self.call_id,
                            extra={"call_id": self.call_id})
                continue
            size = len(frame) if len(frame) * 4 <= limit else len(frame.encode())
            if size > limit:
                log.warning("call %s: frame of %d bytes exceeds max_frame_bytes=%d", self.call_id, size, limit,
                            extra={"call_id": self.call_id})
                self._closing(CLOSE_TOO_BIG)
                return
            event = parse_frame(frame)
            if isinstance(event, ProtocolError):
                log.warning("call %s: skipped bad frame: %s", self.call_id, event, extra={"call_id": self.call_id})
            elif isinstance(event, PingPong):
                self.outbox.put(PingPongFrame(timestamp=event.timestamp))
            elif self._early is None:
                self.link.deliver(event)
            elif len(self._early) < MAX_EARLY_FRAMES:
                self._early.append(event)
            else:
                log.warning("call %s: dropped a frame that arrived before the call was activated", self.call_id,
                            extra={"call_id": self.call_id})

    async def _write(self) -> None:
        """The socket's writer (the call may flush its own frames in between, one write at a
        time); returns when the call closes the outbox."""
        if not await self.outbox.write(self._send):
            return  # the socket is gone; the reader sees it too
        reason = self.outbox.close_reason
        if reason is not None and reason is not StreamEnd.DETACHED:
            (log.warning if reason is StreamEnd.OVERFLOW else log.info)(
                "call %s: closing socket (%s)", self.call_id, reason.value, extra={"call_id": self.call_id})
            self._closing(CLOSE_CODES.get(reason))  # none: dropped, and Retell reconnects

    async def _send(self, text: str) -> bool:
        try:
            await self.ws.send_text(text)
            return True
        except (WebSocketDisconnect, RuntimeError, OSError):
            return False

    # ------------------------------------------------------------------ teardown

    async def _close_socket(self) -> None:
        """Send the close frame if there is one to send (else the connection is dropped when the
        handler returns), but never wait long for it: a client that does not read would hold
        the session (and its memory) forever."""
        if (self.close_code is not None and self.ws.client_state == WebSocketState.CONNECTED
                and self.ws.application_state == WebSocketState.CONNECTED):
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.ws.close(code=self.close_code)
            except (RuntimeError, OSError, TimeoutError):
                pass
        self.life.move(SessionState.CLOSED)
