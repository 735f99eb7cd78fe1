"""Two versions of callray in one Ray session: a change's before and after, measured in the same run.

A refactor must not cost latency, and this machine drifts between runs, so the two versions are
deployed side by side in each round's Ray session (each replica runs its own checkout as its
``working_dir``, checked by asking the replica which ``callray`` it imported; the settings, deployment options
and everything else are this checkout's),
with the one-process server beside them, and every level is played against each in an order
that rotates between rounds. A figure is the median over rounds; ``after / before`` is taken
within each round.

``callray versions --before REV`` (``python -m harness.versions``) prints the table and writes
``bench/results/versions-<tag>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from callray.settings import PROJECT_DIR
from callray.sim.simulator import SimConfig
from harness.ingress import METRIC, IngressOptions, sim_config
from harness.report import median_of, ratio, round_stats
from harness.suite import machine_info, simulate
from harness.targets import (
    REDIS_TARGETS, Deployed, Processes, alive_actors, deploy_serve_target, ray_session, ray_worker_niceness,
    start_baseline, write_llm_agent,
)



class VersionsOptions(BaseModel):
    """What one before/after comparison measures."""

    model_config = ConfigDict(extra="forbid")

    before: str = Field(description="The git revision measured as 'before'.")
    after: str = Field("HEAD", description="The git revision measured as 'after' (default: HEAD).")
    target: str = Field("single", description="The callray config both versions are deployed with.")
    agents: list[str] = Field(default_factory=lambda: ["flow", "llm"], description="flow and/or llm.")
    levels: list[int] = Field(default_factory=lambda: [100], description="Calls per level.")
    rounds: int = Field(3, ge=1)
    ingress: str = Field("haproxy", pattern="^(haproxy|proxy)$")
    turns: int = Field(3, ge=1)
    think_s: float = Field(2.0, ge=0)
    seed: int = 17


def checkout(rev: str, into: Path) -> Path:
    """The tracked files of ``rev`` in a folder of their own (what a replica's working_dir ships)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(PROJECT_DIR), "archive", "--format=tar", rev],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into), "--exclude=bench/results", "--exclude=docs/img"], input=archive,
                   check=True)
    return into


def check_runs(deployed: Deployed, folder: Path) -> None:
    """The replica runs ``folder``'s code: asked which ``callray`` it imported, it names the
    checkout's (its working directory alone proved nothing: Ray put the driver's first)."""
    import ray

    replicas = [a for a in alive_actors() if a.get("ActorClassName", "").startswith(f"ServeReplica:{deployed.name}:")]
    if not replicas:
        raise RuntimeError(f"{deployed.name}: no replica found")
    for actor in replicas:
        handle = ray.get_actor(actor["Name"], namespace="serve")  # Serve's own namespace
        imported = Path(ray.get(handle.__ray_call__.remote(lambda _: __import__("callray").__file__), timeout=30))
        if imported.parent.parent != folder.resolve():
            raise RuntimeError(f"{deployed.name}: its replica imported callray from {imported.parent}, "
                               f"not from the checkout {folder}")


def run(options: VersionsOptions, console: Console, command: str) -> dict[str, Any]:
    tag = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="callray-versions-"))
    procs = Processes(tmp)
    code = {"before": checkout(options.before, tmp / "before"), "after": checkout(options.after, tmp / "after")}
    rounds: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    load = IngressOptions(turns=options.turns, think_s=options.think_s)  # the ingress run's Retell-shaped load
    try:
        redis_url = procs.start_redis(tmp / "redis") if options.target in REDIS_TARGETS else None
        llm_url = procs.start_fake_llm(200.0, 50.0) if "llm" in options.agents else None
        agent_file = write_llm_agent(tmp, llm_url) if llm_url else None
        for r in range(options.rounds):
            with ray_session(console, options.ingress) as port:
                for agent in options.agents:
                    deployed: dict[str, Deployed] = {}
                    try:
                        for version, folder in code.items():
                            deployed[version] = deploy_serve_target(
                                options.target, port, namespace=f"versions-{version}-{agent}-r{r}", app=f"{version}-{agent}",
                                redis_url=redis_url, llm_base_url=llm_url if agent == "llm" else None,
                                agent_file=agent_file if agent == "llm" else None, code=folder)
                            check_runs(deployed[version], folder)
                        deployed["baseline"] = start_baseline(procs, llm_url if agent == "llm" else None,
                                                              ray_worker_niceness(deployed["after"].name))
                        for name, target in deployed.items():
                            simulate(SimConfig(url=target.url, calls=4, turns=1, think_s=0.2,
                                               call_id_prefix=f"warm-{name}-{agent}-r{r}"), console, f"{name} warm-up")
                        order = list(deployed)[r % 3:] + list(deployed)[:r % 3]
                        for calls in options.levels:
                            for name in order:
                                config = sim_config(deployed[name], calls, load, f"{name}-{agent}-{calls}-r{r}",
                                                    options.seed + calls + 1000 * r)
                                stats = round_stats(simulate(config, console, f"round {r + 1} {agent} {name} {calls}"))
                                stats.pop("samples", None)
                                rounds.setdefault((agent, name, calls), []).append(stats)
                                lat = stats["latency_ms"][METRIC[agent]]
                                console.log(f"round {r + 1} {agent} {name:8} {calls} calls: {METRIC[agent]} "
                                            f"p50 {lat['p50']} p99 {lat['p99']} ms")
                                time.sleep(1)
                    finally:
                        for target in deployed.values():
                            target.teardown()
    finally:
        procs.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"started_at": tag, "command": command, "machine": machine_info(),
              "options": options.model_dump(mode="json"), "summary": summarise(rounds, options)}
    path = PROJECT_DIR / "bench" / "results" / f"versions-{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "rounds": {f"{a}/{n}/{c}": rs for (a, n, c), rs in rounds.items()}},
                               indent=1))
    report["results"] = str(path.relative_to(PROJECT_DIR))
    return report


def summarise(rounds: dict[tuple[str, str, int], list[dict[str, Any]]], options: VersionsOptions) -> dict[str, Any]:
    """Per agent and level: each version's medians, and after / before within each round."""
    out: dict[str, Any] = {}
    for agent in options.agents:
        metric = METRIC[agent]
        for calls in options.levels:
            got = {name: rounds.get((agent, name, calls), []) for name in ("baseline", "before", "after")}
            row: dict[str, Any] = {name: {q: median_of([s["latency_ms"][metric][q] for s in rs]) for q in ("p50", "p99")}
                                   for name, rs in got.items()}
            row["after_vs_before"] = {q: median_of([ratio(a["latency_ms"][metric][q], b["latency_ms"][metric][q])
                                                    for a, b in zip(got["after"], got["before"])]) for q in ("p50", "p99")}
            row["dropped"] = {name: sum(sum(s["dropped"].values()) for s in rs) for name, rs in got.items()}
            row["violations"] = {name: sum(sum(s["violations"].values()) for s in rs) for name, rs in got.items()}
            out[f"{agent}/{calls}"] = row
    return out


def print_summary(report: dict[str, Any], console: Console) -> None:
    options = report["options"]
    table = Table(title=f"{options['before']} -> {options['after']}, {options['target']} config, "
                        f"{options['rounds']} rounds: p50 / p99 ms", title_justify="left")
    for column in ("agent / calls", "one-process server", "before", "after", "after / before", "dropped, violations"):
        table.add_column(column, justify="right")
    for key, row in report["summary"].items():
        table.add_row(key, *(f"{row[n]['p50']} / {row[n]['p99']}" for n in ("baseline", "before", "after")),
                      f"x{row['after_vs_before']['p50']} / x{row['after_vs_before']['p99']}",
                      f"{sum(row['dropped'].values())}, {sum(row['violations'].values())}")
    console.print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--before", required=True, help="git revision measured as before")
    parser.add_argument("--after", default="HEAD", help="git revision measured as after (default HEAD)")
    parser.add_argument("--target", default="single", help="the callray config (single, distributed, event_driven)")
    parser.add_argument("--agents", nargs="+", choices=tuple(METRIC), default=list(METRIC))
    parser.add_argument("--levels", nargs="+", type=int, default=[100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy")


def run_command(args: argparse.Namespace) -> int:
    import sys

    options = VersionsOptions(before=args.before, after=args.after, target=args.target, agents=args.agents,
                              levels=args.levels, rounds=args.rounds, ingress=args.ingress)
    console = Console()
    report = run(options, console, "callray versions " + " ".join(sys.argv[1:]))
    print_summary(report, console)
    console.print(f"raw results: {report['results']}")
    return 0


if __name__ == "__main__":  # the same command as `callray versions`
    import sys

    from callray.cli import main

    raise SystemExit(main(["versions", *sys.argv[1:]]))
