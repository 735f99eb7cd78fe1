"""The archive on local disk: one JSON file per call, ``<directory>/<call_id>.json``.

For one machine (the laptop config): the files live on the node that runs the archive
consumer, so on a cluster use the PostgreSQL backend. Every write is atomic (temp file +
``os.replace``). Records are folded in place in the cache; a failed fold or write drops the
call from the cache, so the disk stays the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from cachetools import LRUCache

from callray.consumers.record import apply, caller_of, in_export, new_record, serialise
from callray.events import Event

_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,150}")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def record_filename(call_id: str) -> str:
    """A file name for any call id: itself when safe, else a sanitised form plus a hash."""
    if _SAFE.fullmatch(call_id):
        return f"{call_id}.json"
    digest = hashlib.sha256(call_id.encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', call_id)[:100]}-{digest}.json"


class FileRecords:
    """Records as files in ``directory``, the recently used ones cached in memory."""

    def __init__(self, directory: str | os.PathLike[str], *, cache_size: int = 1000):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cache: LRUCache[str, tuple[dict[str, Any], bytes]] = LRUCache(cache_size)  # record, digest of its file

    def path(self, call_id: str) -> Path:
        return self.directory / record_filename(call_id)

    async def update(self, events: dict[str, list[Event]]) -> list[dict[str, Any]]:
        """Fold each call's events into its record and write the records that changed."""
        return await asyncio.to_thread(self._update, events)

    async def get(self, call_id: str) -> dict[str, Any] | None:
        loaded = await asyncio.to_thread(self._load, call_id)
        return json.loads(json.dumps(loaded[0])) if loaded is not None else None  # a copy: the cached one is folded in place

    async def finalise(self, call_ids: list[str]) -> None:
        await asyncio.to_thread(self._finalise, call_ids)

    async def purge(self, ended_before: float) -> int:
        """Delete the records of calls that ended (or, never ended, were last written) before
        ``ended_before`` (unix seconds); returns how many."""
        return await asyncio.to_thread(self._purge, ended_before)

    async def page(self, since: float | None, after: str, limit: int) -> list[dict[str, Any]]:
        """Records in call id order after ``after`` that ended (or, never ended, started) at or
        after ``since``."""
        return await asyncio.to_thread(
            lambda: [r for r in self._scan() if r["call_id"] > after and in_export(r, since)][:limit])

    async def count(self, since: float | None) -> int:
        return await asyncio.to_thread(lambda: sum(in_export(r, since) for r in self._scan()))

    async def calls_of(self, callers: list[str]) -> list[str]:
        wanted = set(callers)
        return await asyncio.to_thread(lambda: [r["call_id"] for r in self._scan() if caller_of(r) in wanted])

    async def erase(self, call_id: str) -> bool:
        self._cache.pop(call_id, None)
        try:
            await asyncio.to_thread(self.path(call_id).unlink)
        except FileNotFoundError:
            return False
        return True

    async def close(self) -> None:
        self._cache.clear()

    def _scan(self) -> list[dict[str, Any]]:
        """Every record on disk, in call id order (a laptop's archive: a directory listing)."""
        records = []
        for path in self.directory.glob("*.json"):
            try:
                records.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return sorted(records, key=lambda r: r["call_id"])

    def _update(self, events: dict[str, list[Event]]) -> list[dict[str, Any]]:
        out = []
        for call_id, batch in events.items():
            record, written = self._load(call_id) or (new_record(call_id), None)
            with self._in_place(call_id):
                for event in batch:
                    apply(record, event)
                self._store(call_id, record, written)
            out.append(record)
        return out

    def _load(self, call_id: str) -> tuple[dict[str, Any], bytes] | None:
        """The record and the digest of its text on disk."""
        cached = self._cache.get(call_id)
        if cached is None:
            try:
                text = self.path(call_id).read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            cached = self._cache[call_id] = (json.loads(text), _digest(text))
        return cached

    @contextlib.contextmanager
    def _in_place(self, call_id: str) -> Iterator[None]:
        """Around a change to a cached record and its write: on any failure the call leaves the
        cache, so the disk stays the truth."""
        try:
            yield
        except BaseException:
            self._cache.pop(call_id, None)
            raise

    def _store(self, call_id: str, record: dict[str, Any], written: bytes | None) -> None:
        """Write ``record`` unless its text is what the disk holds (a redelivered event changes
        nothing): one serialising per write, no copy of the record to compare against."""
        text = serialise(record)
        digest = _digest(text)
        if digest != written:
            self._write(call_id, text)
        self._cache[call_id] = (record, digest)

    def _write(self, call_id: str, text: str) -> None:
        target = self.path(call_id)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)

    def _finalise(self, call_ids: list[str]) -> None:
        for call_id in call_ids:
            loaded = self._load(call_id)
            if loaded is not None and not loaded[0]["final"]:
                record, written = loaded
                with self._in_place(call_id):
                    record["final"] = True
                    self._store(call_id, record, written)

    def _purge(self, ended_before: float) -> int:
        purged = 0
        for path in self.directory.glob("*.json"):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                last = record.get("ended_at") or path.stat().st_mtime
            except (OSError, ValueError):
                continue
            if last < ended_before:
                path.unlink(missing_ok=True)
                self._cache.pop(record.get("call_id", ""), None)
                purged += 1
        return purged
