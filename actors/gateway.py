"""The gateway's half of a call: one socket's life, and finding the host that owns a call.

A :class:`SocketSession` runs four concerns as separate tasks so none can stall another:

* **reader**: receives frames, answers ``ping_pong`` itself (keepalives never wait on a
  host or an LLM), drops bad frames with a log line, queues the rest for the forwarder;
* **forwarder**: delivers events to the call's host in order, retrying while it restarts;
* **pump**: consumes the host's outbound stream, re-attaching (``resume``) when the host died;
* **writer**: the only task that writes to the socket.

Its states, each transition checked: CONNECTING -> ATTACHING -> LIVE (-> ATTACHING on host
loss -> LIVE) -> CLOSING -> CLOSED.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
import uuid
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from actors.placement import DedicatedHosts, SharedHosts
from callray.host import STREAM_CLOSED
from callray.protocol import ProtocolError, config_frame, decode_frame, pong_frame
from callray.settings import CallraySettings

log = logging.getLogger("callray.gateway")

HOST_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError)

# Close codes (RFC 6455 + application range). 1000 is reserved for a deliberate hang-up.
CLOSE_TOO_BIG = 1009
CLOSE_HOST_UNAVAILABLE = 1011
CLOSE_SUPERSEDED = 4001  # a newer socket of the same call took over

REQUEST_TYPES = ("response_required", "reminder_required")


class SessionState(enum.Enum):
    CONNECTING = "connecting"
    ATTACHING = "attaching"
    LIVE = "live"
    CLOSING = "closing"
    CLOSED = "closed"


_TRANSITIONS = {
    SessionState.CONNECTING: {SessionState.ATTACHING, SessionState.CLOSING},
    SessionState.ATTACHING: {SessionState.LIVE, SessionState.CLOSING},
    SessionState.LIVE: {SessionState.ATTACHING, SessionState.CLOSING},
    SessionState.CLOSING: {SessionState.CLOSED},
    SessionState.CLOSED: set(),
}

_WRITER_STOP = object()


class SocketSession:
    """One Retell socket of one call (see the module docstring)."""

    def __init__(self, websocket: WebSocket, call_id: str, agent: str | None, hosts: SharedHosts | DedicatedHosts,
                 settings: CallraySettings):
        self.ws, self.call_id, self.agent, self.hosts = websocket, call_id, agent, hosts
        self.settings = settings.gateway
        self.connection_id = uuid.uuid4().hex
        self.state = SessionState.CONNECTING
        self.close_code: int | None = None
        self._outgoing: asyncio.Queue[Any] = asyncio.Queue()
        self._inbound: asyncio.Queue[Any] = asyncio.Queue()
        self._attached = asyncio.Event()
        self._closing = asyncio.Event()
        self._open_request: tuple[int, str] | None = None  # (response_id, frame) of the latest, not yet completed
        self._newest_request_id = 0

    def _move(self, new: SessionState) -> bool:
        if new not in _TRANSITIONS[self.state]:
            return False
        self.state = new
        return True

    async def run(self) -> None:
        """Accept at once (Retell waits at most 7 s), then live until either side closes."""
        await self.ws.accept()
        self._outgoing.put_nowait(config_frame(self.settings.auto_reconnect, self.settings.call_details))
        self._move(SessionState.ATTACHING)
        tasks = [asyncio.create_task(coro) for coro in (self._write(), self._pump(), self._forward())]
        reader = asyncio.create_task(self._read())
        closing = asyncio.create_task(self._closing.wait())
        try:
            await asyncio.wait([reader, closing], return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            closing.cancel()
            for task in tasks[1:]:
                task.cancel()
            self._outgoing.put_nowait(_WRITER_STOP)
            await asyncio.gather(tasks[0], return_exceptions=True)
            await self._close_socket()
            await self._detach()

    def close(self, code: int, reason: str) -> None:
        """Ask the session to close the socket with ``code`` (never 1000 for an error)."""
        if self._move(SessionState.CLOSING):
            self.close_code = code
            log.info("call %s: closing socket (%d %s)", self.call_id, code, reason, extra={"call_id": self.call_id})
            self._closing.set()

    # ------------------------------------------------------------------ tasks

    async def _read(self) -> None:
        limit = self.settings.max_frame_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self._move(SessionState.CLOSING)
                return
            text = message.get("text")
            frame: str | bytes = text if text is not None else message.get("bytes") or b""
            size = len(frame) if isinstance(frame, bytes) else len(frame.encode()) if len(frame) * 4 > limit else len(frame)
            if size > limit:
                self.close(CLOSE_TOO_BIG, f"frame of {size} bytes exceeds max_frame_bytes={limit}")
                return
            data = decode_frame(frame)  # JSON-level only: the host validates the rest
            if isinstance(data, ProtocolError):
                log.warning("call %s: skipped bad frame: %s", self.call_id, data, extra={"call_id": self.call_id})
                continue
            kind = data["interaction_type"]
            if kind == "ping_pong":
                timestamp = data.get("timestamp")
                if isinstance(timestamp, int) and not isinstance(timestamp, bool):
                    self._outgoing.put_nowait(pong_frame(timestamp))
                else:
                    log.warning("call %s: skipped ping_pong without an int timestamp", self.call_id,
                                extra={"call_id": self.call_id})
                continue
            response_id = data.get("response_id")
            if kind in REQUEST_TYPES and isinstance(response_id, int) and response_id > 0:
                self._open_request = (response_id, frame)
                self._newest_request_id = max(self._newest_request_id, response_id)
            self._inbound.put_nowait(frame)

    async def _write(self) -> None:
        while True:
            frame = await self._outgoing.get()
            if frame is _WRITER_STOP:
                return
            try:
                await self.ws.send_text(frame)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._move(SessionState.CLOSING)
                self._closing.set()
                return

    async def _pump(self) -> None:
        """Host stream -> writer. On host loss, re-attach with ``resume`` until host_retry_s."""
        greeted, failing_since = False, None
        while True:
            try:
                host = await self.hosts.owner(self.call_id)
                stream = host.stream.remote(self.call_id, self.connection_id, self.agent, greeted)
                async for ref in stream:
                    item = await ref
                    if isinstance(item, str):
                        reason = item.removeprefix(STREAM_CLOSED)
                        self.close(CLOSE_SUPERSEDED if "superseded" in reason else CLOSE_HOST_UNAVAILABLE, reason)
                        return
                    if not self._attached.is_set():
                        if greeted and self._open_request is not None:  # its answer died with the host
                            await host.deliver.remote(self.call_id, self.connection_id, self._open_request[1])
                        self._attached.set()
                        self._move(SessionState.LIVE)
                        greeted, failing_since = True, None
                    for frame in item:
                        if self._current(frame):
                            self._outgoing.put_nowait(frame)
                return
            except (*HOST_ERRORS, RayTaskError) as exc:
                self._attached.clear()
                self._move(SessionState.ATTACHING)
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.settings.host_retry_s:
                    self.close(CLOSE_HOST_UNAVAILABLE, f"call host unavailable: {exc.__class__.__name__}")
                    return
                log.warning("call %s: host lost (%s); re-attaching", self.call_id, exc.__class__.__name__,
                            extra={"call_id": self.call_id})
                await asyncio.sleep(0.1)

    def _current(self, frame: str) -> bool:
        """False for a response to an id older than the newest request Retell sent on this
        socket: Retell would drop it anyway, and after a host restart a re-delivered or retried
        older request could otherwise still be answered. Also forgets the open request once its
        completing frame passes."""
        if '"response_type":"response"' not in frame:
            return True
        data = json.loads(frame)
        response_id = data.get("response_id", 0)
        if 0 < response_id < self._newest_request_id:
            return False
        if data.get("content_complete") and self._open_request is not None \
                and response_id == self._open_request[0]:
            self._open_request = None
        return True

    async def _forward(self) -> None:
        """Deliver events in order, each until its host accepts it (or the retry window ends)."""
        while True:
            event = await self._inbound.get()
            failing_since = None
            while True:
                await self._attached.wait()
                try:
                    host = await self.hosts.owner(self.call_id)
                    status = await host.deliver.remote(self.call_id, self.connection_id, event)
                except HOST_ERRORS:
                    status = "host_lost"
                except RayTaskError as exc:  # e.g. the state store is briefly unreachable
                    status = f"host error: {exc.cause!r}"
                if status == "ok":
                    break
                if status == "superseded":
                    self.close(CLOSE_SUPERSEDED, "a newer socket of this call took over")
                    return
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.settings.host_retry_s:
                    self.close(CLOSE_HOST_UNAVAILABLE, f"event not delivered: {status}")
                    return
                await asyncio.sleep(0.05)  # the pump is re-attaching to the restarted host

    # ------------------------------------------------------------------ teardown

    async def _close_socket(self) -> None:
        self._move(SessionState.CLOSING)
        if self.ws.client_state == WebSocketState.CONNECTED and self.ws.application_state == WebSocketState.CONNECTED:
            try:
                await self.ws.close(code=self.close_code or CLOSE_HOST_UNAVAILABLE)
            except (RuntimeError, OSError):
                pass
        self._move(SessionState.CLOSED)

    async def _detach(self) -> None:
        """Tell the host the socket is gone (the call itself lives on for a reconnect)."""
        try:
            host = await self.hosts.owner(self.call_id)
            host.detach.remote(self.call_id, self.connection_id)
        except (*HOST_ERRORS, RayTaskError):
            pass
        self.hosts.forget(self.call_id)
