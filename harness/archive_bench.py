"""Archive throughput: how many call events per second each archive backend stores.

Drives ``TranscriptArchive`` the way the consumer does (batches of up to 100 events from many
calls, one flush per batch) with Retell-shaped turns (caller and agent text, timings) for
``--calls`` concurrent calls, into PostgreSQL (a database of its own on ``--server``, dropped at
the end) and into files (a temp dir), and prints events/s and flush p50/p99 for each.

``python -m harness.archive_bench --calls 300 --events 30000``
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid

import asyncpg

from callray.consumers.archive import TranscriptArchive
from callray.consumers.archive_files import FileRecords
from callray.consumers.archive_postgres import PostgresRecords
from callray.events import CallStarted, CallTurn, Event
from callray.stats import percentile

BATCH = 100  # what the consumer reads at once


def events(calls: int, total: int) -> list[Event]:
    """Round-robin over the calls: a start, then turns, as a busy stream interleaves them."""
    out: list[Event] = [CallStarted(call_id=f"bench-{c}", seq=0) for c in range(calls)]
    rid = 0
    while len(out) < total:
        rid += 1
        out += [CallTurn(call_id=f"bench-{c}", seq=rid, response_id=rid, caller_text="Could I book an appointment "
                         "for Tuesday morning, please?" * 2, agent_text="Of course. Tuesday at nine is free; shall "
                         "I book it for you?", first_chunk_ms=12.0, first_sentence_ms=180.0, complete_ms=900.0)
                for c in range(calls)]
    return out[:total]


async def measure(archive: TranscriptArchive, stream: list[Event]) -> dict[str, float]:
    flushes: list[float] = []
    start = time.perf_counter()
    for i in range(0, len(stream), BATCH):
        for event in stream[i:i + BATCH]:
            await archive.handle(event)
        t = time.perf_counter()
        await archive.flush()
        flushes.append((time.perf_counter() - t) * 1000)
    took = time.perf_counter() - start
    flushes.sort()
    return {"events_per_s": round(len(stream) / took), "flush_p50_ms": round(percentile(flushes, 0.5), 1),
            "flush_p99_ms": round(percentile(flushes, 0.99), 1)}


async def main(args: argparse.Namespace) -> None:
    stream = events(args.calls, args.events)
    name = f"callray_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.server)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        database = TranscriptArchive(PostgresRecords(args.server.rsplit("/", 1)[0] + f"/{name}"))
        print("postgres", await measure(database, stream))
        await database.close()
        with tempfile.TemporaryDirectory(prefix="callray-archive-bench-") as tmp:
            print("files   ", await measure(TranscriptArchive(FileRecords(tmp)), stream))
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m harness.archive_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="concurrent calls whose events interleave (default 300)")
    parser.add_argument("--events", type=int, default=30_000, help="events to store (default 30000)")
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a PostgreSQL where a scratch database may be created")
    asyncio.run(main(parser.parse_args()))
