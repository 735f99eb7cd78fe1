"""The socket's outbox: one frame sent at a time, in order, by its writer or by a producer that
flushes from its own task (a turn's answer leaves one task hop sooner)."""

from __future__ import annotations

import asyncio

from callray.outbox import Outbox, StreamEnd
from callray.protocol import PingPongFrame


def frame(n: int) -> PingPongFrame:
    return PingPongFrame(timestamp=n)


def stamp(text: str) -> int:
    return PingPongFrame.model_validate_json(text).timestamp


class Socket:
    """Records what was sent, by which task; ``hold`` makes the next send wait until released."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []
        self.hold: asyncio.Event | None = None
        self.sending = asyncio.Event()

    async def send(self, text: str) -> None:
        self.sending.set()
        if self.hold is not None:
            hold, self.hold = self.hold, None
            await hold.wait()
        self.sent.append((stamp(text), asyncio.current_task().get_name()))


async def started_writer(outbox: Outbox, socket: Socket) -> asyncio.Task:
    writer = asyncio.create_task(outbox.write(socket.send), name="writer")
    await asyncio.sleep(0)
    return writer


async def test_a_flush_sends_from_the_producer_s_task_and_the_writer_sends_the_rest():
    outbox, socket = Outbox("s"), Socket()
    writer = await started_writer(outbox, socket)
    outbox.put(frame(1))
    outbox.put(frame(2))
    await outbox.flush()
    assert socket.sent == [(1, asyncio.current_task().get_name()), (2, asyncio.current_task().get_name())]
    outbox.put(frame(3))  # nobody flushes: the writer sends it
    await asyncio.sleep(0.01)
    assert socket.sent[-1] == (3, "writer")
    outbox.close(StreamEnd.DETACHED)
    await asyncio.wait_for(writer, 1)


async def test_a_flush_never_overtakes_a_frame_the_writer_is_sending():
    outbox, socket = Outbox("s"), Socket()
    writer = await started_writer(outbox, socket)
    socket.hold = release = asyncio.Event()
    outbox.put(frame(1))
    await socket.sending.wait()  # the writer is inside send(1)
    outbox.put(frame(2))
    await outbox.flush()  # yields instead of sending 2 ahead of 1
    assert socket.sent == []
    release.set()
    await asyncio.sleep(0.01)
    assert [n for n, _ in socket.sent] == [1, 2]
    outbox.close(StreamEnd.DETACHED)
    await asyncio.wait_for(writer, 1)


async def test_the_writer_waits_for_a_flush_in_progress():
    outbox, socket = Outbox("s"), Socket()
    writer = await started_writer(outbox, socket)
    socket.hold = release = asyncio.Event()
    outbox.put(frame(1))
    flushing = asyncio.create_task(outbox.flush(), name="producer")
    await socket.sending.wait()  # the producer is inside send(1)
    outbox.put(frame(2))
    outbox.put(frame(3))
    await asyncio.sleep(0.01)  # the writer has woken for them meanwhile
    release.set()
    await flushing
    await asyncio.sleep(0.01)
    assert [n for n, _ in socket.sent] == [1, 2, 3]
    outbox.close(StreamEnd.DETACHED)
    await asyncio.wait_for(writer, 1)


async def test_with_no_writer_a_flush_leaves_the_frames_to_whoever_reads_the_outbox():
    """A call actor's outbox is read in batches by the remote gateway's stream."""
    outbox = Outbox("s")
    outbox.put(frame(1))
    await outbox.flush()
    assert [f.timestamp for f in outbox.drain()] == [1]


async def test_a_flush_whose_send_fails_ends_the_outbox_without_raising():
    outbox = Outbox("s")

    async def gone(text: str) -> None:
        raise OSError("connection reset")

    writer = asyncio.create_task(outbox.write(gone))
    await asyncio.sleep(0)
    outbox.put(frame(1))
    await outbox.flush()  # a turn's task must not die of its socket
    assert outbox.close_reason is StreamEnd.DETACHED
    await asyncio.wait_for(writer, 1)  # the writer ends on the close, with nothing left to send
