"""Soak: many calls for a long time, watching memory, throughput, latency and errors drift.

N concurrent calls (default 100) talk for a duration (default 30 min): each call takes its
greeting, plays ``--turns-per-call`` caller turns with a realistic talk time between them and
hangs up (and Retell's signed ``call_ended`` webhook follows, as in production), and a new call
takes its slot, so activation, deactivation and the stores are exercised as well as long-lived
sockets. Every ``--sample-s`` seconds it records the resident
memory (RSS) of the gateway replicas and the call hosts, turns per second, first-sentence
p50/p99 of the turns completed in that window, and the errors (protocol violations and
dropped calls) so far. The report gives memory growth per call-hour (MB), the errors, and the
latency drift (p99 of the last window against the first), as JSON plus a PNG plot of RSS and
p99 over time.

``--faults`` adds the reliability plan: Redis frozen for 10 s at a fifth of the run, restarted
at two fifths, a gateway replica SIGKILLed at a half and at seven tenths. The report then has
each fault's recovery (as ``callray chaos`` reports it) and, for the event-driven target,
whether every turn a caller heard reached the event stream and its call's archived record.

``python -m harness.soak --minutes 2`` is the quick version. Everything it starts (a private
local Ray with Serve on a free port, a private redis-server) is stopped on every exit path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import secrets
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from callray.settings import PROJECT_DIR
from callray.sim.simulator import Recorder, SimConfig, run_simulation
from harness.chaos import (ChaosTarget, FaultPlan, SocketLog, chaos_report, chaos_target, check_events,
                           inject_faults, scratch, torn_down, warm_up)
from callray.stats import percentile

#: Retell reconnects up to 4 times after an abnormal close.
RETELL_DROP_RECONNECTS = 4


class SoakOptions(BaseModel):
    """One soak run."""

    model_config = ConfigDict(extra="forbid")

    target: Literal["distributed", "event_driven"] = Field("distributed", description="Architecture under test.")
    calls: int = Field(100, ge=1, description="Concurrent calls, held for the whole run.")
    minutes: float = Field(30.0, gt=0, description="How long the calls talk.")
    turns_per_call: int = Field(20, ge=1, description="Caller turns before a call hangs up and a new one starts.")
    think_s: float = Field(4.0, ge=0, description="Mean caller talk time before each request (uniform 0.5x-1.5x).")
    sample_s: float = Field(30.0, gt=0, description="Seconds between samples.")
    faults: bool = Field(False, description="Inject the reliability plan: a 10 s Redis stall, a Redis restart and "
                                            "two gateway replica kills (see the module docstring).")
    out: Path | None = Field(None, description="Report JSON (default: bench/results/soak-<target>-<time>.json); "
                                               "the plot goes next to it as .png.")


class LiveRecorders(SocketLog):
    """The simulator's recorders of an in-process run, readable while it runs, and the sockets
    it opened (for the faults' recovery)."""

    def __init__(self) -> None:
        super().__init__()
        self.recorders: list[Recorder] = []

    def run_started(self, recorder: Recorder) -> None:
        self.recorders.append(recorder)


def process_rss(app: str, namespace: str) -> dict[str, float]:
    """Resident MB per kind of process serving ``app``: gateway replicas, proxy, consumers."""
    from harness.targets import psutil as _psutil, serve_processes

    psutil = _psutil()
    out: dict[str, float] = defaultdict(float)
    for cls, pid in serve_processes(app, namespace):
        kind = ("gateway" if cls.startswith("ServeReplica:") else "proxy" if cls == "ProxyActor"
                else "host" if cls == "CallHost" else "consumer" if cls == "EventConsumer" else "other")
        with contextlib.suppress(psutil.Error):
            out[kind] += psutil.Process(pid).memory_info().rss / 2**20
    return {k: round(v, 1) for k, v in sorted(out.items())}


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    data = sorted(values)
    if not data:
        return None, None
    return round(percentile(data, 0.5), 1), round(percentile(data, 0.99), 1)


async def sample_loop(app: str, namespace: str, live: LiveRecorders, options: SoakOptions,
                      samples: list[dict[str, Any]], console: Console, done: asyncio.Event, ramp_s: float) -> None:
    """One sample per ``sample_s`` until ``done``: RSS, turns/s, first-sentence p50/p99, errors.
    A sample is ``steady`` when its whole window lies after the calls' initial ramp."""
    t0 = time.monotonic()
    last_t, last_errors = 0.0, 0
    while not done.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=max(0.0, t0 + (len(samples) + 1) * options.sample_s
                                                             - time.monotonic()))
        now = time.monotonic() - t0
        if now - last_t < options.sample_s / 2:  # the run ended right after a sample
            break
        rss = await asyncio.to_thread(process_rss, app, namespace)
        window, errors, answered = [], 0, 0
        for rec in live.recorders:
            errors += sum(rec.violations.values()) + sum(rec.dropped.values())
            answered += rec.counts["turns_answered"]
            base = rec.t0 - t0
            window += [t.first_sentence_ms for t in rec.turns
                       if last_t <= base + t.t_s + t.complete_ms / 1000 < now]
        p50, p99 = _stats(window)
        sample = {"t_s": round(now, 1), "rss_mb": rss, "rss_gateway_host_mb": round(rss.get("gateway", 0)
                                                                                       + rss.get("host", 0), 1),
                  "turns": len(window), "turns_per_s": round(len(window) / (now - last_t), 2),
                  "first_sentence_p50_ms": p50, "first_sentence_p99_ms": p99,
                  "errors_total": errors, "errors_in_window": errors - last_errors, "turns_answered_total": answered,
                  "steady": last_t >= ramp_s, "load_1m": round(os.getloadavg()[0], 2)}
        samples.append(sample)
        console.log(f"t={now:5.0f} s  RSS gateway+hosts {sample['rss_gateway_host_mb']:.0f} MB  "
                    f"{sample['turns_per_s']:.1f} turns/s  first sentence p50/p99 {p50}/{p99} ms  "
                    f"errors {errors}")
        last_t, last_errors = now, errors


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per hour."""
    if len(points) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx * 3600


def soak_summary(samples: list[dict[str, Any]], options: SoakOptions, result: Any) -> dict[str, Any]:
    """Memory growth per call-hour, errors and latency drift, from the steady samples (every
    call slot busy for the whole window; all samples if there are fewer than two)."""
    steady = [s for s in samples if s["steady"]]
    steady = steady if len(steady) >= 2 else samples
    rss = [(s["t_s"], s["rss_gateway_host_mb"]) for s in steady]
    slope = slope_per_hour(rss)
    hours = (rss[-1][0] - rss[0][0]) / 3600 if len(rss) > 1 else 0
    call_hours = options.calls * hours
    measured = [s for s in steady if s["first_sentence_p99_ms"] is not None]
    first, last = (measured[0], measured[-1]) if measured else (None, None)
    counts = result.counts
    return {
        "ok": result.ok,
        "calls_concurrent": options.calls,
        "calls_placed": counts.get("calls", 0),
        "turns_answered": counts.get("turns_answered", 0),
        "duration_s": round(result.duration_s, 1),
        "call_hours": round(options.calls * result.duration_s / 3600, 2),
        "memory": {
            "rss_gateway_host_first_mb": rss[0][1] if rss else None,
            "rss_gateway_host_last_mb": rss[-1][1] if rss else None,
            "growth_mb": round(rss[-1][1] - rss[0][1], 1) if rss else None,
            "slope_mb_per_hour": None if slope is None else round(slope, 1),
            "growth_mb_per_call_hour": None if slope is None or not call_hours else round(slope * hours / call_hours, 3),
            "growth_mb_per_call_hour_whole_run": None if len(samples) < 2 else round(
                (samples[-1]["rss_gateway_host_mb"] - samples[0]["rss_gateway_host_mb"])
                / (options.calls * (samples[-1]["t_s"] - samples[0]["t_s"]) / 3600), 3),
            "method": "least-squares slope of gateway-replica + call-host RSS over the steady samples (every call "
                      "slot busy for the whole window), times their span in hours, divided by the call-hours "
                      "(concurrent calls x hours) over the same span; the whole-run figure is last minus first "
                      "sample over the same call-hours and includes warm-up (allocator, caches, first activations)",
        },
        "errors": {"violations": result.violations, "dropped": result.dropped,
                   "total": sum(result.violations.values()) + sum(result.dropped.values())},
        "steady_samples": len(steady),
        "latency_drift": {
            "first_window_p99_ms": first and first["first_sentence_p99_ms"],
            "last_window_p99_ms": last and last["first_sentence_p99_ms"],
            "ratio": round(last["first_sentence_p99_ms"] / first["first_sentence_p99_ms"], 2)
            if first and first["first_sentence_p99_ms"] else None,
            "first_window_p50_ms": first and first["first_sentence_p50_ms"],
            "last_window_p50_ms": last and last["first_sentence_p50_ms"],
        },
        "turns_per_s": {"first": samples[0]["turns_per_s"] if samples else None,
                        "last": samples[-1]["turns_per_s"] if samples else None},
    }


def write_plot(samples: list[dict[str, Any]], path: Path, title: str,
               faults: list[dict[str, Any]] = ()) -> Path:
    """RSS (gateway replicas, hosts, both) and first-sentence p50/p99 over time, faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key, label in (("gateway", "gateway replicas"), ("host", "call hosts")):
        top.plot(t, [s["rss_mb"].get(key, 0) for s in samples], marker=".", label=label)
    top.plot(t, [s["rss_gateway_host_mb"] for s in samples], marker=".", label="both")
    top.set_ylabel("RSS (MB)")
    top.grid(True, alpha=0.3)
    top.legend(fontsize=8)
    for key, label in (("first_sentence_p50_ms", "p50"), ("first_sentence_p99_ms", "p99")):
        bottom.plot(t, [s[key] for s in samples], marker=".", label=f"first sentence {label}")
    bottom.set_ylabel("ms (per window)")
    bottom.set_xlabel("minutes")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=8)
    for fault in faults:
        for axis in (top, bottom):
            axis.axvline(fault["t_s"] / 60, color="red", alpha=0.4, linestyle="--")
        top.annotate(fault["kind"], (fault["t_s"] / 60, 0.98), xycoords=("data", "axes fraction"), fontsize=7,
                     color="red", va="top", rotation=90)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fault_plan(minutes: float) -> FaultPlan:
    """The reliability plan over a run of ``minutes``: stall, restart, two replica kills."""
    run_s = minutes * 60
    return FaultPlan(schedule=[(0.2 * run_s, "stall"), (0.4 * run_s, "redis"), (0.5 * run_s, "gateway"),
                               (0.7 * run_s, "gateway")], stall_s=10.0, redis_down_s=1.0)


def archive_gaps(target: ChaosTarget, result: Any) -> dict[str, Any]:
    """Every call's archived record (``GET /calls/{id}``) against the turns its caller heard."""
    from harness.targets import read_json

    heard: dict[str, set[int]] = defaultdict(set)
    ids = {c.call: c.call_id for c in result.calls}
    for t in result.turns:
        heard[ids[t.call]].add(t.response_id)
    missing_records, incomplete = [], []
    for call_id, rids in sorted(heard.items()):
        record = read_json(f"{target.http_base}/calls/{call_id}", wait_s=5)
        if record is None:
            missing_records.append(call_id)
        elif rids - {t["response_id"] for t in record["turns"]}:
            incomplete.append(f"{call_id}: {sorted(rids - {t['response_id'] for t in record['turns']})[:5]}")
    return {"calls": len(heard), "records_missing": len(missing_records), "records_incomplete": len(incomplete),
            "examples": (missing_records + incomplete)[:5]}


async def soak(url: str, app: str, options: SoakOptions, console: Console, tag: str,
               target: ChaosTarget | None = None, webhook: tuple[str, str] | None = None) -> dict[str, Any]:
    """Run the calls and the sampler (and, with ``target``, the faults) side by side; returns
    samples and summary."""
    call_s = max(1.0, options.turns_per_call * (options.think_s + 0.2))
    per_slot = math.ceil(options.minutes * 60 / call_s) + 2
    total = options.calls * per_slot  # more than can finish: duration_s ends the run
    first_ramp_s = min(30.0, 0.1 * options.calls)
    sim = SimConfig(url=url, calls=total, concurrency=options.calls, turns=options.turns_per_call,
                    think_s=options.think_s, ramp_s=first_ramp_s * total / options.calls, supersede_rate=0.1,
                    reminder_rate=0.05, drop_reconnects=RETELL_DROP_RECONNECTS, duration_s=options.minutes * 60,
                    turn_timeout_s=20.0, seed=11, call_id_prefix=f"soak-{tag}",
                    webhook_url=webhook and webhook[0], webhook_key=webhook and webhook[1])
    samples: list[dict[str, Any]] = []
    live = LiveRecorders()
    done = asyncio.Event()
    sampler = asyncio.create_task(sample_loop(app, f"soak-{tag}", live, options, samples, console, done,
                                              first_ramp_s))
    plan, faults = fault_plan(options.minutes) if target is not None else None, []
    run = asyncio.create_task(run_simulation(sim, observer=live))
    try:
        if plan is not None:
            await inject_faults(target, plan, faults, run, console)
        result = await run
    finally:
        run.cancel()  # a no-op once it finished
        done.set()
        await sampler
    report = {"samples": samples, "summary": soak_summary(samples, options, result), "sim": result.summary()}
    if plan is not None:
        events = await check_events(target, result, None) if target.stream else None
        chaos = chaos_report(result, faults, live.opens, target, plan, events)
        report["faults"] = {"summary": chaos["summary"], "per_fault": chaos["faults"], "events": events,
                            "archive": await asyncio.to_thread(archive_gaps, target, result) if target.stream else None}
        archive = report["faults"]["archive"]
        report["summary"]["ok"] = (report["summary"]["ok"] and chaos["summary"]["ok"]
                                   and not (archive and (archive["records_missing"] or archive["records_incomplete"])))
    return report


def run_standalone(options: SoakOptions, console: Console) -> dict[str, Any]:
    """Start Redis, Ray and Serve, deploy the target, soak it, stop everything, write JSON and PNG."""
    from harness.suite import machine_info
    from harness.targets import deploy_serve_target, ray_session

    tag = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    with scratch("soak", console) as (_, redis), ray_session(console) as serve_port:
        webhook_key = secrets.token_hex(16)  # Retell's call_ended after every call, as in production
        with torn_down(deploy_serve_target(options.target, serve_port, namespace=f"soak-{tag}", redis_url=redis.url,
                                           webhook_key=webhook_key)) as deployed:
            target = chaos_target(options.target, deployed, f"soak-{tag}", redis) if options.faults else None
            warm_up(deployed.url, 8, tag)
            console.log(f"soak: {options.calls} calls for {options.minutes:g} min, {options.turns_per_call} turns per "
                        f"call, talk time ~{options.think_s:g} s, a sample every {options.sample_s:g} s")
            report = asyncio.run(soak(deployed.url, options.target, options, console, tag, target,
                                      webhook=(f"{deployed.http_base}/webhook", webhook_key)))
    report.update(started_at=tag, options=options.model_dump(mode="json"), machine=machine_info())
    out = options.out or PROJECT_DIR / "bench" / "results" / f"soak-{options.target}-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"soak: {options.target}, {options.calls} calls, {options.minutes:g} min" + (" with faults" if options.faults else "")
    plot = write_plot(report["samples"], out.with_suffix(".png"), title,
                      faults=report.get("faults", {}).get("per_fault", []))
    report["plot"] = str(plot)
    out.write_text(json.dumps(report, indent=2))
    report["path"] = str(out)
    return report


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title="soak: samples", title_justify="left")
    for col in ("t (s)", "RSS gw (MB)", "RSS hosts (MB)", "turns/s", "p50 ms", "p99 ms", "errors", "load"):
        table.add_column(col, justify="right")
    for s in report["samples"]:
        table.add_row(f"{s['t_s']:.0f}", f"{s['rss_mb'].get('gateway', 0):.0f}", f"{s['rss_mb'].get('host', 0):.0f}",
                      f"{s['turns_per_s']:.1f}", str(s["first_sentence_p50_ms"]), str(s["first_sentence_p99_ms"]),
                      str(s["errors_total"]), f"{s['load_1m']:.1f}" + ("" if s["steady"] else " ramp"))
    console.print(table)
    s = report["summary"]
    m, d = s["memory"], s["latency_drift"]
    console.print(f"memory (gateway replicas + hosts, steady samples): {m['rss_gateway_host_first_mb']} -> "
                  f"{m['rss_gateway_host_last_mb']} MB, slope {m['slope_mb_per_hour']} MB/h = "
                  f"{m['growth_mb_per_call_hour']} MB per call-hour (whole run incl. warm-up: "
                  f"{m['growth_mb_per_call_hour_whole_run']})")
    console.print(f"latency drift (first vs last steady window): p99 first sentence {d['first_window_p99_ms']} -> "
                  f"{d['last_window_p99_ms']} ms "
                  f"(x{d['ratio']}); errors: {s['errors']['total']} {s['errors']['violations'] or ''} "
                  f"{s['errors']['dropped'] or ''}")
    if report.get("faults"):
        f, events, archive = report["faults"]["summary"], report["faults"]["events"], report["faults"]["archive"]
        cut = f["interrupted_turn_recovery_s"]
        console.print(f"faults {f['faults']}: turns lost {f['turns_lost']}, calls dropped {f['calls_dropped_for_good']}, "
                      f"turns cut by a kill answered after p50/p99 {cut['p50']}/{cut['p99']} s"
                      + (f"; events lost {events['lost']}, unconsumed {events['unconsumed']}" if events else "")
                      + (f"; archived records missing {archive['records_missing']}, incomplete "
                         f"{archive['records_incomplete']} of {archive['calls']}" if archive else ""))
        for fault in report["faults"]["per_fault"]:
            if fault.get("during"):
                speech = fault["during"]["first_speech_ms"]
                console.print(f"during the {fault['target']} at {fault['t_s']:.0f} s: {fault['during']['turns']} turns, "
                              f"first speech p50/p99 {speech['p50']}/{speech['p99']} ms")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=("distributed", "event_driven"), default="distributed",
                        help="architecture under test (default: distributed)")
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls (default: 100)")
    parser.add_argument("--minutes", type=float, default=30.0, help="duration (default: 30; 2 for a quick run)")
    parser.add_argument("--turns-per-call", type=int, default=20, help="turns before a call hangs up (default: 20)")
    parser.add_argument("--think-s", type=float, default=4.0, help="mean caller talk time per turn (default: 4)")
    parser.add_argument("--sample-s", type=float, help="seconds between samples (default: 30; 15 below 5 minutes)")
    parser.add_argument("--faults", action="store_true",
                        help="a 10 s Redis stall, a Redis restart and two gateway replica kills during the run")
    parser.add_argument("--out", type=Path, help="report JSON (default: bench/results/soak-<target>-<time>.json)")


def run_command(args: argparse.Namespace) -> int:
    """``callray soak`` / ``python -m harness.soak``: exit 0 when the soak saw no error."""
    from harness.suite import run_check

    options = SoakOptions(target=args.target, calls=args.calls, minutes=args.minutes,
                          turns_per_call=args.turns_per_call, think_s=args.think_s,
                          sample_s=args.sample_s or (15.0 if args.minutes < 5 else 30.0), faults=args.faults,
                          out=args.out)
    return run_check(lambda console: run_standalone(options, console), print_report)


if __name__ == "__main__":  # the same command as `callray soak`
    from callray.cli import main

    sys.exit(main(["soak", *sys.argv[1:]]))
