"""The archive in PostgreSQL: a row per call and a row per turn, shared by every node.

``callray_calls`` holds each call's record without its turns (plus the columns retention and
erasure look up: the caller (``record.caller_of``), when the call ended); ``callray_turns`` one row per
``(call_id, response_id)``. An update locks the calls it touches (``SELECT ... FOR UPDATE``, in
call id order, so two consumers never deadlock), loads only the turns its events name, folds the
events in (``record.apply``: the record is a function of the set of events, so a redelivered
batch changes nothing) and writes both back in the same transaction.

The schema is versioned in ``callray_schema`` and migrated by callray itself (``SCHEMA``, applied
in order under an advisory lock): two tables do not need a migration tool and its ORM.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from callray.consumers.record import apply, caller_of, new_record
from callray.events import CallTurn, Event

#: Version n of the schema is ``SCHEMA[n - 1]``; a database is brought to the last one at connect.
SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE callray_calls (
        call_id text PRIMARY KEY,
        record jsonb NOT NULL,
        from_number text,
        ended_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX callray_calls_from_number ON callray_calls (from_number);
    CREATE INDEX callray_calls_ended_at ON callray_calls (ended_at);
    CREATE INDEX callray_calls_updated_at ON callray_calls (updated_at);
    CREATE TABLE callray_turns (
        call_id text NOT NULL REFERENCES callray_calls ON DELETE CASCADE,
        response_id bigint NOT NULL,
        turn jsonb NOT NULL,
        PRIMARY KEY (call_id, response_id)
    );
    """,
    # 2: with privacy.redact the caller is found by the keyed hash of their number, not the number
    """
    ALTER TABLE callray_calls RENAME COLUMN from_number TO caller;
    ALTER INDEX callray_calls_from_number RENAME TO callray_calls_caller;
    """,
)

#: What a database that cannot answer raises (refused, reset, timed out, shutting down...).
DOWN = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class ArchiveUnavailableError(RuntimeError):
    """The archive database did not answer; the events stay pending and come back."""


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the database to the last schema version; returns it. Refuses a newer database."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('callray_schema'))")
        await conn.execute("CREATE TABLE IF NOT EXISTS callray_schema (version int NOT NULL)")
        version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM callray_schema")
        if version > len(SCHEMA):
            raise RuntimeError(f"the archive database has schema version {version}; this callray knows up to "
                               f"{len(SCHEMA)}: upgrade callray")
        for number, sql in enumerate(SCHEMA[version:], version + 1):
            await conn.execute(sql)
            await conn.execute("INSERT INTO callray_schema (version) VALUES ($1)", number)
    return len(SCHEMA)


class PostgresRecords:
    """Records in PostgreSQL at ``url`` through a pool of at most ``pool_size`` connections,
    each query bounded by ``timeout_s``. The pool opens (and the schema migrates) on first use,
    so an archive started while the database is down starts anyway and catches up."""

    def __init__(self, url: str, *, pool_size: int = 4, timeout_s: float = 5.0, setting: str = "archive.database_url"):
        if not url.startswith(("postgres://", "postgresql://")):
            raise ValueError(f"{setting} must be a postgresql:// URL (got a value starting {url[:12]!r})")
        self.url, self.pool_size, self.timeout_s, self.setting = url, pool_size, timeout_s, setting
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def update(self, events: dict[str, list[Event]]) -> list[dict[str, Any]]:
        """Fold each call's events into its stored record in one transaction; returns the
        records (their ``turns`` only the ones the events touched)."""
        call_ids = sorted(events)
        turn_keys = sorted({(e.call_id, e.response_id) for batch in events.values() for e in batch
                            if isinstance(e, CallTurn)})

        async def run(conn: asyncpg.Connection) -> list[dict[str, Any]]:
            await conn.execute("INSERT INTO callray_calls (call_id, record) SELECT id, '{}'::jsonb "
                               "FROM unnest($1::text[]) AS id ORDER BY id ON CONFLICT DO NOTHING", call_ids)
            rows = await conn.fetch("SELECT call_id, record FROM callray_calls WHERE call_id = ANY($1::text[]) "
                                    "ORDER BY call_id FOR UPDATE", call_ids)
            records = {r["call_id"]: json.loads(r["record"]) or new_record(r["call_id"]) for r in rows}
            for record in records.values():
                record["turns"] = []
            if turn_keys:
                for row in await conn.fetch(
                        "SELECT t.call_id, t.turn FROM callray_turns t JOIN unnest($1::text[], $2::bigint[]) "
                        "AS k(call_id, response_id) USING (call_id, response_id) ORDER BY t.response_id",
                        [k[0] for k in turn_keys], [k[1] for k in turn_keys]):
                    records[row["call_id"]]["turns"].append(json.loads(row["turn"]))
            for call_id, batch in events.items():
                for event in batch:
                    apply(records[call_id], event)
            calls = list(records.items())
            await conn.execute(
                "UPDATE callray_calls c SET record = u.record::jsonb, caller = u.caller, "
                "ended_at = to_timestamp(u.ended_at), updated_at = now() "
                "FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) AS u(call_id, record, caller, ended_at) "
                "WHERE c.call_id = u.call_id",
                [cid for cid, _ in calls], [json.dumps({k: v for k, v in r.items() if k != "turns"}) for _, r in calls],
                [caller_of(r) for _, r in calls], [r["ended_at"] for _, r in calls])
            turns = [(cid, t) for cid, r in calls for t in r["turns"]]
            if turns:
                await conn.execute(
                    "INSERT INTO callray_turns (call_id, response_id, turn) "
                    "SELECT * FROM unnest($1::text[], $2::bigint[], $3::jsonb[]) "
                    "ON CONFLICT (call_id, response_id) DO UPDATE SET turn = excluded.turn",
                    [cid for cid, _ in turns], [t["response_id"] for _, t in turns], [json.dumps(t) for _, t in turns])
            return list(records.values())

        return await self._transaction("archiving", run)

    async def get(self, call_id: str) -> dict[str, Any] | None:
        records = await self._transaction("reading a record", lambda conn: self._records(conn, [call_id]))
        return records[0] if records else None

    async def page(self, since: float | None, after: str, limit: int) -> list[dict[str, Any]]:
        """Records in call id order after ``after`` that ended (or, never ended, started) at or
        after ``since``."""
        async def run(conn: asyncpg.Connection) -> list[dict[str, Any]]:
            ids = [r["call_id"] for r in await conn.fetch(
                "SELECT call_id FROM callray_calls WHERE call_id > $1 AND record <> '{}'::jsonb AND ($2::float8 IS NULL "
                "OR coalesce(ended_at, to_timestamp((record->>'started_at')::float8)) >= to_timestamp($2)) "
                "ORDER BY call_id LIMIT $3", after, since, limit)]
            return await self._records(conn, ids)

        return await self._transaction("exporting", run)

    async def count(self, since: float | None) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            return await conn.fetchval(
                "SELECT count(*) FROM callray_calls WHERE record <> '{}'::jsonb AND ($1::float8 IS NULL OR "
                "coalesce(ended_at, to_timestamp((record->>'started_at')::float8)) >= to_timestamp($1))", since)

        return await self._transaction("counting", run)

    async def calls_of(self, callers: list[str]) -> list[str]:
        async def run(conn: asyncpg.Connection) -> list[str]:
            rows = await conn.fetch("SELECT call_id FROM callray_calls WHERE caller = ANY($1::text[]) ORDER BY call_id",
                                    callers)
            return [r["call_id"] for r in rows]

        return await self._transaction("finding a caller's calls", run)

    async def erase(self, call_id: str) -> bool:
        async def run(conn: asyncpg.Connection) -> bool:
            return (await conn.execute("DELETE FROM callray_calls WHERE call_id = $1", call_id)) != "DELETE 0"

        return await self._transaction("erasing", run)

    @staticmethod
    async def _records(conn: asyncpg.Connection, call_ids: list[str]) -> list[dict[str, Any]]:
        """The records of these calls with all their turns, in the order given."""
        rows = await conn.fetch("SELECT call_id, record FROM callray_calls WHERE call_id = ANY($1::text[])", call_ids)
        found = {r["call_id"]: json.loads(r["record"]) for r in rows}
        records = {cid: found[cid] for cid in call_ids if found.get(cid)}
        for record in records.values():
            record["turns"] = []
        for row in await conn.fetch("SELECT call_id, turn FROM callray_turns WHERE call_id = ANY($1::text[]) "
                                    "ORDER BY response_id", list(records)):
            records[row["call_id"]]["turns"].append(json.loads(row["turn"]))
        return list(records.values())

    async def finalise(self, call_ids: list[str]) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute("UPDATE callray_calls SET record = jsonb_set(record, '{final}', 'true') "
                               "WHERE call_id = ANY($1::text[]) AND record <> '{}'::jsonb", call_ids)

        await self._transaction("finalising", run)

    async def purge(self, ended_before: float) -> int:
        """Delete the records (and turns) of calls that ended, or were last written if they never
        ended, before ``ended_before`` (unix seconds); returns how many."""
        async def run(conn: asyncpg.Connection) -> int:
            status = await conn.execute(
                "DELETE FROM callray_calls WHERE coalesce(ended_at, updated_at) < to_timestamp($1)", ended_before)
            return int(status.split()[-1])

        return await self._transaction("purging", run)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _transaction(self, what: str, run: Any) -> Any:
        try:
            pool = await self._open()
            async with pool.acquire() as conn, conn.transaction():
                return await run(conn)
        except DOWN as exc:
            raise ArchiveUnavailableError(f"archive database ({self.setting}): {what} failed: "
                                          f"{exc.__class__.__name__}: {exc}") from exc

    async def _open(self) -> asyncpg.Pool:
        async with self._opening:
            if self._pool is None:
                pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size,
                                                 timeout=self.timeout_s, command_timeout=self.timeout_s)
                try:
                    async with pool.acquire() as conn:
                        await migrate(conn)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
            return self._pool
