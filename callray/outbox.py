"""The outbound side of one socket: what a call sends, in order, one write at a time.

Transport types, shared by whoever produces frames (a call's conversation, in this process or
in a call actor) and the socket session that writes them; they know nothing of either. Frames
travel as Retell's outbound models, each serialised once where it is made (``to_json`` keeps
the text), and whoever writes the socket (its writer, or the call's task flushing its own
frames) sends that text.
"""

from __future__ import annotations

import asyncio
import enum
from typing import AsyncIterator, Awaitable, Callable

from callray.protocol import OutboundFrame


class StreamEnd(str, enum.Enum):
    """Why a socket's outbound stream ended; the gateway picks the close code from it."""

    SUPERSEDED = "superseded"  # a newer socket of the call took over (the old one closes with 4001)
    DETACHED = "detached"  # the socket itself went away
    DEACTIVATED = "deactivated"  # the call was saved and dropped from memory (idle sweep, shutdown)
    UNAVAILABLE = "unavailable"  # the call could not be activated or its host was lost for good
    OVERFLOW = "overflow"  # the socket's reader does not read: its outbox reached its bound


#: Sends one frame's text on the socket; False when the socket is gone.
Send = Callable[[str], Awaitable[bool]]


class Outbox:
    """The outbound frames of one socket, in order, for the gateway's writer.

    Closed when its socket detaches or a newer socket of the same call attaches (the newest
    socket wins), which ends the writer's stream for it.

    A socket in this process writes with :meth:`write`; while it waits for frames, a producer
    may :meth:`flush` what it queued itself, sending at once instead of a loop turn later
    (one write at a time, so frames keep their order). A client that stops reading holds a
    flush as it holds the writer, until it reads again or its socket goes.
    """

    def __init__(self, connection_id: str, limit: int = 1000):
        self.connection_id, self.limit = connection_id, limit
        self.close_reason: StreamEnd | None = None
        self._queue: asyncio.Queue[OutboundFrame | None] = asyncio.Queue()
        self._send: Send | None = None  # the socket's, while its writer runs
        self._writing = asyncio.Lock()  # one write at a time: the writer's or a flush's

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def put(self, frame: OutboundFrame) -> None:
        """Queue a frame; past ``limit`` frames waiting, the outbox closes (``OVERFLOW``) and
        drops what it held: a socket nobody reads must not hold memory."""
        if self.closed:
            return
        if self._queue.qsize() >= self.limit:
            while not self._queue.empty():
                self._queue.get_nowait()
            self.close(StreamEnd.OVERFLOW)
            return
        self._queue.put_nowait(frame)

    def close(self, reason: StreamEnd) -> None:
        if not self.closed:
            self.close_reason = reason
            self._queue.put_nowait(None)

    def drain(self) -> list[OutboundFrame]:
        """Whatever is queued now, without waiting (the end marker stays queued)."""
        frames: list[OutboundFrame] = []
        while not self._queue.empty():
            frame = self._queue.get_nowait()
            if frame is None:
                self._queue.put_nowait(None)
                break
            frames.append(frame)
        return frames

    async def write(self, send: Send) -> bool:
        """Be the socket's writer: send each frame until the outbox closes (True) or the socket
        is gone (False)."""
        self._send = send
        try:
            while (frame := await self._queue.get()) is not None:
                if not await self._write([frame]):
                    return False
            return True
        finally:
            self._send = None

    async def flush(self) -> None:
        """Send what is queued now, in the caller's task, unless no writer runs here, the outbox
        is closed or a write is under way: then the writer sends it, a loop turn later."""
        if self._send is None or self.closed or self._writing.locked():
            await asyncio.sleep(0)
            return
        frames = self.drain()
        if frames:
            await self._write(frames)

    async def _write(self, frames: list[OutboundFrame]) -> bool:
        async with self._writing:
            for frame in frames:
                send = self._send
                if send is None or not await send(frame.to_json()):
                    return False
        return True

    async def frames(self) -> AsyncIterator[OutboundFrame]:
        """Each frame as it is queued, until the outbox closes."""
        while (frame := await self._queue.get()) is not None:
            yield frame

    async def batches(self) -> AsyncIterator[list[OutboundFrame]]:
        """Everything queued so far per iteration: fewer hops to a remote gateway under load."""
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            while not self._queue.empty():
                frame = self._queue.get_nowait()
                if frame is None:
                    yield batch
                    return
                batch.append(frame)
            yield batch
