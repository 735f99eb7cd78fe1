"""``callray bench``: the benchmark suite behind ``docs/benchmarks.md``.

For each agent mode every target is deployed side by side (callray's architectures and
placements and the bare Serve floor as applications of one private local Ray; the hand-written
baseline and Retell's public demo as processes at Ray's worker niceness), warmed up, measured
at rest and with idle calls, and then driven in repeated rounds: in each round every target
runs every level, in an order that rotates from round to round, so the machine's noise falls
on all alike. Flow mode adds one idle call's turns, call setup on a freshly started deployment
and the cache-hit scenario; ``--profile`` samples a callray replica with py-spy at 100 calls.
The raw results are saved after every level, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from callray.settings import PROJECT_DIR
from callray.sim.report import SimResult, describe
from callray.sim.client import RetellClient
from callray.sim.simulator import SimConfig, run_simulation
from harness import profile
from harness.report import aggregate, round_stats, write_report
from harness.targets import (
    CALLRAY_TARGETS, PEERS, REDIS_TARGETS, TARGET_NOTES, Deployed, Processes, deploy_serve_target, ray_session,
    ray_worker_niceness, read_json, rss_mb, start_baseline, start_retell_demo, write_llm_agent,
)

log = logging.getLogger("harness.suite")

AgentMode = Literal["flow", "llm"]
FLOW_TARGETS = ("floor", "baseline", "single", "python", "distributed", "event_driven", "dedicated")
LLM_TARGETS = ("floor", "floor_token", "baseline", "retell_demo", "retell_demo_pinned", "single", "distributed",
               "event_driven")
QUICK_TARGETS = ("floor", "baseline", "single", "distributed")
DEFAULT_LEVELS = (50, 100, 200, 300)
DEFAULT_LLM_LEVELS = (50, 100)
QUICK_LEVELS = (10, 30)
#: One actor per call costs ~160 MB here: dedicated placement is not pushed past this many calls.
DEDICATED_MAX_CALLS = 50
DEDICATED_IDLE_CALLS = 10
#: A level where more than this share of calls dropped ends the target's higher levels.
STOP_DROP_SHARE = 0.25
#: Fresh-deployment setup and the profile open this many calls (or the highest level below it).
FRESH_CALLS = 100
CACHE_CALLS = 20


class BenchOptions(BaseModel):
    """What one suite run measures."""

    model_config = ConfigDict(extra="forbid")

    agents: list[AgentMode] = Field(default_factory=lambda: ["flow", "llm"], description="Agent modes, in run order.")
    targets: list[str] | None = Field(None, description="Targets (default: every target of each mode).")
    levels: list[int] = Field(default_factory=lambda: list(DEFAULT_LEVELS), description="Flow mode: concurrent calls.")
    llm_levels: list[int] = Field(default_factory=lambda: list(DEFAULT_LLM_LEVELS),
                                  description="LLM mode: concurrent calls.")
    rounds: int = Field(3, ge=1, description="Rounds; a statistic is the median of the rounds' values.")
    turns: int = Field(3, ge=1, description="Caller turns per call.")
    think_s: float = Field(2.0, ge=0, description="Mean caller talk time before each request.")
    max_ramp_s: float = Field(5.0, ge=0, description="Calls of a level open within this many seconds "
                                                     "(0.05 s per call below 100 calls).")
    supersede_rate: float = Field(0.1, ge=0, le=1, description="Share of turns asked early and superseded.")
    reminder_rate: float = Field(0.05, ge=0, le=1, description="Share of turns that are reminders.")
    idle_calls: int | None = Field(None, ge=1, description="Idle calls for the memory measurement "
                                                           "(default: the highest flow level).")
    llm_ttft_ms: float = Field(200.0, ge=0, description="The fake LLM's time to first token.")
    llm_tokens_per_s: float = Field(50.0, gt=0, description="The fake LLM's token rate.")
    retell_demo: Path | None = Field(None, description="A checkout of RetellAI/retell-custom-llm-python-demo.")
    profile: bool = Field(False, description="Sample a callray replica with py-spy during one extra level.")
    seed: int = Field(7, description="Seed of the simulated callers.")
    quick: bool = Field(False, description="A small run; the report says so.")
    out: Path = Field(Path("docs/benchmarks.md"), description="The markdown report; plots go to <its dir>/img.")
    results_dir: Path = Field(Path("bench/results"), description="Where the raw results JSON goes.")
    command: str = Field("callray bench", description="The command line, quoted in the report.")

    def mode_targets(self, mode: str) -> list[str]:
        allowed = FLOW_TARGETS if mode == "flow" else LLM_TARGETS
        chosen = [t for t in (self.targets or allowed) if t in allowed]
        if self.retell_demo is None:
            chosen = [t for t in chosen if not t.startswith("retell_demo")]
        elif not (self.retell_demo / ".venv").exists() and self.targets is None:
            chosen = [t for t in chosen if t != "retell_demo_pinned"]
        return chosen

    def mode_levels(self, mode: str) -> list[int]:
        return sorted(set(self.levels if mode == "flow" else self.llm_levels))


# ====================================================================== one simulation


def simulate(config: SimConfig, console: Console, label: str) -> SimResult:
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        calls = bar.add_task(f"{label} calls", total=config.calls)
        turns = bar.add_task(f"{label} turns", total=config.calls * config.turns)

        def progress(calls_done: int, turns_done: int) -> None:
            bar.update(calls, completed=calls_done)
            bar.update(turns, completed=turns_done)

        return asyncio.run(run_simulation(config, progress))


def sim_config(deployed: Deployed, calls: int, options: BenchOptions, tag: str, seed: int, **extra: Any) -> SimConfig:
    values = dict(url=deployed.url, calls=calls, turns=options.turns, think_s=options.think_s,
                  ramp_s=min(options.max_ramp_s, 0.05 * calls), supersede_rate=options.supersede_rate,
                  reminder_rate=options.reminder_rate, seed=seed, call_id_prefix=tag,
                  holding_phrases=sorted(deployed.holding))
    values.update(extra)
    return SimConfig(**values)


async def hold_idle_calls(url: str, n: int, prefix: str, measure: Callable[[], float]) -> dict[str, Any]:
    """Open ``n`` calls, let each take its greeting, measure with all of them open, close them."""
    opened: list[RetellClient] = []
    limit = asyncio.Semaphore(20)

    async def open_one(i: int) -> None:
        call_id = f"{prefix}-{i}"
        client = RetellClient(url, call_id, call_object={"call_id": call_id, "agent_id": "agent_bench",
                                                         "call_type": "phone_call", "call_status": "ongoing"})
        async with limit:
            opened.append(await client.connect())
            await client.complete(0, timeout=30)

    before = measure()
    outcomes = await asyncio.gather(*(open_one(i) for i in range(n)), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    await asyncio.sleep(3)  # let the servers settle (lazy allocations, GC) with every call open
    after = measure()
    await asyncio.gather(*(asyncio.wait_for(client.close(), 10) for client in opened), return_exceptions=True)
    held = n - len(failures)
    return {"calls": held, "failed": len(failures), "rest_mb": round(before, 1), "open_mb": round(after, 1),
            "per_call_kb": round((after - before) * 1024 / held, 1) if held else None,
            "error": repr(failures[0]) if failures else None}


def _lat(result: SimResult, metric: str) -> dict[str, Any]:
    return describe(result.samples()[metric])


# ====================================================================== one mode


class ModeRun:
    """Everything one agent mode measures (see the module docstring)."""

    def __init__(self, mode: str, options: BenchOptions, console: Console, procs: Processes, tag: str,
                 serve_port: int, redis_url: str | None, llm_url: str | None, agent_file: Path | None,
                 save: Callable[[], None]):
        self.mode, self.options, self.console, self.procs, self.tag = mode, options, console, procs, tag
        self.serve_port, self.redis_url, self.llm_url, self.agent_file = serve_port, redis_url, llm_url, agent_file
        self.save = save
        self.deployed: dict[str, Deployed] = {}
        self.results: dict[str, Any] = {"targets": {}}
        self.niceness = 0

    def namespace(self, target: str) -> str:
        return f"bench-{self.tag}-{target}-{self.mode}"

    def entry(self, target: str) -> dict[str, Any]:
        return self.results["targets"].setdefault(target, {"status": "ok", "error": None, "levels": [],
                                                           "memory": None, "notes": []})

    def fail(self, target: str, exc: BaseException, status: str = "failed") -> None:
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        entry = self.entry(target)
        entry.update(status=status, error=f"{exc.__class__.__name__}: {first_line}")
        self.console.log(f"[red]{target}/{self.mode}: {status}: {escape(repr(exc))}[/]")
        deployed = self.deployed.pop(target, None)
        if deployed is not None:
            deployed.teardown()

    # ------------------------------------------------------------------ deploying

    def deploy(self, target: str) -> Deployed:
        """One target, answering with the flow agent (flow mode) or from the fake LLM (LLM mode)."""
        llm = self.llm_url if self.mode == "llm" else None
        if target == "baseline":
            return start_baseline(self.procs, llm, self.niceness)
        if target.startswith("retell_demo"):
            return start_retell_demo(self.procs, self.options.retell_demo, llm, self.niceness,
                                     pinned=target == "retell_demo_pinned")
        return deploy_serve_target(target, self.serve_port, namespace=self.namespace(target), redis_url=self.redis_url,
                                   llm_base_url=llm, agent_file=self.agent_file if llm and target in CALLRAY_TARGETS else None)

    def deploy_all(self, targets: list[str]) -> None:
        serve_first = sorted(targets, key=lambda t: t in PEERS)  # the peers' niceness is read from Serve
        for target in serve_first:
            self.entry(target)
            try:
                self.console.log(f"{target}/{self.mode}: deploying")
                self.deployed[target] = self.deploy(target)
                self.entry(target)["notes"] += self.deployed[target].notes
            except Exception as exc:  # one target failing must not lose the others
                self.fail(target, exc, "not available" if target in ("dedicated", *PEERS) else "failed")
                continue
            if target not in PEERS and not self.niceness:
                self.niceness = ray_worker_niceness(target)
                self.console.log(f"Ray runs its workers at nice {self.niceness}; peers outside Ray will too")

    # ------------------------------------------------------------------ measuring

    def warm_up(self) -> None:
        for target, deployed in list(self.deployed.items()):
            warm = simulate(SimConfig(url=deployed.url, calls=4, turns=1, think_s=0.2,
                                      call_id_prefix=f"warm-{self.tag}-{target}"), self.console, f"{target} warm-up")
            if warm.counts.get("calls_completed", 0) == 0:
                self.fail(target, RuntimeError(f"warm-up: no call completed (dropped {warm.dropped}, "
                                               f"violations {warm.violations})"))

    def memory(self) -> None:
        n_idle = self.options.idle_calls or max(self.options.levels)
        for target, deployed in self.deployed.items():
            n = min(n_idle, DEDICATED_IDLE_CALLS) if target == "dedicated" else n_idle
            self.console.log(f"{target}/{self.mode}: memory: opening {n} idle calls")
            mem = asyncio.run(hold_idle_calls(deployed.url, n, f"idle-{self.tag}-{target}-{self.mode}",
                                              lambda d=deployed: rss_mb([pid for _, pid in d.processes()])))
            procs = deployed.processes()
            mem.update(processes=len(procs), kinds=sorted({kind.split(":")[0] for kind, _ in procs}))
            self.entry(target)["memory"] = mem
            self.console.log(f"{target}/{self.mode}: {mem['rest_mb']:.0f} MB at rest, {mem['per_call_kb']} KB per "
                             f"idle call over {len(procs)} processes")
        self.save()

    def idle_turn(self) -> None:
        """One call alone, ten turns: the per-turn cost without any load."""
        out = {}
        for target, deployed in self.deployed.items():
            result = simulate(sim_config(deployed, 1, self.options, f"one-{self.tag}-{target}", self.options.seed,
                                         turns=10, think_s=0.3, supersede_rate=0, reminder_rate=0),
                              self.console, f"{target} one call")
            out[target] = {"calls": 1, "turns": result.counts.get("turns_answered", 0),
                           "first_chunk_ms": _lat(result, "first_chunk_ms"), "ok": result.ok}
        self.results["idle_turn"] = out
        self.save()

    def rounds(self, targets: list[str]) -> None:
        rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
        stopped: dict[str, str] = {}
        levels = self.options.mode_levels(self.mode)
        for r in range(self.options.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)] if targets else []
            for calls in levels:
                for target in order:
                    deployed = self.deployed.get(target)
                    if deployed is None or target in stopped:
                        continue
                    if target == "dedicated" and calls > DEDICATED_MAX_CALLS:
                        continue
                    config = sim_config(deployed, calls, self.options, f"{target}-{self.mode}-{calls}-r{r}",
                                        self.options.seed + calls + 1000 * r)
                    result = simulate(config, self.console, f"round {r + 1} {target}/{self.mode} {calls}")
                    stats = round_stats(result)
                    rounds.setdefault((target, calls), []).append(stats)
                    lat = stats["latency_ms"]
                    self.console.log(
                        f"round {r + 1}/{self.options.rounds} {target}/{self.mode} {calls} calls: first chunk p50/p99 "
                        f"{lat['first_chunk_ms']['p50']}/{lat['first_chunk_ms']['p99']} ms, first sentence "
                        f"{lat['first_sentence_ms']['p50']}/{lat['first_sentence_ms']['p99']} ms"
                        + ("" if stats["ok"] else escape(f"; violations {stats['violations']} dropped {stats['dropped']}")))
                    self._store(target, rounds, stopped)
                    if sum(stats["dropped"].values()) > STOP_DROP_SHARE * calls:
                        stopped[target] = f"{calls} calls dropped {sum(stats['dropped'].values())} calls in round {r + 1}"
                    time.sleep(1)  # let the previous level's sockets close

    def _store(self, target: str, rounds: dict[tuple[str, int], list[dict[str, Any]]], stopped: dict[str, str]) -> None:
        entry = self.entry(target)
        levels = [aggregate(calls, rs) for (t, calls), rs in sorted(rounds.items(), key=lambda kv: kv[0][1])
                  if t == target]
        if target in stopped:
            done = {lv["calls"] for lv in levels}
            levels += [{"calls": c, "skipped": stopped[target]} for c in self.options.mode_levels(self.mode)
                       if c not in done]
        entry["levels"] = levels
        self.save()

    def fresh_setup(self) -> None:
        """Call setup right after a deployment becomes healthy, for the floor and the default config."""
        out: dict[str, Any] = {}
        calls = min(FRESH_CALLS, max(self.options.levels))
        for target in ("floor", "single"):
            if target not in self.deployed:
                continue
            samples: list[float] = []
            rounds = 0
            for r in range(self.options.rounds):
                self.deployed.pop(target).teardown()
                self.deployed[target] = self.deploy(target)
                result = simulate(sim_config(self.deployed[target], calls, self.options,
                                             f"fresh-{self.tag}-{target}-r{r}", self.options.seed + r, turns=1,
                                             ramp_s=1.0, think_s=0.5), self.console, f"{target} fresh deployment")
                samples += result.samples()["setup_ms"]
                rounds += 1
            out[target] = {"calls": calls, "rounds": rounds, "setup_ms": describe(samples)}
        self.results["fresh_setup"] = out
        self.save()

    def cache_hits(self) -> None:
        """Calls asking the agent's common questions on the distributed config (pre-cached in Redis)."""
        deployed = self.deployed.get("distributed")
        if deployed is None:
            return
        import yaml

        questions = yaml.safe_load((PROJECT_DIR / "config/agents/clinic.yaml").read_text())["common_questions"]
        config = sim_config(deployed, CACHE_CALLS, self.options, f"cache-{self.tag}", self.options.seed, turns=2,
                            caller_lines=questions, supersede_rate=0, reminder_rate=0, think_s=1.0, ramp_s=1.0)
        result = simulate(config, self.console, "cache hits")
        server: list[float] = []
        hits = answered = 0
        for call in result.calls:
            record = read_json(f"{deployed.http_base}/calls/{call.call_id}", wait_s=20)
            for turn in (record or {}).get("turns", []):
                answered += 1
                if turn.get("cache_hit"):
                    hits += 1
                    server.append(turn["timings"]["first_chunk_ms"])
        self.results.setdefault("scenarios", {})["cache_hit"] = {
            "target": "distributed", "calls": CACHE_CALLS, "turns": 2, "answered": answered, "hits": hits,
            "server_first_chunk_ms": describe(server), "client_first_chunk_ms": _lat(result, "first_chunk_ms"),
            "ok": result.ok}
        self.save()

    def profile(self, target: str = "single") -> None:
        deployed = self.deployed.get(target)
        if deployed is None:
            return
        calls = min(FRESH_CALLS, max(self.options.mode_levels(self.mode)))
        replicas = [pid for kind, pid in deployed.processes() if kind.startswith("ServeReplica")]
        info: dict[str, Any] = {"target": target, "calls": calls}
        try:
            if not replicas:
                raise RuntimeError(f"no replica process of {target} found")
            duration = self.options.turns * self.options.think_s + min(self.options.max_ramp_s, 0.05 * calls)
            raw = Path(self.options.results_dir) / f"profile-{self.tag}-{target}-{self.mode}.txt"
            raw.parent.mkdir(parents=True, exist_ok=True)
            _, summary = profile.during(replicas[0], duration, raw, lambda: simulate(
                sim_config(deployed, calls, self.options, f"profile-{self.tag}-{target}", self.options.seed),
                self.console, f"{target} under py-spy"))
            info.update(summary, pid=replicas[0], rate=100, duration_s=duration,
                        raw_path=os.path.relpath(raw.resolve(), PROJECT_DIR) if raw.resolve().is_relative_to(PROJECT_DIR)
                        else str(raw))
        except Exception as exc:  # a profile is a bonus, never a failed run
            info["error"] = f"{exc.__class__.__name__}: {exc}"
            self.console.log(f"[yellow]profile of {target}/{self.mode} not taken: {escape(info['error'])}[/]")
        self.results["profile"] = info
        self.save()

    def run(self) -> dict[str, Any]:
        """Every target but ``dedicated`` side by side, in rounds; then ``dedicated`` alone: its
        actors (one process per call) would load the machine under every other target."""
        targets = self.options.mode_targets(self.mode)
        together = [t for t in targets if t != "dedicated"]
        try:
            self.deploy_all(together)
            self.results["niceness"] = self.niceness
            self.warm_up()
            self.memory()
            if self.mode == "flow":
                self.idle_turn()
            self.rounds([t for t in together if t in self.deployed])
            if self.mode == "flow":
                self.cache_hits()
                self.fresh_setup()
            if self.options.profile:
                self.profile()
            self.teardown()
            if "dedicated" in targets:
                self.deploy_all(["dedicated"])
                self.warm_up()
                self.memory()
                self.rounds([t for t in ("dedicated",) if t in self.deployed])
                self.entry("dedicated")["notes"].append("measured alone, after the other targets were torn down")
        finally:
            self.teardown()
        return self.results

    def teardown(self) -> None:
        for deployed in self.deployed.values():
            with contextlib.suppress(Exception):
                deployed.teardown()
        self.deployed.clear()


# ====================================================================== the suite


def machine_info() -> dict[str, Any]:
    cpu, memory_kb = None, 0
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    with contextlib.suppress(OSError, StopIteration, ValueError):
        memory_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                             if line.startswith("MemTotal")))
    try:
        ray_version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        ray_version = "not installed"
    return {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": cpu, "memory_gb": round(memory_kb / 2**20, 1), "ray": ray_version,
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}",
            "load_1m": round(os.getloadavg()[0], 2)}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_suite(options: BenchOptions, console: Console) -> tuple[dict[str, Any], Path]:
    """Run every agent mode and return the results and where the raw JSON was saved."""
    started = time.monotonic()
    tag = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results_path = (options.results_dir / f"{tag}.json").resolve()
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "schema": 2, "started_at": _now(), "command": options.command, "quick": options.quick, "complete": False,
        "machine": machine_info(),
        "settings": {
            "agents": list(options.agents), "levels": options.mode_levels("flow"),
            "llm_levels": options.mode_levels("llm"), "rounds": options.rounds, "turns": options.turns,
            "think_s": options.think_s, "max_ramp_s": options.max_ramp_s, "supersede_rate": options.supersede_rate,
            "reminder_rate": options.reminder_rate, "idle_calls": options.idle_calls or max(options.levels),
            "llm": {"ttft_ms": options.llm_ttft_ms, "tokens_per_s": options.llm_tokens_per_s},
            "targets_run": sorted({t for m in options.agents for t in options.mode_targets(m)},
                                  key=lambda t: (FLOW_TARGETS + LLM_TARGETS).index(t)),
            "target_notes": TARGET_NOTES,  # what each target was when measured (configs change later)
        },
        "modes": {},
    }

    def save() -> None:
        results["duration_s"] = round(time.monotonic() - started, 1)
        results_path.write_text(json.dumps(results))

    tmp = Path(tempfile.mkdtemp(prefix="callray-bench-"))
    procs = Processes(tmp)
    previous_cwd = os.getcwd()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    os.chdir(PROJECT_DIR)  # the archive directory of the callray targets is relative to it
    try:
        needs = {t for m in options.agents for t in options.mode_targets(m)}
        redis_url = procs.start_redis(tmp / "redis") if needs & set(REDIS_TARGETS) else None
        if redis_url:
            console.log(f"private redis-server at {redis_url}")
        llm_url = agent_file = None
        if "llm" in options.agents:
            llm_url = procs.start_fake_llm(options.llm_ttft_ms, options.llm_tokens_per_s)
            agent_file = write_llm_agent(tmp, llm_url)
            console.log(f"fake LLM at {llm_url} (TTFT {options.llm_ttft_ms:.0f} ms, "
                        f"{options.llm_tokens_per_s:.0f} tokens/s)")
        with ray_session(console) as serve_port:
            for mode in options.agents:
                console.rule(f"{mode} agent")
                run = ModeRun(mode, options, console, procs, tag, serve_port, redis_url, llm_url, agent_file, save)
                results["modes"][mode] = run.results
                run.run()
                results["niceness"] = results.get("niceness") or run.niceness
                save()
        results["complete"] = True
    finally:
        results["finished_at"] = _now()
        save()
        procs.close()
        signal.signal(signal.SIGTERM, previous_sigterm)
        os.chdir(previous_cwd)
        if results["complete"]:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            console.log(f"logs of the redis, fake LLM and peer processes kept in {tmp}")
    return results, results_path


def run_until_interrupted(run: Callable[[], Any], console: Console) -> Any | None:
    """``run()`` such that Ctrl-C or SIGTERM still runs its cleanup; None when interrupted."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a kill still runs the cleanup
    try:
        return run()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process this run started was stopped[/]")
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_check(run: Callable[[Console], dict[str, Any]], print_report: Callable[[dict[str, Any], Console], None]) -> int:
    """A standalone check's command (``callray chaos``, ``callray soak``): run it so that Ctrl-C
    still cleans up, print its report and where it was written; exit 0 only when it passed."""
    console = Console()
    report = run_until_interrupted(lambda: run(console), console)
    if report is None:
        return 130
    print_report(report, console)
    console.print(f"report: {report['path']}" + (f", plot: {report['plot']}" if report.get("plot") else ""))
    return 0 if report["summary"]["ok"] else 1


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ====================================================================== command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``callray bench`` options."""
    parser.add_argument("--quick", action="store_true",
                        help=f"a small run: targets {' '.join(QUICK_TARGETS)}, levels "
                             f"{' '.join(map(str, QUICK_LEVELS))}, 2 rounds, flow agent (a few minutes)")
    parser.add_argument("--targets", nargs="+", choices=sorted(set(FLOW_TARGETS + LLM_TARGETS)), metavar="TARGET",
                        help=f"targets to run (default: all of each mode: flow {' '.join(FLOW_TARGETS)}; "
                             f"llm {' '.join(LLM_TARGETS)})")
    parser.add_argument("--levels", nargs="+", type=int, metavar="CALLS",
                        help=f"flow mode: concurrent calls (default: {' '.join(map(str, DEFAULT_LEVELS))})")
    parser.add_argument("--llm-levels", nargs="+", type=int, metavar="CALLS",
                        help=f"LLM mode: concurrent calls (default: {' '.join(map(str, DEFAULT_LLM_LEVELS))})")
    parser.add_argument("--agent", nargs="+", choices=("flow", "llm"), dest="agents",
                        help="agent modes: flow (no LLM) and/or llm (fake LLM) (default: both)")
    parser.add_argument("--rounds", type=int, help="rounds per level; statistics are medians of rounds (default: 3)")
    parser.add_argument("--turns", type=int, default=3, help="caller turns per call (default: 3)")
    parser.add_argument("--idle-calls", type=int, help="idle calls for the memory measurement "
                                                       "(default: the highest flow level)")
    parser.add_argument("--retell-demo", type=Path, metavar="PATH",
                        help="a local checkout of RetellAI/retell-custom-llm-python-demo to measure beside callray "
                             "in LLM mode: on this interpreter (retell_demo), and in PATH/.venv with its pinned "
                             "requirements when that exists (retell_demo_pinned); skipped when absent")
    parser.add_argument("--profile", action="store_true", help="sample a callray replica with py-spy during one "
                                                               "extra level per mode")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"),
                        help="markdown report; plots go to <its dir>/img (default: docs/benchmarks.md)")
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"),
                        help="where the raw results JSON goes (default: bench/results)")
    parser.add_argument("--from-json", type=Path, metavar="RESULTS",
                        help="only regenerate the report and plots from a saved results file")


def command_line(args: argparse.Namespace) -> str:
    """The ``callray bench`` command that reproduces ``args`` (quoted in the report)."""
    parts = ["callray bench"]
    if args.quick:
        parts.append("--quick")
    for flag, value in (("--targets", args.targets), ("--levels", args.levels), ("--llm-levels", args.llm_levels),
                        ("--agent", args.agents)):
        if value:
            parts.append(flag + " " + " ".join(map(str, value)))
    for flag, value in (("--rounds", args.rounds), ("--idle-calls", args.idle_calls),
                        ("--retell-demo", args.retell_demo)):
        if value:
            parts.append(f"{flag} {value}")
    if args.turns != 3:
        parts.append(f"--turns {args.turns}")
    if args.profile:
        parts.append("--profile")
    return " ".join(parts)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from parsed ``callray bench`` arguments (``--quick`` sets the small defaults)."""
    quick = bool(args.quick)
    values: dict[str, Any] = {
        "quick": quick,
        "targets": args.targets or (list(QUICK_TARGETS) if quick else None),
        "levels": sorted(set(args.levels or (QUICK_LEVELS if quick else DEFAULT_LEVELS))),
        "llm_levels": sorted(set(args.llm_levels or (QUICK_LEVELS if quick else DEFAULT_LLM_LEVELS))),
        "agents": args.agents or (["flow"] if quick else ["flow", "llm"]),
        "rounds": args.rounds or (2 if quick else 3),
        "turns": args.turns,
        "idle_calls": args.idle_calls,
        "retell_demo": args.retell_demo.resolve() if args.retell_demo else None,
        "profile": args.profile,
        "out": args.out.resolve(),
        "results_dir": args.results_dir.resolve(),
        "command": command_line(args),
    }
    if any(level < 1 for level in values["levels"] + values["llm_levels"]):
        raise ValueError(f"levels must be positive, got {values['levels']} / {values['llm_levels']}")
    if values["retell_demo"] is not None and not (values["retell_demo"] / "app" / "server.py").exists():
        raise ValueError(f"--retell-demo {values['retell_demo']}: not a checkout of "
                         "RetellAI/retell-custom-llm-python-demo (no app/server.py)")
    return BenchOptions(**values)


def run_command(args: argparse.Namespace) -> int:
    """``callray bench``: run the suite (or only the report), write results and report."""
    console = Console()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        files = write_report(results, args.out, args.from_json)
        console.print("wrote " + ", ".join(str(f) for f in files))
        return 0
    try:
        options = options_from_args(args)
    except ValueError as exc:
        console.print(f"[red]bad bench options:[/] {exc}")
        return 2
    if options.retell_demo is None and "llm" in options.agents:
        console.print("[yellow]Retell's demo is not measured: pass --retell-demo PATH (a local checkout of "
                      "RetellAI/retell-custom-llm-python-demo) to compare against it[/]")
    console.log(f"callray bench: agents {' '.join(options.agents)}; {options.rounds} rounds; flow levels "
                f"{' '.join(map(str, options.mode_levels('flow')))}; llm levels "
                f"{' '.join(map(str, options.mode_levels('llm')))}")
    try:
        results, raw = run_suite(options, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process the suite started was stopped; partial raw results "
                      f"are in {options.results_dir}[/]")
        return 130
    files = write_report(results, options.out, raw)
    console.print(f"raw results: {raw}")
    console.print("report: " + ", ".join(str(f) for f in files))
    return 0
