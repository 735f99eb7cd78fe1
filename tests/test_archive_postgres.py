"""The archive in a real PostgreSQL (the session's own database, see conftest.postgres_url):
the same records as the files backend under redelivery and reordering, no lost update between
two consumers, records a fresh process reads, retention, the schema's versions, and an outage
that delays archiving and loses nothing."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import uuid

import asyncpg
import pytest

from callray.consumers.archive import TranscriptArchive
from callray.consumers.archive_files import FileRecords
from callray.consumers.archive_postgres import SCHEMA, ArchiveUnavailableError, PostgresRecords, migrate
from callray.events import CallEnded, CallTurn
from callray.settings import PROJECT_DIR, ArchiveSettings
from callray.events.consume import consume
from callray.events.memory import MemoryBus
from tests.test_consumers import call_events


def unique(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_postgres_keeps_the_same_record_as_files_under_redelivery_and_reordering(postgres_url, tmp_path):
    call_id = unique()
    events = call_events(call_id)
    files = TranscriptArchive(FileRecords(tmp_path))
    for event in events:
        await files.handle(event)
    await files.flush()
    database = TranscriptArchive(PostgresRecords(postgres_url))
    deliveries = events + events[:4]  # at-least-once: some twice
    random.Random(5).shuffle(deliveries)
    for i, event in enumerate(deliveries):
        await database.handle(event)
        if i % 3 == 0:
            await database.flush()  # batches of every size, in any order
    await database.flush()
    assert await database.get(call_id) == await files.get(call_id)
    record = await database.get(call_id)
    assert [t["response_id"] for t in record["turns"]] == [1, 3, 4] and record["final"]
    await database.close()


async def test_two_consumers_writing_one_call_lose_no_turn(postgres_url):
    """Two archive processes get events of the same call at once (a consumer group shares the
    stream): the row lock serialises them, so neither overwrites the other's turns."""
    call_id = unique()
    a, b = (TranscriptArchive(PostgresRecords(postgres_url)) for _ in range(2))
    for rid in range(1, 41):
        archive = a if rid % 2 else b
        await archive.handle(CallTurn(call_id=call_id, seq=rid, response_id=rid, caller_text=f"q{rid}"))
        if rid % 4 == 0:
            await asyncio.gather(a.flush(), b.flush())
    await asyncio.gather(a.flush(), b.flush())
    record = await a.get(call_id)
    assert [t["response_id"] for t in record["turns"]] == list(range(1, 41))
    await a.close()
    await b.close()


async def test_a_fresh_process_serves_the_records_another_wrote(postgres_url):
    """The archive consumer restarted on another node: nothing of the old one's is needed."""
    call_id = unique()
    archive = TranscriptArchive(PostgresRecords(postgres_url))
    for event in call_events(call_id):
        await archive.handle(event)
    await archive.flush()
    await archive.close()
    script = ("import asyncio, json, sys\n"
              "from callray.consumers.archive_postgres import PostgresRecords\n"
              "print(json.dumps(asyncio.run(PostgresRecords(sys.argv[1]).get(sys.argv[2]))))\n")
    out = subprocess.run([sys.executable, "-c", script, postgres_url, call_id], cwd=PROJECT_DIR,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    record = json.loads(out)
    assert record["call_id"] == call_id and record["end_reason"] == "user_hangup" and len(record["turns"]) == 3


async def test_retention_purges_ended_calls_and_their_turns(postgres_url):
    records = PostgresRecords(postgres_url)
    archive = TranscriptArchive(records, retention_s=3600)
    old, recent, live = unique("old"), unique("recent"), unique("live")
    for call_id, ended_at in ((old, 1_000.0), (recent, None)):
        await archive.handle(CallTurn(call_id=call_id, seq=1, response_id=1, caller_text="hello"))
        await archive.handle(CallEnded(call_id=call_id, seq=2, ts=ended_at or 2e9, reason="user_hangup"))
    await archive.handle(CallTurn(call_id=live, seq=1, response_id=1))
    await archive.flush()
    assert await archive.purge() >= 1 and archive.counts["purged"] >= 1
    assert await archive.get(old) is None
    assert await archive.get(recent) is not None and await archive.get(live) is not None
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM callray_turns WHERE call_id = $1", old) == 0
    finally:
        await conn.close()
    await archive.close()


async def test_the_schema_migrates_once_and_refuses_a_newer_database(postgres_url):
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await migrate(conn) == len(SCHEMA)
        assert await migrate(conn) == len(SCHEMA)  # again: nothing to do
        assert await conn.fetchval("SELECT max(version) FROM callray_schema") == len(SCHEMA)
        await conn.execute("INSERT INTO callray_schema (version) VALUES ($1)", len(SCHEMA) + 1)
        with pytest.raises(RuntimeError, match="upgrade callray"):
            await migrate(conn)
        await conn.execute("DELETE FROM callray_schema WHERE version > $1", len(SCHEMA))
    finally:
        await conn.close()


def test_bad_archive_settings_name_the_field():
    with pytest.raises(ValueError, match="DATABASE_URL"):
        ArchiveSettings(backend="postgres", database_url="")
    with pytest.raises(ValueError, match="archive.database_url must be a postgresql:// URL"):
        PostgresRecords("mysql://secret@db/x")


class Cable:
    """A TCP relay between the archive and PostgreSQL that can be cut (every connection reset,
    new ones refused) and mended: a real network outage, PostgreSQL itself untouched."""

    def __init__(self, target_port: int):
        self.target_port, self.cut = target_port, False
        self.server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def sever(self) -> None:
        self.cut = True
        for writer in self._links:
            writer.transport.abort()
        self._links.clear()

    async def close(self) -> None:
        self.sever()
        self.server.close()


async def test_a_database_outage_delays_archiving_and_loses_nothing(postgres_url):
    """The database goes away mid-run: the archive's writes fail (naming the setting), the
    consumer retries before reading more, nothing is acked or dead-lettered, and once the
    database is back every event is archived."""
    port = int(postgres_url.rsplit(":", 1)[1].split("/")[0])
    cable = Cable(port)
    relayed = postgres_url.replace(f":{port}/", f":{await cable.start()}/")
    archive = TranscriptArchive(PostgresRecords(relayed, timeout_s=1.0))
    bus, stop, call_id = MemoryBus(claim_idle_ms=100, max_deliveries=2), asyncio.Event(), unique()
    loop = asyncio.create_task(consume(bus, "archive", "t", archive.handle, stop=stop, flush=archive.flush, block_ms=20))
    try:
        await bus.publish(CallTurn(call_id=call_id, seq=1, response_id=1, caller_text="before"))
        async with asyncio.timeout(10):
            while await archive.get(call_id) is None:
                await asyncio.sleep(0.05)
        cable.sever()
        with pytest.raises(ArchiveUnavailableError, match="archive.database_url"):
            await archive.get(call_id)
        for rid in range(2, 6):
            await bus.publish(CallTurn(call_id=call_id, seq=rid, response_id=rid, caller_text="during"))
        await asyncio.sleep(1.5)  # several failed writes, far past claim_idle_ms and max_deliveries
        assert bus.stats()["dead_lettered"] == 0
        cable.cut = False
        async with asyncio.timeout(15):
            while True:
                try:
                    record = await archive.get(call_id)
                except ArchiveUnavailableError:
                    record = None
                if record is not None and len(record["turns"]) == 5:
                    break
                await asyncio.sleep(0.1)
        assert [t["caller"] for t in record["turns"]] == ["before"] + ["during"] * 4
    finally:
        stop.set()
        await asyncio.wait_for(loop, 10)
        await archive.close()
        await cable.close()


# --------------------------------------------------------------------------- erasure and export, both backends


@pytest.fixture(params=["files", "postgres"])
def records(request, tmp_path, postgres_url):
    return FileRecords(tmp_path) if request.param == "files" else PostgresRecords(postgres_url)


async def test_a_caller_s_calls_are_found_by_number_or_keyed_hash_and_erased_with_their_turns(records):
    from callray.privacy import Redactor

    archive = TranscriptArchive(records)
    redactor = Redactor(caller_key="k")
    mine, mine_redacted, other = unique("mine"), unique("mine-r"), unique("other")
    for call_id, number, redact in ((mine, "+14155552671", False), (mine_redacted, "+14155552671", True),
                                    (other, "+14155550000", False)):
        for event in call_events(call_id):
            if isinstance(event, CallEnded) and event.call:
                event = event.model_copy(update={"call": {**event.call, "from_number": number}})
            await archive.handle(redactor.event(event) if redact else event)
    await archive.flush()
    found = await archive.calls_of(["+14155552671", redactor.caller_key("+14155552671")])
    assert sorted(found) == sorted([mine, mine_redacted])
    assert await archive.erase(mine) and not await archive.erase(mine)  # idempotent: the second finds nothing
    assert await archive.get(mine) is None and await archive.get(other) is not None
    assert await archive.calls_of(["+14155552671"]) == [] and archive.counts["erased"] == 1
    if isinstance(records, PostgresRecords):
        conn = await asyncpg.connect(records.url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM callray_turns WHERE call_id = $1", mine) == 0
        finally:
            await conn.close()
    await archive.close()


async def test_an_export_pages_through_the_records_since_a_time_in_call_id_order(records):
    archive = TranscriptArchive(records)
    prefix = unique("export")
    for i in range(7):
        for event in call_events(f"{prefix}-{i}"):
            if isinstance(event, CallEnded):  # calls 0-2 ended long ago, 3-6 recently
                event = event.model_copy(update={"ts": 1_000.0 if i < 3 else 2e9, "call": {}})
            await archive.handle(event)
    await archive.flush()
    since, after, got, total = 1e9, "", [], None
    while True:
        page = await archive.export(since, after, limit=2)
        total = page.get("total", total)
        got += [r for r in page["records"] if r["call_id"].startswith(prefix)]
        if page["next"] is None:
            break
        after = page["next"]
    assert [r["call_id"] for r in got] == [f"{prefix}-{i}" for i in range(3, 7)]
    assert all(len(r["turns"]) == 3 for r in got) and total >= 4
    everything = await archive.export(None, "", limit=1000)
    assert {f"{prefix}-{i}" for i in range(7)} <= {r["call_id"] for r in everything["records"]}
    await archive.close()


async def test_a_version_1_database_migrates_to_version_2_keeping_its_records(postgres_url):
    """The first shipped schema had ``from_number``; version 2 calls it ``caller`` (a number or a
    keyed hash). A database archived by the first release keeps its rows and finds its callers."""
    admin_url, name = postgres_url.rsplit("/", 1)[0] + "/postgres", f"callray_v1_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE TABLE callray_schema (version int NOT NULL)")
            await conn.execute(SCHEMA[0])
            await conn.execute("INSERT INTO callray_schema VALUES (1)")
            await conn.execute("INSERT INTO callray_calls (call_id, record, from_number) VALUES "
                               "('old-call', '{\"call_id\": \"old-call\", \"turns\": []}', '+14155552671')")
            assert await migrate(conn) == len(SCHEMA) >= 2
        finally:
            await conn.close()
        old = PostgresRecords(url)
        assert await old.calls_of(["+14155552671"]) == ["old-call"]
        await old.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_a_closed_runtime_leaves_no_connection_to_the_archive(postgres_url):
    """Closing the calls of a process closes its consumers too: before, the archive's pool stayed
    open (and a consumer actor left one behind each time its loop was rebuilt)."""
    from callray.runtime import CallsRuntime
    from callray.settings import CallraySettings

    database = postgres_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres_url)

    async def connections() -> int:
        return await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                                    database)

    try:
        before = await connections()
        runtime = await CallsRuntime.start(CallraySettings.parse(
            {"archive": {"backend": "postgres", "database_url": postgres_url}}), "closing")
        assert (await runtime.export(None, "", 10)) is not None  # the archive opened its pool
        assert await connections() > before
        await runtime.close()
        assert await connections() == before
    finally:
        await admin.close()
