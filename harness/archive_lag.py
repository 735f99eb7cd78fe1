"""How far the archive (PostgreSQL) runs behind the event stream under live calls.

Deploys ``config/event_driven.yaml`` on a private Redis, Ray and Serve with ``archive.backend:
postgres`` on a database of its own (created on ``--server``, dropped at the end), drives
``--calls`` concurrent Retell-shaped calls for ``--seconds`` (each ends with Retell's signed
``call_ended``), and samples twice a second how far the archive's consumer group is behind:
the entries it has not acknowledged (pending plus unread) and the age of the oldest of them,
which bounds how long any event waited to be archived. After the calls it reports how long the
archive took to catch up, and checks every heard turn is in the database.

``python -m harness.archive_lag --calls 300 --seconds 120 [--ingress proxy]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console

from callray.settings import PROJECT_DIR
from callray.sim.local import RedisServer
from callray.sim.simulator import SimConfig, run_simulation
from callray.stats import percentile
from callray.stores.redis_client import redis_client

STREAM = "callray:events"
GROUP = "archive"


def _ms(entry_id: bytes | str) -> int:
    return int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])


async def behind(client: Any) -> tuple[int, float]:
    """(entries the archive group has not acknowledged, age in seconds of the oldest of them)."""
    groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]: g
              for g in await client.xinfo_groups(STREAM)}
    group = groups.get(GROUP)
    if group is None:
        return 0, 0.0
    last = group["last-delivered-id"]
    unread = await client.xrange(STREAM, min=b"(" + (last if isinstance(last, bytes) else last.encode()),
                                 max="+", count=100_000)
    oldest = None
    if group["pending"]:
        first = (await client.xpending(STREAM, GROUP))["min"]  # None if acked since XINFO
        oldest = _ms(first) if first is not None else None
    if oldest is None and unread:
        oldest = _ms(unread[0][0])
    age = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
    return group["pending"] + len(unread), age


async def sample(client: Any, samples: list[dict[str, float]], stop: asyncio.Event, interval_s: float = 0.5) -> None:
    start = time.monotonic()
    while not stop.is_set():
        try:
            entries, age = await behind(client)
            samples.append({"t": round(time.monotonic() - start, 2), "entries": entries, "age_s": round(age, 3),
                            "stream": await client.xlen(STREAM)})
        except Exception as exc:  # a sample missed is not a result
            samples.append({"t": round(time.monotonic() - start, 2), "error": repr(exc)})
        await asyncio.sleep(interval_s)


async def caught_up(client: Any, timeout_s: float = 120.0) -> float | None:
    """Seconds until the archive group has acknowledged everything; None if it never does."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        with contextlib.suppress(Exception):  # one failed look is not the answer
            if (await behind(client))[0] == 0:
                return time.monotonic() - start
        await asyncio.sleep(0.2)
    return None


async def drive(url: str, http_base: str, webhook_key: str, options: argparse.Namespace, console: Console,
                database_url: str, redis_url: str) -> dict[str, Any]:
    client = redis_client(redis_url)
    samples: list[dict[str, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(client, samples, stop))
    call_s = options.turns * (options.think_s + 0.2)
    total = int(options.calls * (options.seconds / call_s + 2))
    config = SimConfig(url=url, calls=total, concurrency=options.calls, turns=options.turns, think_s=options.think_s,
                       ramp_s=10.0 * total / options.calls, duration_s=options.seconds, turn_timeout_s=20.0,
                       supersede_rate=0.1, reminder_rate=0.05, seed=5, call_id_prefix=f"lag-{uuid.uuid4().hex[:6]}",
                       webhook_url=f"{http_base}/webhook", webhook_key=webhook_key, processes=options.processes)
    console.log(f"{options.calls} calls at once for {options.seconds} s, {options.turns} turns each, "
                f"talk ~{options.think_s} s")
    result = await run_simulation(config)
    ended = time.monotonic()
    catch_up = await caught_up(client)
    stop.set()
    await sampler
    await client.aclose()
    heard: dict[str, set[int]] = {}
    ids = {c.call: c.call_id for c in result.calls}
    for turn in result.turns:
        heard.setdefault(ids[turn.call], set()).add(turn.response_id)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT call_id, response_id FROM callray_turns WHERE call_id = ANY($1::text[])",
                                list(heard))
    finally:
        await conn.close()
    stored: dict[str, set[int]] = {}
    for row in rows:
        stored.setdefault(row["call_id"], set()).add(row["response_id"])
    missing = sum(len(rids - stored.get(cid, set())) for cid, rids in heard.items())
    during = [s for s in samples if "error" not in s and s["t"] <= options.seconds]
    ages, entries = sorted(s["age_s"] for s in during), sorted(s["entries"] for s in during)
    summary = result.summary()
    return {
        "calls": len(heard), "turns": sum(len(r) for r in heard.values()), "turns_missing_in_archive": missing,
        "first_sentence_ms": summary["latency_ms"]["first_sentence_ms"], "violations": summary["violations"],
        "dropped": summary["dropped"],
        "archive_behind_s": {"p50": percentile(ages, 0.5), "p99": percentile(ages, 0.99), "max": ages[-1] if ages else None},
        "archive_behind_entries": {"p50": percentile(entries, 0.5), "p99": percentile(entries, 0.99),
                                   "max": entries[-1] if entries else None},
        "catch_up_after_calls_s": None if catch_up is None else round(catch_up, 2),
        "since_last_call_s": round(time.monotonic() - ended, 2),
        "samples": samples,
    }


def run(options: argparse.Namespace, console: Console) -> dict[str, Any]:
    from harness.targets import deploy_serve_target, ray_session

    tmp = Path(tempfile.mkdtemp(prefix="callray-lag-"))
    redis = RedisServer(tmp, log_path=tmp / "redis.log")
    name = f"callray_lag_{uuid.uuid4().hex[:8]}"
    admin = options.server.rsplit("/", 1)[0]
    database_url = f"{admin}/{name}"

    async def database(sql: str) -> None:
        conn = await asyncpg.connect(options.server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(database(f"CREATE DATABASE {name}"))
    os.chdir(PROJECT_DIR)
    try:
        redis.start()
        with ray_session(console, options.ingress) as port:
            key = secrets.token_hex(16)
            deployed = deploy_serve_target("event_driven", port, namespace=f"lag-{name}", redis_url=redis.url,
                                           webhook_key=key, archive={"backend": "postgres", "database_url": database_url})
            try:
                report = asyncio.run(drive(deployed.url, deployed.http_base, key, options, console, database_url,
                                           redis.url))
            finally:
                deployed.teardown()
    finally:
        redis.stop()
        asyncio.run(database(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls at once (default 300)")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long calls are placed (default 120)")
    parser.add_argument("--turns", type=int, default=6, help="caller turns per call (default 6)")
    parser.add_argument("--think-s", type=float, default=1.5, help="mean caller talk time per turn (default 1.5)")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument("--server", default=os.environ.get("CALLRAY_TEST_DATABASE_URL",
                                                           "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="a PostgreSQL where a database may be created (default: the local one)")
    parser.add_argument("--ingress", choices=("proxy", "haproxy"), default="haproxy",
                        help="Serve's ingress (default haproxy, the shipped configs')")
    parser.add_argument("--out", type=Path, help="write the report (with every sample) as JSON here")
    options = parser.parse_args(argv)
    console = Console()
    report = {"ingress": options.ingress, **run(options, console)}
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(report, indent=2))
    console.print_json(json.dumps({k: v for k, v in report.items() if k != "samples"}))
    return 0 if not report["turns_missing_in_archive"] and not report["violations"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
