"""Chaos suite: Retell-style calls keep talking while the processes under them are killed.

While the simulator drives N calls against callray in the distributed (durable) or the
event-driven architecture, a fault injector, on a schedule:

* SIGKILLs a gateway replica process, and with it the calls activated there (Serve starts a
  new one; the sockets it held drop with 1006 and the simulator reconnects with the same
  call_id, as Retell does; the calls re-activate from Redis on whichever replica takes them);
* kills an event consumer actor (event-driven: analytics, archive or escalation);
* restarts Redis (stop, then start on the same port and data dir, appendonly).

The report counts turns sent / answered / lost (asked and never completed: a superseded or
re-asked request is not lost, its turn is answered by the later id), calls dropped for good,
events lost or duplicated (event-driven) and, per fault, the time to recover: from the fault
to the next completed turn of each call it affected. Goal: zero lost turns, zero dropped calls.

``python -m harness.chaos --help`` runs it standalone: a private local Ray, Serve on a free port
and a private redis-server, each stopped by its pid or handle on every exit path.
``run_chaos`` is the reusable part (``tests/test_chaos.py`` runs it on the session's Ray).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from callray.settings import PROJECT_DIR
from callray.stats import percentile
from callray.sim.local import RedisServer
from callray.sim.report import SimResult, describe
from callray.sim.simulator import SimConfig, SimObserver, run_simulation
from harness.targets import read_json

FaultKind = Literal["gateway", "consumer", "redis", "stall"]
FAULT_KINDS: tuple[str, ...] = ("gateway", "consumer", "redis", "stall")
CONSUMER_KINDS = ("analytics", "archive", "escalation")
#: Retell reconnects up to 4 times after an abnormal close (retell-protocol.md §1).
RETELL_DROP_RECONNECTS = 4


class FaultPlan(BaseModel):
    """When to inject which fault: every ``<kind>_every_s`` seconds (0: never), or an explicit schedule."""

    model_config = ConfigDict(extra="forbid")

    gateway_every_s: float = Field(15.0, ge=0, description="SIGKILL a gateway replica process this often (0: never).")
    consumer_every_s: float = Field(0.0, ge=0, description="Kill an event consumer actor this often (event-driven).")
    redis_every_s: float = Field(0.0, ge=0, description="Restart Redis (stop, start, same port) this often.")
    stall_every_s: float = Field(0.0, ge=0, description="Freeze Redis (SIGSTOP, then SIGCONT) this often.")
    stall_s: float = Field(10.0, gt=0, description="Seconds Redis stays frozen in a stall.")
    first_after_s: float = Field(4.0, ge=0, description="No fault before this many seconds into the run.")
    until_s: float = Field(60.0, gt=0, description="No fault after this many seconds into the run.")
    redis_down_s: float = Field(1.0, ge=0, description="Seconds Redis stays down on a restart.")
    schedule: list[tuple[float, FaultKind]] | None = Field(
        None, description="Explicit (seconds into the run, kind) pairs; replaces the intervals.")
    seed: int = Field(1, description="Seed of the random picks (which replica, which consumer).")

    def timeline(self) -> list[tuple[float, str]]:
        """The faults in time order. Interval faults of different kinds are staggered by a
        fraction of their interval so two never land at the same instant."""
        if self.schedule is not None:
            return sorted(self.schedule)
        out: list[tuple[float, str]] = []
        for k, kind in enumerate(FAULT_KINDS):
            every = getattr(self, f"{kind}_every_s")
            if every <= 0:
                continue
            t = self.first_after_s + every * k / (2 * len(FAULT_KINDS))
            while t <= self.until_s:
                out.append((round(t, 3), kind))
                t += every
        return sorted(out)


class Restartable(Protocol):
    proc: Any  # the server process (SIGSTOPped in a stall)

    def restart(self, down_s: float = 0.0) -> None: ...


@dataclass
class ChaosTarget:
    """A deployed callray application and the handles the injector needs to hurt it."""

    url: str  # WebSocket base, e.g. ws://127.0.0.1:8000/distributed/llm-websocket
    app: str  # Serve application name (consumer actor names derive from it)
    namespace: str  # Ray namespace of the consumers
    redis: Restartable | None = None  # for redis faults
    redis_url: str | None = None  # event-driven: read the stream to find lost or duplicated events
    stream: str | None = None
    http_base: str | None = None  # event-driven: GET {http_base}/analytics


def chaos_target(name: str, deployed: Any, namespace: str, redis: RedisServer,
                 agent_file: Path | None = None) -> ChaosTarget:
    """The handles to hurt the deployed callray target ``name`` and to read what it recorded."""
    from callray.settings import CallraySettings
    from harness.targets import CALLRAY_TARGETS, callray_args

    settings = CallraySettings.parse(callray_args(name, namespace=namespace, redis_url=redis.url, agent_file=agent_file),
                                     source=CALLRAY_TARGETS[name][0])
    event_driven = settings.events.backend == "redis_streams"
    return ChaosTarget(url=deployed.url, app=name, namespace=namespace, redis=redis,
                       redis_url=redis.url if event_driven else None,
                       stream=settings.events.stream if event_driven else None, http_base=deployed.http_base)


@dataclass
class Fault:
    kind: str
    at: float  # unix time the fault was injected
    target: str = ""
    took_s: float = 0.0
    error: str | None = None


@dataclass
class SocketOpen:
    call_id: str
    at: float  # unix time the (re)connect started
    reconnect: bool
    ok: bool


class SocketLog(SimObserver):
    """Every socket the simulator opens, with the time and whether it was a reconnect: the
    simulator reports reconnect counts, not times; this attributes each reconnect to the
    gateway fault before it."""

    def __init__(self) -> None:
        self.opens: list[SocketOpen] = []

    def socket_opened(self, call_id: str, at: float, reconnect: bool, ok: bool) -> None:
        self.opens.append(SocketOpen(call_id, at, reconnect, ok))


# ====================================================================== faults


def gateway_replica_pids(app: str) -> list[int]:
    """Process ids of ``app``'s live gateway replicas (each replica actor is asked its pid)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"{app}#CallGateway" in a["name"]]
    pids = []
    for name in names:
        try:
            handle = ray.get_actor(name, namespace="serve")
            pids.append(ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=5))
        except Exception:  # a replica that is dying or not started yet
            continue
    return pids


class FaultInjector:
    """Injects one fault at a time (Ray calls are blocking: run in a worker thread)."""

    def __init__(self, target: ChaosTarget, plan: FaultPlan):
        self.target, self.plan = target, plan
        self.rng = random.Random(plan.seed)

    async def inject(self, kind: str) -> Fault:
        fault = Fault(kind=kind, at=time.time())
        try:
            fault.target = await asyncio.to_thread(getattr(self, f"_{kind}"))
        except Exception as exc:  # a fault that could not be injected is reported, not fatal
            fault.error = f"{exc.__class__.__name__}: {exc}"
        fault.took_s = round(time.time() - fault.at, 3)
        return fault

    def _gateway(self) -> str:
        pids = gateway_replica_pids(self.target.app)
        if not pids:
            raise RuntimeError(f"no live gateway replica of {self.target.app!r}")
        pid = self.rng.choice(pids)
        os.kill(pid, signal.SIGKILL)
        return f"replica pid {pid}"

    def _consumer(self) -> str:
        import ray

        kind = self.rng.choice(CONSUMER_KINDS)
        name = f"{self.target.app}-{kind}"
        ray.kill(ray.get_actor(name, namespace=self.target.namespace), no_restart=False)
        return name

    def _redis(self) -> str:
        if self.target.redis is None:
            raise RuntimeError("this target has no restartable Redis")
        self.target.redis.restart(self.plan.redis_down_s)
        return "redis-server"

    def _stall(self) -> str:
        """Freeze Redis for ``stall_s``: connections stay open and nothing answers (a stalled
        host, a paused VM), the case a restart does not show."""
        if self.target.redis is None:
            raise RuntimeError("this target has no Redis of its own to freeze")
        pid = self.target.redis.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(self.plan.stall_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"redis-server frozen {self.plan.stall_s:g} s"


# ====================================================================== the run


async def inject_faults(target: ChaosTarget, plan: FaultPlan, faults: list[Fault], run: asyncio.Future,
                        console: Console | None = None) -> None:
    """Inject ``plan``'s faults at their times (seconds from now) while ``run`` goes on, recording
    each in ``faults``; none is started once ``run`` is done (one under way completes)."""
    injector, started = FaultInjector(target, plan), time.time()
    for at, kind in plan.timeline():
        await asyncio.wait([run], timeout=max(0.0, started + at - time.time()))
        if run.done():
            return
        fault = await injector.inject(kind)
        faults.append(fault)
        if console:
            console.log(f"fault {len(faults)}: {kind} {fault.target or ''} at {fault.at - started:.1f} s"
                        + (f" [red]failed: {fault.error}[/]" if fault.error else ""))


async def run_chaos(target: ChaosTarget, sim: SimConfig, plan: FaultPlan,
                    console: Console | None = None) -> dict[str, Any]:
    """Drive ``sim`` against ``target`` while injecting ``plan``'s faults; returns the report."""
    sim = sim.model_copy(update={"url": target.url})
    if sim.run_id is None:
        sim = sim.model_copy(update={"run_id": f"{random.getrandbits(32):08x}"})
    faults: list[Fault] = []
    analytics_before = await asyncio.to_thread(_analytics_turns, target)
    sockets = SocketLog()
    sim_task = asyncio.create_task(run_simulation(sim, observer=sockets))
    await inject_faults(target, plan, faults, sim_task, console)
    result = await sim_task
    events = None
    if target.stream and target.redis_url:
        events = await check_events(target, result, analytics_before)
    return chaos_report(result, faults, sockets.opens, target, plan, events)


# ====================================================================== the report


def _completions(result: SimResult) -> dict[str, list[float]]:
    """Unix completion times of each call's answered turns."""
    ids = {c.call: c.call_id for c in result.calls}
    out: dict[str, list[float]] = {c.call_id: [] for c in result.calls}
    for t in result.turns:
        out[ids[t.call]].append(result.started_at + t.t_s + t.complete_ms / 1000)
    return {k: sorted(v) for k, v in out.items()}


def _affected(fault: Fault, faults: list[Fault], result: SimResult, opens: list[SocketOpen],
              target: ChaosTarget) -> list[str]:
    """The calls a fault hit: the calls that reconnected after a gateway kill (before the next
    one), every call for Redis; none for a consumer."""
    if fault.error:
        return []
    call_ids = [c.call_id for c in result.calls]
    if fault.kind == "gateway":
        later = [f.at for f in faults if f.kind == "gateway" and f.at > fault.at]
        until = min(later, default=float("inf"))
        return sorted({o.call_id for o in opens if o.reconnect and fault.at <= o.at < until})
    if fault.kind in ("redis", "stall"):
        return call_ids
    return []


def fault_recovery(fault: Fault, faults: list[Fault], result: SimResult, opens: list[SocketOpen],
                   target: ChaosTarget) -> dict[str, Any]:
    """Time from the fault to the next completed turn of each affected call that was live then."""
    completions = _completions(result)
    calls = {c.call_id: c for c in result.calls}
    affected = _affected(fault, faults, result, opens, target)
    hit = {c.call for c in result.calls if c.call_id in affected}
    opened = {c.call_id: result.started_at + c.t_s for c in result.calls}
    planned = result.config.get("turns", 0)
    times, unrecovered = [], []
    for call_id in affected:
        if opened[call_id] > fault.at:
            continue  # placed after the fault
        after = [t for t in completions[call_id] if t >= fault.at]
        if after:
            times.append(after[0] - fault.at)
        elif calls[call_id].ended.startswith("dropped") or calls[call_id].turns_answered < planned:
            unrecovered.append(call_id)  # live at the fault and never answered again
    inflight = [t for t in result.turns if t.call in hit
                and result.started_at + t.t_s < fault.at < result.started_at + t.t_s + t.complete_ms / 1000]
    during = None
    if fault.kind == "stall":  # what the callers heard while Redis was frozen
        window = [t for t in result.turns if fault.at <= result.started_at + t.t_s <= fault.at + fault.took_s]
        during = {"turns": len(window),
                  "first_speech_ms": describe([min(x for x in (t.holding_ms, t.first_chunk_ms) if x is not None)
                                               for t in window if t.holding_ms is not None or t.first_chunk_ms is not None]),
                  "first_chunk_ms": describe([t.first_chunk_ms for t in window if t.first_chunk_ms is not None])}
    return {
        "kind": fault.kind, "t_s": round(fault.at - result.started_at, 2), "target": fault.target,
        "error": fault.error, "affected_calls": len(times) + len(unrecovered), "recovered": len(times),
        "not_recovered": unrecovered,
        "recovery_s": {"p50": round(statistics.median(times), 3) if times else None,
                       "p99": round(percentile(sorted(times), 0.99), 3) if times else None,
                       "max": round(max(times), 3) if times else None},
        "recovery_times_s": [round(t, 3) for t in times],
        "inflight_recovery_s": sorted(round(result.started_at + t.t_s + t.complete_ms / 1000 - fault.at, 3)
                                      for t in inflight),
        "during": during,
        "inflight_turns": len(inflight),
        "inflight_complete_ms_max": round(max((t.complete_ms for t in inflight), default=0), 1) or None,
    }


def chaos_report(result: SimResult, faults: list[Fault], opens: list[SocketOpen], target: ChaosTarget,
                 plan: FaultPlan, events: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chaos run's numbers: turns, drops, per-fault recovery, events (JSON-able)."""
    counts = result.counts
    sent, answered = counts.get("turns_sent", 0), counts.get("turns_answered", 0)
    planned = result.config.get("turns", 0)
    per_fault = [fault_recovery(f, faults, result, opens, target) for f in faults]
    recovery = [f["recovery_s"]["max"] for f in per_fault if f["recovery_s"]["max"] is not None]
    gateway_recovery = sorted(t for f in per_fault if f["kind"] == "gateway" for t in f["recovery_times_s"])
    interrupted = sorted(t for f in per_fault if f["kind"] == "gateway" for t in f["inflight_recovery_s"])
    lost = sent - answered
    summary = {
        "ok": lost == 0 and not result.dropped and not (events and (events["lost"] or events["unconsumed"])),
        "calls": counts.get("calls", 0),
        "turns_sent": sent,
        "turns_answered": answered,
        "turns_lost": lost,
        "calls_with_unanswered_turns": sum(1 for c in result.calls
                                           if c.turns_answered < planned and c.ended != "end_call"),
        "calls_dropped_for_good": sum(result.dropped.values()),
        "dropped_by_reason": result.dropped,
        "reconnects": counts.get("reconnects", 0),
        "faults": dict(Counter(f.kind for f in faults)),
        "faults_failed": sum(1 for f in faults if f.error),
        "recovery_s_max": round(max(recovery), 3) if recovery else None,
        "recovery_s_p50_of_faults": round(statistics.median(recovery), 3) if recovery else None,
        # per call a replica kill dropped: the kill -> its next answered turn (the caller's talk time included)
        "turn_recovery_s_after_replica_kills": describe(gateway_recovery),
        # per turn a kill cut (asked before it, answered after it on the new socket): the kill -> its answer
        "interrupted_turn_recovery_s": describe(interrupted),
        "violations": result.violations,
        "warnings": result.warnings,
        "examples": result.examples,
        "latency_ms": {m: describe(v) for m, v in result.samples().items()},
    }
    return {
        "summary": summary,
        "faults": per_fault,
        "events": events,
        "target": {"url": target.url, "app": target.app, "event_driven": bool(target.stream)},
        "plan": plan.model_dump(mode="json"),
        "sim": result.summary(),
        "sockets": [asdict(o) for o in opens if o.reconnect],
    }


# ====================================================================== events (event-driven)


def _analytics_turns(target: ChaosTarget) -> int | None:
    """``overall.turns`` from the analytics endpoint (None without one)."""
    if not target.http_base or not target.stream:
        return None
    snapshot = read_json(f"{target.http_base}/analytics")
    if snapshot is None:
        raise RuntimeError(f"{target.http_base}/analytics did not answer")
    return int(snapshot["overall"]["turns"])


async def check_events(target: ChaosTarget, result: SimResult, analytics_before: int | None,
                       settle_s: float = 30.0) -> dict[str, Any]:
    """Compare what the caller heard with what the event stream and analytics recorded.

    Method: every turn the simulator saw completed is a (call_id, response_id). The stream is
    read in full (XRANGE) and its ``call.turn`` events of this run's calls are grouped by
    (call_id, response_id) and by (call_id, seq). *Lost*: a completed turn with no
    ``call.turn`` event. *Duplicated*: a (call_id, seq) published more than once (at-least-once
    publishing; consumers dedupe on it) or a (call_id, response_id) under two different seqs
    (a turn emitted twice: analytics would count it twice). *Analytics*: the ``/analytics``
    turn counter's growth over the run must equal the distinct turn events of the run (the
    deployment serves nothing else meanwhile); it is polled until it stops moving. Consumer
    groups must end with no unread and no pending entries (``unconsumed``).
    """
    import redis

    prefix = f"{result.config['call_id_prefix']}-{result.config['run_id']}-"
    ids = {c.call: c.call_id for c in result.calls}
    heard = {(ids[t.call], t.response_id) for t in result.turns}
    client = redis.Redis.from_url(target.redis_url, decode_responses=True)
    try:
        deadline = time.monotonic() + settle_s
        while True:  # the replicas publish in the background: wait until every heard turn is on the stream
            by_seq: Counter[tuple[str, int]] = Counter()
            by_rid: dict[tuple[str, int], set[int]] = {}
            cursor = "-"
            while True:
                entries = client.xrange(target.stream, min=cursor, count=2000)
                for entry_id, fields in entries:
                    event = json.loads(fields.get("event", "{}"))
                    if not str(event.get("call_id", "")).startswith(prefix):
                        continue
                    by_seq[(event["call_id"], event.get("seq", -1))] += 1
                    if event.get("type") == "call.turn":
                        by_rid.setdefault((event["call_id"], event["response_id"]), set()).add(event.get("seq", -1))
                if len(entries) < 2000:
                    break
                cursor = "(" + entries[-1][0]
            lost = sorted(heard - set(by_rid))
            if not lost or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        turn_seqs = {(cid, s) for (cid, _), seqs in by_rid.items() for s in seqs}
        analytics_delta, stable = None, 0
        while analytics_before is not None:
            now = await asyncio.to_thread(_analytics_turns, target)
            delta = now - analytics_before
            stable = stable + 1 if delta == analytics_delta else 0
            analytics_delta = delta
            if delta == len(turn_seqs) or stable >= 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        groups = await _settled_groups(client, target.stream, deadline)
    finally:
        client.close()
    return {
        "method": "stream call.turn events of this run vs turns the simulator saw completed; "
                  "/analytics turns growth vs distinct turn events",
        "turns_heard": len(heard),
        "turn_events": len(turn_seqs),
        "lost": len(lost),
        "lost_examples": [f"{cid} response {rid}" for cid, rid in lost[:5]],
        "republished": sum(n - 1 for n in by_seq.values() if n > 1),
        "turns_emitted_twice": sum(1 for seqs in by_rid.values() if len(seqs) > 1),
        "extra_turn_events": len(set(by_rid) - heard),  # completed server-side, abandoned by the caller
        "analytics_turns_delta": analytics_delta,
        "analytics_missing": None if analytics_delta is None else len(turn_seqs) - analytics_delta,
        "groups": groups,
        "unconsumed": sum(g["lag"] + g["pending"] for g in groups.values()),
    }


def pending_entries(client: Any, stream: str, group: str, count: int = 10) -> list[dict[str, Any]]:
    """What ``group`` still has pending (up to ``count``): each entry's event type, its consumer,
    how often it was delivered and how long ago. ``client`` decodes responses."""
    out = []
    for p in client.xpending_range(stream, group, min="-", max="+", count=count):
        entry = client.xrange(stream, p["message_id"], p["message_id"])
        out.append({"type": entry[0][1].get("type", "?") if entry else "(trimmed)", "consumer": p["consumer"],
                    "deliveries": p["times_delivered"], "idle_ms": p["time_since_delivered"]})
    return out


async def _settled_groups(client: Any, stream: str, deadline: float) -> dict[str, dict[str, int]]:
    """Per consumer group: entries never delivered (``lag``: counted after the group's last
    delivered id, not Redis's own ``lag`` counter, which can drift after a restart) and
    delivered but not acknowledged (``pending``), waited on until both are 0 or the deadline."""
    while True:
        last = client.xinfo_stream(stream)["last-generated-id"]
        groups = {g["name"]: {"lag": 0 if g["last-delivered-id"] == last else
                              len(client.xrange(stream, min="(" + g["last-delivered-id"], count=1_000_000)),
                              "redis_lag": g.get("lag"), "pending": int(g.get("pending") or 0)}
                  for g in client.xinfo_groups(stream)}
        if all(g["lag"] == 0 and g["pending"] == 0 for g in groups.values()) or time.monotonic() > deadline:
            for name, g in groups.items():
                if g["pending"]:
                    g["pending_entries"] = pending_entries(client, stream, name)
            return groups
        await asyncio.sleep(1)


# ====================================================================== output


def print_report(report: dict[str, Any], console: Console) -> None:
    s = report["summary"]
    table = Table(title="chaos: faults and recovery", title_justify="left")
    for col in ("#", "fault", "t (s)", "target", "hit", "ok", "rec p50 s", "rec max s", "inflight", "max ms"):
        table.add_column(col, justify="left" if col in ("fault", "target") else "right")
    for i, f in enumerate(report["faults"], 1):
        name = (f["target"] or "").removeprefix(report["target"]["app"] + "-").removeprefix("replica ")
        table.add_row(str(i), f["kind"], f"{f['t_s']:.1f}", name + (f" [red]{f['error']}[/]" if f["error"] else ""),
                      str(f["affected_calls"]), str(f["recovered"]), _fmt(f["recovery_s"]["p50"]),
                      _fmt(f["recovery_s"]["max"]), str(f["inflight_turns"]), _fmt(f["inflight_complete_ms_max"]))
    console.print(table)
    console.print("hit: calls the fault affected (the calls that reconnected after a gateway kill; "
                  "all for Redis). rec: fault to the next completed turn of each hit call (includes the caller's "
                  "talk time). inflight: turns of hit calls asked before and answered after the fault; max ms: their slowest.",
                  style="dim")
    totals = Table(title="chaos: totals", title_justify="left", show_header=False)
    totals.add_column(justify="left")
    totals.add_column(justify="right")
    rows = [("calls", s["calls"]), ("turns sent", s["turns_sent"]), ("turns answered", s["turns_answered"]),
            ("turns lost", s["turns_lost"]), ("calls dropped for good", s["calls_dropped_for_good"]),
            ("reconnects", s["reconnects"]), ("faults injected", ", ".join(f"{k} {v}" for k, v in s["faults"].items())),
            ("recovery max (s)", _fmt(s["recovery_s_max"])),
            ("kill -> next answered turn p50 / p99 (s)", f"{_fmt(s['turn_recovery_s_after_replica_kills']['p50'])} / "
                                                          f"{_fmt(s['turn_recovery_s_after_replica_kills']['p99'])}"),
            ("kill -> cut turn answered p50 / p99 (s)", f"{_fmt(s['interrupted_turn_recovery_s']['p50'])} / "
                                                         f"{_fmt(s['interrupted_turn_recovery_s']['p99'])}"),
            ("first sentence p50 / p99 (ms)", f"{_fmt(s['latency_ms']['first_sentence_ms']['p50'])} / "
                                              f"{_fmt(s['latency_ms']['first_sentence_ms']['p99'])}"),
            ("violations", json.dumps(s["violations"]) if s["violations"] else "none")]
    ev = report.get("events")
    if ev:
        rows += [("events lost (heard, no call.turn)", ev["lost"]), ("events republished (deduped)", ev["republished"]),
                 ("turns emitted twice", ev["turns_emitted_twice"]),
                 ("analytics missing", _fmt(ev["analytics_missing"])), ("unconsumed at end", ev["unconsumed"])]
    for f in report["faults"]:
        if f.get("during"):
            speech = f["during"]["first_speech_ms"]
            rows.append((f"during the stall at {f['t_s']:.0f} s: turns, first speech p50 / p99 (ms)",
                         f"{f['during']['turns']}, {_fmt(speech['p50'])} / {_fmt(speech['p99'])}"))
    for k, v in rows:
        style = "red" if k in ("turns lost", "calls dropped for good", "events lost (heard, no call.turn)",
                               "unconsumed at end") and v else ""
        totals.add_row(k, f"[{style}]{v}[/]" if style else str(v))
    console.print(totals)
    console.print("[green]zero lost turns, zero dropped calls[/]" if s["ok"] else "[red]NOT OK[/]")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# ====================================================================== standalone run


class ChaosOptions(BaseModel):
    """One standalone chaos run."""

    model_config = ConfigDict(extra="forbid")

    target: Literal["distributed", "event_driven"] = Field("distributed", description="Architecture under test.")
    calls: int = Field(10, ge=1, description="Concurrent calls.")
    turns: int = Field(10, ge=1, description="Caller turns per call.")
    think_s: float = Field(2.0, ge=0, description="Mean caller talk time before each request.")
    supersede_rate: float = Field(0.1, ge=0, le=1, description="Share of turns asked early and superseded.")
    agent: Literal["flow", "llm"] = Field("flow", description="flow: the clinic flow agent (answers in ms). llm: the "
                                                             "LLM agent on the fake LLM, so a fault often lands "
                                                             "while an answer is being generated.")
    llm_ttft_ms: float = Field(400.0, ge=0, description="llm: the fake LLM's time to first token.")
    llm_tokens_per_s: float = Field(30.0, gt=0, description="llm: the fake LLM's token rate.")
    ingress: Literal["proxy", "haproxy"] = Field("proxy", description="Serve's ingress: its Python proxy or HAProxy.")
    plan: FaultPlan = Field(default_factory=FaultPlan)
    out: Path | None = Field(None, description="Report JSON (default: bench/results/chaos-<target>-<time>.json).")


@contextlib.contextmanager
def scratch(kind: str, console: Console) -> Iterator[tuple[Path, RedisServer]]:
    """A temp dir with a private redis-server in it, the project as the working directory (Ray
    workers import serve_app from there); the dir goes after a clean run, stays after a failure."""
    tmp = Path(tempfile.mkdtemp(prefix=f"callray-{kind}-"))
    (tmp / "redis").mkdir()
    redis = RedisServer(tmp / "redis", log_path=tmp / "redis.log")
    previous_cwd = os.getcwd()
    os.chdir(PROJECT_DIR)
    ok = False
    try:
        redis.start()
        console.log(f"private redis-server at {redis.url} (appendonly)")
        yield tmp, redis
        ok = True
    finally:
        redis.stop()
        os.chdir(previous_cwd)
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            console.log(f"redis log kept in {tmp}")


@contextlib.contextmanager
def torn_down(deployed: Any) -> Iterator[Any]:
    """A deployed target, torn down after use (a teardown failing after a failure is not news)."""
    try:
        yield deployed
    except BaseException:
        with contextlib.suppress(Exception):
            deployed.teardown()
        raise
    deployed.teardown()


def warm_up(url: str, calls: int, tag: str) -> None:
    """A few one-turn calls before the measured ones: fail early when none completes."""
    warm = asyncio.run(run_simulation(SimConfig(url=url, calls=calls, turns=1, think_s=0.2, call_id_prefix=f"warm-{tag}")))
    if warm.counts.get("calls_completed", 0) == 0:
        raise RuntimeError(f"warm-up: no call completed ({warm.dropped}, {warm.violations})")


def run_standalone(options: ChaosOptions, console: Console) -> dict[str, Any]:
    """Start Redis, Ray and Serve, deploy the target, run the chaos, stop everything."""
    from harness.targets import CALLRAY_TARGETS, Processes, deploy_serve_target, ray_session, write_llm_agent

    tag = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    with scratch("chaos", console) as (tmp, redis), contextlib.closing(Processes(tmp)) as procs:  # procs: the fake LLM
        llm_url = agent_file = None
        if options.agent == "llm":
            llm_url = procs.start_fake_llm(options.llm_ttft_ms, options.llm_tokens_per_s)
            agent_file = write_llm_agent(tmp, llm_url)
            console.log(f"fake LLM at {llm_url} (TTFT {options.llm_ttft_ms:.0f} ms, {options.llm_tokens_per_s:.0f} tokens/s)")
        with ray_session(console, options.ingress) as serve_port:
            namespace = f"bench-{tag}-{options.target}-{options.agent}"
            console.log(f"deploying {options.target} ({CALLRAY_TARGETS[options.target][0]})")
            with torn_down(deploy_serve_target(options.target, serve_port, namespace=namespace, redis_url=redis.url,
                                               llm_base_url=llm_url, agent_file=agent_file)) as deployed:
                target = chaos_target(options.target, deployed, namespace, redis, agent_file)
                warm_up(deployed.url, 4, tag)
                sim = SimConfig(url=deployed.url, calls=options.calls, turns=options.turns, think_s=options.think_s,
                                ramp_s=min(5.0, 0.1 * options.calls), supersede_rate=options.supersede_rate,
                                drop_reconnects=RETELL_DROP_RECONNECTS, turn_timeout_s=20.0, seed=options.plan.seed,
                                call_id_prefix=f"chaos-{tag}")
                console.log(f"chaos: {options.calls} calls x {options.turns} turns, faults at "
                            + ", ".join(f"{t:.0f}s {k}" for t, k in options.plan.timeline()))
                report = asyncio.run(run_chaos(target, sim, options.plan, console))
                report["started_at"], report["ingress"] = tag, options.ingress
    out = options.out or PROJECT_DIR / "bench" / "results" / f"chaos-{options.target}-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    report["path"] = str(out)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=("distributed", "event_driven"), default="distributed",
                        help="architecture under test (default: distributed)")
    parser.add_argument("--calls", type=int, default=10, help="concurrent calls (default: 10)")
    parser.add_argument("--turns", type=int, default=10, help="caller turns per call (default: 10)")
    parser.add_argument("--think-s", type=float, default=2.0, help="mean caller talk time per turn (default: 2)")
    parser.add_argument("--gateway-every", type=float, default=15.0, help="SIGKILL a gateway replica every N s (0: never)")
    parser.add_argument("--consumer-every", type=float, default=None,
                        help="kill an event consumer actor every N s (default: 10 for event_driven, else never)")
    parser.add_argument("--redis-every", type=float, default=20.0, help="restart Redis every N s (0: never)")
    parser.add_argument("--redis-down-s", type=float, default=1.0, help="seconds Redis stays down (default: 1)")
    parser.add_argument("--stall-every", type=float, default=0.0, help="freeze Redis (SIGSTOP) every N s (0: never)")
    parser.add_argument("--stall-s", type=float, default=10.0, help="seconds Redis stays frozen (default: 10)")
    parser.add_argument("--agent", choices=("flow", "llm"), default="flow",
                        help="flow agent (default) or the LLM agent on the fake LLM (400 ms to first token, 30 tokens/s), "
                             "so faults land mid-generation")
    parser.add_argument("--seed", type=int, default=1, help="seed of the callers and of the fault picks")
    parser.add_argument("--ingress", choices=("proxy", "haproxy"), default="proxy",
                        help="Serve's ingress: its Python proxy (default) or HAProxy")
    parser.add_argument("--out", type=Path, help="report JSON (default: bench/results/chaos-<target>-<time>.json)")


def options_from_args(args: argparse.Namespace) -> ChaosOptions:
    duration = args.turns * args.think_s  # the calls' talk time: faults stop a little before they end
    consumer = args.consumer_every if args.consumer_every is not None else (10.0 if args.target == "event_driven" else 0)
    plan = FaultPlan(gateway_every_s=args.gateway_every, consumer_every_s=consumer,
                     redis_every_s=args.redis_every, redis_down_s=args.redis_down_s, stall_every_s=args.stall_every,
                     stall_s=args.stall_s, until_s=max(5.0, duration * 0.8),
                     seed=args.seed)
    return ChaosOptions(target=args.target, calls=args.calls, turns=args.turns, think_s=args.think_s, plan=plan,
                        agent=args.agent, ingress=args.ingress, out=args.out)


def run_command(args: argparse.Namespace) -> int:
    """``callray chaos`` / ``python -m harness.chaos``: exit 0 only with no lost turn and no dropped call."""
    from harness.suite import run_check

    return run_check(lambda console: run_standalone(options_from_args(args), console), print_report)


if __name__ == "__main__":  # the same command as `callray chaos`
    from callray.cli import main

    sys.exit(main(["chaos", *sys.argv[1:]]))
