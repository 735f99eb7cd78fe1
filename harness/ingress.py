"""Serve's two ingresses in one run: its Python proxy against HAProxy.

Each round starts, for each ingress in turn (the order alternating between rounds), a private
Ray behind that ingress; deploys the floor (a bare Serve WebSocket app) and callray's configs
in it; starts the hand-written one-process server beside them (outside Ray, the same under
both ingresses) and plays every level of Retell-shaped calls against each. A level's figure is
the median over rounds of each round's percentile, and ratios to the one-process server are
taken within one Ray session, so the machine's drift between sessions does not enter them.
With ``--direct``, each target of one replica is also called at that replica's own port, past
HAProxy, in the same rounds: the hop's cost.

``callray ingress`` (``python -m harness.ingress``) writes ``bench/results/ingress-<tag>.json``,
``docs/ingress.md`` and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from callray.settings import PROJECT_DIR
from callray.sim.local import INGRESSES
from callray.sim.simulator import SimConfig
from harness import profile
from harness.report import BUDGETS_MS, median_of, ratio, round_stats
from harness.suite import STOP_DROP_SHARE, hold_idle_calls, machine_info, simulate
from harness.targets import (
    REDIS_TARGETS, Deployed, Processes, deploy_serve_target, ray_session, ray_worker_niceness, replica_addresses, rss_mb,
    start_baseline, start_retell_demo, write_llm_agent,
)

PEERS = ("baseline", "retell_demo")
METRIC = {"flow": "first_chunk_ms", "llm": "first_sentence_ms"}


class IngressOptions(BaseModel):
    """What one ingress comparison measures."""

    model_config = ConfigDict(extra="forbid")

    ingresses: list[str] = Field(default_factory=lambda: list(INGRESSES), description="Ingresses compared.")
    agent: str = Field("flow", pattern="^(flow|llm)$", description="flow: the clinic flow agent; llm: the LLM agent "
                                                                   "on the fake LLM.")
    targets: list[str] = Field(default_factory=lambda: ["floor", "single", "distributed", "event_driven"],
                               description="Serve targets deployed under each ingress.")
    levels: list[int] = Field(default_factory=lambda: [100, 300, 500, 1000], description="Calls per level.")
    rounds: int = Field(3, ge=1, description="Rounds; a figure is the median of the rounds'.")
    turns: int = Field(3, ge=1, description="Caller turns per call.")
    think_s: float = Field(2.0, ge=0, description="Mean caller talk time before each request.")
    ramp_per_call_s: float = Field(0.01, ge=0, description="Calls open over calls x this (1000 calls: 10 s).")
    processes_from: int = Field(500, ge=1, description="From this many calls the load generator runs in 2 processes.")
    retell_demo: Path | None = Field(None, description="LLM agent: a checkout of Retell's Python demo, measured too.")
    llm_ttft_ms: float = Field(200.0, ge=0)
    llm_tokens_per_s: float = Field(50.0, gt=0)
    seed: int = 17
    direct: bool = Field(False, description="Under HAProxy, also call each single-replica target straight at its "
                                            "replica's own port (row '<target>_direct'): the HAProxy hop's cost.")
    profile_calls: int | None = Field(None, ge=1, description="After the rounds, sample the single config's replica "
                                                              "with py-spy under each ingress during a level of this "
                                                              "many calls.")
    out: Path = Field(Path("docs/ingress.md"), description="The markdown report (its plot beside it in img/, named after "
                                                           "it and the agent).")


def sim_config(deployed: Deployed, calls: int, options: IngressOptions, tag: str, seed: int) -> SimConfig:
    return SimConfig(url=deployed.url, calls=calls, turns=options.turns, think_s=options.think_s,
                     ramp_s=options.ramp_per_call_s * calls, supersede_rate=0.1, reminder_rate=0.05, seed=seed,
                     call_id_prefix=tag, holding_phrases=sorted(deployed.holding),
                     processes=2 if calls >= options.processes_from else 1)


def session(ingress: str, r: int, options: IngressOptions, console: Console, procs: Processes,
            redis_url: str | None, llm_url: str | None, agent_file: Path | None,
            rounds: dict[tuple[str, str, int], list[dict[str, Any]]], stopped: set[tuple[str, str]]) -> None:
    """One round under one ingress: deploy, warm up, play every level against every target."""
    with ray_session(console, ingress) as port:
        deployed: dict[str, Deployed] = {}
        try:
            for target in options.targets:
                deployed[target] = deploy_serve_target(
                    target, port, namespace=f"ingress-{ingress}-{target}-r{r}", redis_url=redis_url,
                    llm_base_url=llm_url if options.agent == "llm" else None,
                    agent_file=agent_file if options.agent == "llm" and target != "floor" else None)
            nice = ray_worker_niceness(options.targets[0])
            if options.direct and ingress == "haproxy":
                deployed.update(direct_targets(deployed, console))
            deployed["baseline"] = start_baseline(procs, llm_url if options.agent == "llm" else None, nice)
            if options.agent == "llm" and options.retell_demo is not None:
                deployed["retell_demo"] = start_retell_demo(procs, options.retell_demo, llm_url, nice)
            for name, target in deployed.items():
                simulate(SimConfig(url=target.url, calls=4, turns=1, think_s=0.2, call_id_prefix=f"warm-{ingress}-{name}-r{r}"),
                         console, f"{name} warm-up")
            order = list(deployed)
            order = order[r % len(order):] + order[:r % len(order)]
            for calls in options.levels:
                for name in order:
                    if (ingress, name) in stopped:
                        continue
                    result = simulate(sim_config(deployed[name], calls, options, f"{ingress}-{name}-{calls}-r{r}",
                                                 options.seed + calls + 1000 * r), console,
                                      f"round {r + 1} {ingress} {name} {calls}")
                    stats = round_stats(result)
                    stats.pop("samples", None)
                    rounds.setdefault((ingress, name, calls), []).append(stats)
                    lat = stats["latency_ms"][METRIC[options.agent]]
                    console.log(f"round {r + 1} {ingress:7} {name:13} {calls:5} calls: {METRIC[options.agent]} p50 "
                                f"{lat['p50']} p99 {lat['p99']} ms, dropped {sum(stats['dropped'].values())}, "
                                f"violations {sum(stats['violations'].values())}")
                    if sum(stats["dropped"].values()) > STOP_DROP_SHARE * calls:
                        stopped.add((ingress, name))
                    time.sleep(1)
        finally:  # Serve's targets go with the session (at once: behind HAProxy each drains 30 s)
            for name in PEERS:
                if name in deployed:
                    deployed[name].teardown()


def direct_targets(deployed: dict[str, Deployed], console: Console) -> dict[str, Deployed]:
    """``<target>_direct``: each single-replica Serve target called at its replica's port, past
    HAProxy (a target of several replicas would put every call on one of them: skipped)."""
    out = {}
    for name, target in deployed.items():
        addresses = replica_addresses(name)
        if len(addresses) != 1:
            console.log(f"{name}: {len(addresses)} replicas behind HAProxy; no direct row")
            continue
        url = urlsplit(target.url)
        out[direct_name(name)] = replace(target, name=direct_name(name), url=url._replace(netloc=addresses[0]).geturl())
    return out


def direct_name(target: str) -> str:
    return f"{target}_direct"  # it names call ids too: no spaces


def profile_replica(ingress: str, options: IngressOptions, console: Console, tag: str,
                    agent_file: Path | None) -> dict[str, Any]:
    """One more session: the single config alone (with the measured agent), its replica under
    py-spy during a level."""
    calls = options.profile_calls or 300
    info: dict[str, Any] = {"target": "single", "calls": calls, "ingress": ingress, "agent": options.agent}
    try:
        with ray_session(console, ingress) as port:
            deployed = deploy_serve_target("single", port, namespace=f"ingress-profile-{ingress}", agent_file=agent_file)
            simulate(SimConfig(url=deployed.url, calls=4, turns=1, think_s=0.2, call_id_prefix=f"warm-p-{ingress}"),
                     console, "single warm-up")
            processes = deployed.processes()
            info["processes"] = sorted({kind.split(":")[0] for kind, _ in processes})
            info["memory"] = asyncio.run(hold_idle_calls(deployed.url, calls, f"idle-{ingress}",
                                                         lambda: rss_mb([pid for _, pid in deployed.processes()])))
            replicas = [pid for kind, pid in processes if kind.startswith("ServeReplica")]
            if not replicas:
                raise RuntimeError("no replica process of single found")
            config = sim_config(deployed, calls, options, f"profile-{ingress}", options.seed)
            duration = options.turns * options.think_s + config.ramp_s
            raw = PROJECT_DIR / "bench" / "results" / f"profile-ingress-{tag}-{ingress}-single.txt"
            raw.parent.mkdir(parents=True, exist_ok=True)
            result, summary = profile.during(replicas[0], duration, raw,
                                             lambda: simulate(config, console, f"single under py-spy ({ingress})"))
            stats = round_stats(result)
            info.update(summary, raw_path=str(raw.relative_to(PROJECT_DIR)), duration_s=duration,
                        latency_ms=stats["latency_ms"][METRIC[options.agent]])
    except Exception as exc:  # a profile is a bonus, never a failed run
        info["error"] = f"{exc.__class__.__name__}: {exc}"
        console.log(f"[yellow]profile under {ingress} not taken: {info['error']}[/]")
    return info


def summarise(rounds: dict[tuple[str, str, int], list[dict[str, Any]]], options: IngressOptions) -> dict[str, Any]:
    """Per ingress, target and level: medians over rounds, ratios to the one-process server of
    the same round and ingress (its median), capacity within each architecture's budget."""
    metric = METRIC[options.agent]
    out: dict[str, Any] = {ingress: {} for ingress in options.ingresses}
    names = ["baseline", "retell_demo", *(n for target in options.targets for n in (target, direct_name(target)))]
    for (ingress, name, calls), rs in sorted(rounds.items(), key=lambda kv: (options.ingresses.index(kv[0][0]),
                                                                             names.index(kv[0][1]), kv[0][2])):
        per_round = {q: paired(rs, rounds.get((ingress, "baseline", calls), []), metric, q, ratio)
                     for q in ("p50", "p99")}
        direct = rounds.get((ingress, direct_name(name), calls))
        out.setdefault(ingress, {}).setdefault(name, []).append({
            "calls": calls, "rounds": len(rs),
            **{q: median_of([r["latency_ms"][metric][q] for r in rs]) for q in ("p50", "p99")},
            "first_sentence_p99": median_of([r["latency_ms"]["first_sentence_ms"]["p99"] for r in rs]),
            "setup_p99": median_of([r["latency_ms"]["setup_ms"]["p99"] for r in rs]),
            "vs_baseline": {q: median_of(values) for q, values in per_round.items()},
            # the rounds' lowest and highest: on a noisy machine a median of a few rounds moves
            "vs_baseline_range": {q: [min(values), max(values)] if len(values) > 1 else None
                                  for q, values in per_round.items()},
            "violations": sum(sum(r["violations"].values()) for r in rs),
            "dropped": sum(sum(r["dropped"].values()) for r in rs),
            "simulator_bottleneck": any(r["simulator_bottleneck"] for r in rs),
            # through HAProxy minus at the replica's own port, round by round (--direct)
            "hop_ms": {q: median_of(paired(rs, direct, metric, q, difference)) for q in ("p50", "p99")}
            if direct else None,
        })
    for ingress, targets in out.items():
        for name, levels in targets.items():
            budget = BUDGETS_MS.get(name)
            held = [lv["calls"] for lv in levels if budget and not lv["dropped"] and not lv["violations"]
                    and lv["first_sentence_p99"] is not None and lv["first_sentence_p99"] <= budget]
            for lv in levels:
                lv["within_budget"] = lv["calls"] in held if budget else None
    return out


def paired(rounds: list[dict[str, Any]], others: list[dict[str, Any]], metric: str, q: str,
           combine: Callable[[float | None, float | None], float | None]) -> list[float]:
    """``combine`` of each round's percentile ``q`` with the same round's of ``others``."""
    return [v for a, b in zip(rounds, others)
            if (v := combine(a["latency_ms"][metric][q], b["latency_ms"][metric][q])) is not None]


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def spread(level: dict[str, Any]) -> str:
    """The rounds' range of the ratios to the one-process server (p50, then p99), as printed."""
    ranges = [low_high for low_high in (level.get("vs_baseline_range") or {}).values() if low_high]
    return "; rounds " + " / ".join(f"x{low}-{high}" for low, high in ranges) if ranges else ""


def write_report(report: dict[str, Any], options: IngressOptions, path: Path) -> Path:
    """docs/ingress.md: a table per ingress and the plot."""
    metric = METRIC[options.agent]
    lines = [f"# Ingress: Serve's Python proxy against HAProxy ({options.agent} agent)", "",
             "<!-- generated by `callray ingress`; do not edit by hand -->", "",
             f"Run {report['started_at']} on {report['machine'].get('nproc', '?')} cores (Ray {report['machine'].get('ray')}), "
             f"{options.rounds} rounds, levels {', '.join(map(str, options.levels))} calls ({options.turns} turns, "
             f"~{options.think_s:g} s talk, calls opening over calls x {options.ramp_per_call_s:g} s). "
             f"`{metric}` p50 / p99 in ms, median of the rounds; in brackets, x the one-process server "
             "measured in the same Ray session (the median of the rounds' ratios, then their range). Budget: "
             "first sentence p99 within the architecture's budget (single 800, distributed 500, event-driven "
             "300 ms), no drop, no violation.", ""]
    for ingress, targets in report["summary"].items():
        lines += [f"## {ingress}", "", "| target | " + " | ".join(f"{c} calls" for c in options.levels) + " |",
                  "|---|" + "---|" * len(options.levels)]
        for name, levels in targets.items():
            by_calls = {lv["calls"]: lv for lv in levels}
            cells = []
            for calls in options.levels:
                lv = by_calls.get(calls)
                if lv is None:
                    cells.append("-")
                    continue
                cell = f"{lv['p50']} / {lv['p99']}"
                if name != "baseline" and lv["vs_baseline"]["p50"] is not None:
                    cell += f" (x{lv['vs_baseline']['p50']} / x{lv['vs_baseline']['p99']}{spread(lv)})"
                if lv["dropped"] or lv["violations"]:
                    cell += f", {lv['dropped']} dropped, {lv['violations']} violations"
                if lv["within_budget"] is False:
                    cell += ", over budget"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        hops = [f"- {name}: +{lv['hop_ms']['p50']} / +{lv['hop_ms']['p99']} ms at {lv['calls']} calls"
                for name, levels in targets.items() for lv in levels
                if lv.get("hop_ms") and lv["hop_ms"]["p50"] is not None]
        if hops:
            lines += ["HAProxy's hop: through HAProxy minus at the replica's own port (`--direct`), p50 / p99, "
                      "the median of the rounds' differences:", "", *hops, ""]
    for info in report.get("profiles", []):
        if info.get("samples"):
            # runs saved before 2026-12-07 profiled the flow agent whatever was measured
            agent = info.get("agent", "flow")
            lat = info["latency_ms"] if "latency_ms" in info else info["first_chunk_ms"]
            measure = METRIC[agent].removesuffix("_ms").replace("_", " ")  # "first chunk"
            memory = info.get("memory") or {}
            lines += [f"**Memory, {info['ingress']}**: {memory.get('calls')} idle calls on the single config: "
                      f"{memory.get('rest_mb')} MB at rest, {memory.get('open_mb')} MB with them open, "
                      f"{memory.get('per_call_kb')} KB per call, over {', '.join(info.get('processes', []))}.", ""]
            lines += [f"**Profile, {info['ingress']}**: the single config's replica ({agent} agent) under py-spy during "
                      f"{info['calls']} calls ({info['samples']} samples, {measure} p50 {lat['p50']} / p99 "
                      f"{lat['p99']} ms; raw "
                      f"`{info['raw_path']}`). Where the CPU was:", "",
                      "| area | share |", "|---|---|"]
            lines += [f"| {area} | {share:.0%} |" for area, share in info["areas"].items()]
            lines += ["", "Busiest functions (innermost frame):", ""]
            lines += [f"- {share:.1%} `{fn}`" for fn, share in info["top_self"][:8]]
            lines.append("")
    stem = path.stem if path.stem.endswith(options.agent) else f"{path.stem}-{options.agent}"  # one plot per report
    plot = plot_levels(report, options, path.parent / "img" / f"{stem}.png")
    shown = f"p50 and p99 at {options.levels[0]} calls" if len(options.levels) == 1 else "p99 by calls, per ingress"
    lines += [f"![{metric} {shown}]({plot.relative_to(path.parent)})", "",
              f"Raw results: `{report['results']}`. Reproduce: `{report['command']}`.", ""]
    path.write_text("\n".join(lines))
    return path


def plot_levels(report: dict[str, Any], options: IngressOptions, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(options.levels) == 1:
        plot_one_level(report, options, ax)
    else:
        plot_lines(report, options, ax)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_one_level(report: dict[str, Any], options: IngressOptions, ax: Any) -> None:
    """One level: each target's p50 and p99 as bars (a line through one point shows nothing)."""
    rows = [(f"{name} ({ingress})" if len(options.ingresses) > 1 else name, levels[0])
            for ingress, targets in report["summary"].items() for name, levels in targets.items()]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [lv["p50"] or 0 for _, lv in rows], height=0.4, label="p50")
    ax.barh([i - 0.2 for i in y], [lv["p99"] or 0 for _, lv in rows], height=0.4, label="p99")
    ax.set_yticks(list(y), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{METRIC[options.agent]} at {options.levels[0]} calls (ms, median of {options.rounds} rounds)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Serve ingress at one level, {options.agent} agent")


def plot_lines(report: dict[str, Any], options: IngressOptions, ax: Any) -> None:
    styles = {"proxy": "-", "haproxy": "--"}
    for ingress, targets in report["summary"].items():
        for name, levels in targets.items():
            points = [(lv["calls"], lv["p99"]) for lv in levels if lv["p99"] is not None]
            if points:
                ax.plot(*zip(*points), styles.get(ingress, ":"), marker="o", label=f"{name} ({ingress})")
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel(f"{METRIC[options.agent]} p99 (ms)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Serve ingress: Python proxy (solid) vs HAProxy (dashed), {options.agent} agent")


def run(options: IngressOptions, console: Console, command: str) -> dict[str, Any]:
    tag = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="callray-ingress-"))
    procs = Processes(tmp)
    previous = os.getcwd()
    os.chdir(PROJECT_DIR)
    rounds: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    stopped: set[tuple[str, str]] = set()
    try:
        redis_url = procs.start_redis(tmp / "redis") if set(options.targets) & set(REDIS_TARGETS) else None
        llm_url = agent_file = None
        if options.agent == "llm":
            llm_url = procs.start_fake_llm(options.llm_ttft_ms, options.llm_tokens_per_s)
            agent_file = write_llm_agent(tmp, llm_url)
        for r in range(options.rounds):
            order = options.ingresses if r % 2 == 0 else list(reversed(options.ingresses))
            for ingress in order:
                session(ingress, r, options, console, procs, redis_url, llm_url, agent_file, rounds, stopped)
        profiles = ([profile_replica(ingress, options, console, tag, agent_file) for ingress in options.ingresses]
                    if options.profile_calls else [])
    finally:
        procs.close()
        os.chdir(previous)
        shutil.rmtree(tmp, ignore_errors=True)
    results = PROJECT_DIR / "bench" / "results" / f"ingress-{options.agent}-{tag}.json"
    report = {"started_at": tag, "command": command, "machine": machine_info(),
              "options": options.model_dump(mode="json"), "summary": summarise(rounds, options),
              "results": str(results.relative_to(PROJECT_DIR)), "profiles": profiles,
              "rounds": {f"{i}/{n}/{c}": rs for (i, n, c), rs in rounds.items()}}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=1))
    report["report"] = str(write_report(report, options, PROJECT_DIR / options.out))
    return report


def print_summary(report: dict[str, Any], console: Console) -> None:
    for ingress, targets in report["summary"].items():
        table = Table(title=f"{ingress}: p50 / p99 ms (x one-process server)", title_justify="left")
        table.add_column("target")
        levels = sorted({lv["calls"] for ls in targets.values() for lv in ls})
        for calls in levels:
            table.add_column(f"{calls}", justify="right")
        for name, ls in targets.items():
            by = {lv["calls"]: lv for lv in ls}
            table.add_row(name, *(f"{by[c]['p50']}/{by[c]['p99']} (x{by[c]['vs_baseline']['p50']}/"
                                  f"x{by[c]['vs_baseline']['p99']})" if c in by else "-" for c in levels))
        console.print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ingress", nargs="+", choices=INGRESSES, default=list(INGRESSES))
    parser.add_argument("--agent", choices=("flow", "llm"), default="flow")
    parser.add_argument("--targets", nargs="+", default=None, help="Serve targets (default: floor single "
                                                                   "distributed event_driven)")
    parser.add_argument("--levels", nargs="+", type=int, default=None, help="calls per level (default 100 300 500 1000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--retell-demo", type=Path, help="LLM agent: a checkout of Retell's Python demo")
    parser.add_argument("--out", type=Path, default=None, help="the markdown report (default docs/ingress.md)")
    parser.add_argument("--direct", action="store_true",
                        help="under HAProxy, also call single-replica targets at their replica's own port")
    parser.add_argument("--profile-calls", type=int, default=None,
                        help="after the rounds, profile the single config's replica under each ingress at this many calls")


def run_command(args: argparse.Namespace) -> int:
    values: dict[str, Any] = {"ingresses": args.ingress, "agent": args.agent, "rounds": args.rounds,
                              "retell_demo": args.retell_demo, "profile_calls": args.profile_calls,
                              "direct": args.direct}
    for key in ("targets", "levels", "out"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    options = IngressOptions(**values)
    console = Console()
    report = run(options, console, "callray ingress " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["ingress"]
                                                                  else sys.argv[1:]))
    print_summary(report, console)
    console.print(f"report: {report['report']}")
    return 0


if __name__ == "__main__":  # the same command as `callray ingress`
    from callray.cli import main

    sys.exit(main(["ingress", *sys.argv[1:]]))
