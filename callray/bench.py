"""``callray bench``: the benchmark suite behind ``docs/benchmarks.md``.

Every target (the bare Serve floor, the hand-written baseline server, callray in each of the
three architectures and with dedicated placement) is deployed in turn and driven by the
Retell simulator at several concurrency levels, in one run on one machine, so each number can
be read against the floor measured next to it. The suite starts everything it needs itself (a
private local Ray with Serve on a free port, a private redis-server, the fake LLM, the
baseline server) and stops each of them by its process id or handle on every exit path,
Ctrl-C included. It writes the raw results as JSON and the report as markdown with plots.

Ray, matplotlib and psutil are imported inside the functions that need them, so this module
(``callray bench --help``, the report generator) loads without them.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from callray.settings import PROJECT_DIR, CallraySettings
from callray.sim.local import RedisServer, free_port
from callray.sim.report import SimResult, describe
from callray.sim.simulator import SimConfig, call_url, run_simulation

log = logging.getLogger("callray.bench")

Target = Literal["floor", "baseline", "single", "distributed", "event_driven", "dedicated"]
AgentMode = Literal["flow", "llm"]

ALL_TARGETS: tuple[str, ...] = ("floor", "baseline", "single", "distributed", "event_driven", "dedicated")
QUICK_TARGETS: tuple[str, ...] = ("floor", "single", "distributed")
DEFAULT_LEVELS: tuple[int, ...] = (10, 50, 100, 200)
QUICK_LEVELS: tuple[int, ...] = (10, 30)
#: The seed's latency budgets (server time to first sentence) of the three architectures.
BUDGETS_MS: dict[str, float] = {"single": 800.0, "distributed": 500.0, "event_driven": 300.0}
#: callray targets and the config file each one deploys.
CONFIG_FILES: dict[str, str] = {"single": "config/single.yaml", "distributed": "config/distributed.yaml",
                                "event_driven": "config/event_driven.yaml", "dedicated": "config/single.yaml"}
REDIS_TARGETS = ("distributed", "event_driven")
TARGET_NOTES: dict[str, str] = {
    "floor": "bench/floor_app.py: a bare Serve WebSocket deployment, same protocol, no actors, no state",
    "baseline": "bench/baseline_server.py: one hand-written FastAPI process in the style of Retell's demo",
    "single": "callray, config/single.yaml: 1 gateway replica, 1 call host, state and cache in memory",
    "distributed": "callray, config/distributed.yaml: 2 gateway replicas, 4 call hosts, state and cache in Redis",
    "event_driven": "callray, config/event_driven.yaml: autoscaled gateway (1-8), 4 hosts, Redis, Redis Streams events",
    "dedicated": "callray, config/single.yaml with hosts.placement: dedicated (one Ray actor per call, warm pool)",
}
LATENCY_METRICS = ("setup_ms", "first_chunk_ms", "first_sentence_ms", "complete_ms")
SAMPLE_METRICS = ("setup_ms", "first_chunk_ms", "first_sentence_ms")
#: One actor per call costs 90-160 MB here: dedicated placement is not pushed past this many calls,
#: nor past half the free memory, and its memory is measured with fewer idle calls.
DEDICATED_MAX_CALLS = 50
DEDICATED_IDLE_CALLS = 10
#: A level where more than this share of calls dropped ends the target's run (it is saturated).
STOP_DROP_SHARE = 0.25


class BenchOptions(BaseModel):
    """What one suite run measures."""

    model_config = ConfigDict(extra="forbid")

    targets: list[Target] = Field(default_factory=lambda: list(ALL_TARGETS), description="Targets, in run order.")
    levels: list[int] = Field(default_factory=lambda: list(DEFAULT_LEVELS),
                              description="Concurrent calls per measurement, ascending.")
    agents: list[AgentMode] = Field(default_factory=lambda: ["flow", "llm"],
                                    description="flow: callray's default flow agent, echo answers for floor and "
                                                "baseline. llm: every target streams from the fake LLM.")
    turns: int = Field(3, ge=1, description="Caller turns per call.")
    think_s: float = Field(2.0, ge=0, description="Mean caller talk time before each request: long enough "
                                                  "that the calls of a level overlap.")
    max_ramp_s: float = Field(5.0, ge=0, description="Calls of a level open within this many seconds "
                                                     "(0.05 s per call below 100 calls).")
    supersede_rate: float = Field(0.1, ge=0, le=1, description="Share of turns asked early and superseded.")
    reminder_rate: float = Field(0.05, ge=0, le=1, description="Share of turns that are reminders.")
    idle_calls: int | None = Field(None, ge=1, description="Idle calls opened for the memory measurement "
                                                           "(default: the highest level).")
    llm_ttft_ms: float = Field(200.0, ge=0, description="The fake LLM's time to first token.")
    llm_tokens_per_s: float = Field(50.0, gt=0, description="The fake LLM's token rate.")
    seed: int = Field(7, description="Seed of the simulated callers (per level: seed + calls).")
    quick: bool = Field(False, description="A small run; the report says so.")
    out: Path = Field(Path("docs/benchmarks.md"), description="The markdown report; plots go to <its dir>/img.")
    results_dir: Path = Field(Path("bench/results"), description="Where the raw results JSON goes.")
    command: str = Field("python -m callray.cli bench", description="The command line, quoted in the report.")


# ====================================================================== measurement helpers


def ratio(value: float | None, floor: float | None) -> float | None:
    """``value / floor`` rounded to 2 places; None when either is missing or the floor is 0."""
    if value is None or floor is None or floor <= 0:
        return None
    return round(value / floor, 2)


def capacity(levels: list[dict[str, Any]], budget_ms: float, metric: str = "first_sentence_ms") -> dict[str, Any]:
    """The largest tested concurrency whose p99 ``metric`` stays within ``budget_ms``.

    Levels are taken in ascending order and the first one over budget (or with a dropped call
    or a protocol violation) ends the search, so a lucky higher level cannot count. Returns
    ``calls`` (None: not even the lowest level fits), ``bounded`` (False: every tested level
    fit, so the capacity is at least ``calls``) and ``lowest`` (the lowest tested level).
    """
    measured = sorted((lv for lv in levels if not lv.get("skipped")), key=lambda lv: lv["calls"])
    best: int | None = None
    bounded = False
    for lv in measured:
        p99 = lv["latency_ms"][metric]["p99"]
        if p99 is None or p99 > budget_ms or not lv["ok"]:
            bounded = True
            break
        best = lv["calls"]
    return {"calls": best, "bounded": bounded, "lowest": measured[0]["calls"] if measured else None}


def format_capacity(cap: dict[str, Any]) -> str:
    if cap["lowest"] is None:
        return "-"
    if cap["calls"] is None:
        return f"< {cap['lowest']}"
    return f"≥ {cap['calls']}" if not cap["bounded"] else str(cap["calls"])


def frames_sent(counts: dict[str, int]) -> int:
    """Frames the simulator sent: requests, partial transcripts, pings, one call_details per socket."""
    return (counts.get("requests_sent", 0) + counts.get("update_only_sent", 0) + counts.get("pings_sent", 0)
            + counts.get("calls", 0) + counts.get("reconnects", 0))


def level_stats(result: SimResult, *, calls: int, frames_in: int, holding: int,
                ttft_ms: float | None) -> dict[str, Any]:
    """One measured level: percentiles, counts, frame rates and the raw samples for the plots.

    ``frames_in`` is every frame the simulator received, ``holding`` how many of them were a
    holding phrase; ``ttft_ms`` (LLM mode) adds the overhead above the LLM's first token.
    """
    summary = result.summary()
    samples = result.samples()
    duration = max(result.duration_s, 1e-9)
    out_frames = frames_sent(summary["counts"])
    overhead = None
    if ttft_ms is not None:
        overhead = {
            "first_chunk": describe(x - ttft_ms for x in samples["first_chunk_ms"]),
            "first_sentence": describe(x - ttft_ms for x in samples["first_sentence_ms"]),
        }
    return {
        "calls": calls,
        "duration_s": round(result.duration_s, 3),
        "ok": summary["ok"],
        "violations": summary["violations"],
        "warnings": summary["warnings"],
        "dropped": summary["dropped"],
        "examples": {k: v[:2] for k, v in summary["examples"].items()},
        "counts": summary["counts"],
        "simulator_bottleneck": summary["simulator_bottleneck"],
        "loop_lag_p99_ms": summary["loop_lag_ms"]["p99"],
        "latency_ms": {m: summary["latency_ms"][m] for m in LATENCY_METRICS},
        "overhead_ms": overhead,
        "holding_phrases": holding,
        "frames_in": frames_in,
        "frames_out": out_frames,
        "frames_in_per_s": round(frames_in / duration, 1),
        "frames_per_s": round((frames_in + out_frames) / duration, 1),
        "samples": {m: [round(x, 1) for x in samples[m]] for m in SAMPLE_METRICS},
    }


@dataclass
class FrameTap:
    """Counts the frames the simulator receives (and holding phrases among them).

    The simulator judges every received frame with ``validate_frame``; wrapping that function
    for the duration of one in-process run counts frames without touching the simulator.
    """

    holding: frozenset[str] = frozenset()
    frames: int = 0
    holding_count: int = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[FrameTap]:
        from callray.sim import simulator

        original = simulator.validate_frame

        def counting(raw: str | bytes) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
            data, issues = original(raw)
            self.frames += 1
            if (data is not None and self.holding and data.get("response_type") == "response"
                    and str(data.get("content", "")).strip() in self.holding):
                self.holding_count += 1
            return data, issues

        simulator.validate_frame = counting
        try:
            yield self
        finally:
            simulator.validate_frame = original


# ====================================================================== the report


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list[str]], align: str = "l") -> str:
    """A markdown table; ``align`` gives l/r per column, the last letter repeating (default: first left,
    the rest right, for a name followed by numbers)."""
    align = align if len(align) > 1 else "lr"
    marks = [{"l": "---", "r": "---:"}[align[min(i, len(align) - 1)]] for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _measured(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [lv for lv in entry.get("levels", []) if not lv.get("skipped")]


def _level(entry: dict[str, Any] | None, calls: int) -> dict[str, Any] | None:
    if not entry:
        return None
    return next((lv for lv in _measured(entry) if lv["calls"] == calls), None)


def _stat(level: dict[str, Any] | None, metric: str, stat: str) -> float | None:
    return None if level is None else level["latency_ms"][metric][stat]


def floor_ratio(mode: dict[str, Any], target: str, calls: int, metric: str = "first_sentence_ms",
                stat: str = "p50") -> float | None:
    """``target``'s statistic over the floor's, both measured at ``calls`` in the same run."""
    targets = mode["targets"]
    return ratio(_stat(_level(targets.get(target), calls), metric, stat),
                 _stat(_level(targets.get("floor"), calls), metric, stat))


def _latency_table(mode_name: str, mode: dict[str, Any]) -> str:
    headers = ["target", "calls", "setup p50", "setup p99", "first chunk p50", "first chunk p99",
               "first sentence p50", "first sentence p99", "× floor p50/p99"]
    if mode_name == "llm":
        headers += ["over TTFT p50", "over TTFT p99", "holding"]
    headers += ["complete p99", "ok"]
    rows = []
    for target, entry in mode["targets"].items():
        for lv in _measured(entry):
            lat = lv["latency_ms"]
            r50, r99 = (floor_ratio(mode, target, lv["calls"], stat=s) for s in ("p50", "p99"))
            row = [target, str(lv["calls"]),
                   _fmt(lat["setup_ms"]["p50"]), _fmt(lat["setup_ms"]["p99"]),
                   _fmt(lat["first_chunk_ms"]["p50"]), _fmt(lat["first_chunk_ms"]["p99"]),
                   _fmt(lat["first_sentence_ms"]["p50"]), _fmt(lat["first_sentence_ms"]["p99"]),
                   "-" if target == "floor" else f"{_fmt(r50, 2)} / {_fmt(r99, 2)}"]
            if mode_name == "llm":
                over = (lv.get("overhead_ms") or {}).get("first_sentence") or {}
                requests = lv["counts"].get("requests_sent", 0)
                share = f"{100 * lv.get('holding_phrases', 0) / requests:.0f}%" if requests else "-"
                row += [_fmt(over.get("p50")), _fmt(over.get("p99")), share]
            problems = [f"{k} {v}" for k, v in {**lv["violations"], **{f"dropped:{k}": v for k, v in lv["dropped"].items()}}.items()]
            if lv["simulator_bottleneck"]:
                problems.append("simulator lagged")
            row += [_fmt(lat["complete_ms"]["p99"]), "yes" if not problems else "no: " + ", ".join(problems)]
            rows.append(row)
    return _table(headers, rows)


def _capacity_table(mode: dict[str, Any]) -> str:
    rows = []
    for target, entry in mode["targets"].items():
        levels = _measured(entry)
        if not levels:
            continue
        rows.append([target] + [format_capacity(capacity(levels, b)) for b in BUDGETS_MS.values()])
    return _table(["target"] + [f"p99 first sentence ≤ {b:.0f} ms ({a})" for a, b in BUDGETS_MS.items()], rows)


def _memory_table(mode: dict[str, Any]) -> str:
    rows = []
    for target, entry in mode["targets"].items():
        mem = entry.get("memory")
        if not mem:
            continue
        rows.append([target, _fmt(mem["rest_mb"], 0), _fmt(mem["per_call_kb"], 0), str(mem["calls"]),
                     str(mem["processes"]), ", ".join(mem.get("kinds", []))])
    if not rows:
        return ""
    return _table(["target", "resident at rest (MB)", "per idle call (KB)", "idle calls", "processes", "what"], rows,
                  "lrrrrl")


def _frames_table(mode: dict[str, Any]) -> str:
    rows = []
    for target, entry in mode["targets"].items():
        levels = _measured(entry)
        if not levels:
            continue
        top = max(levels, key=lambda lv: lv["calls"])
        rows.append([target, str(top["calls"]), _fmt(top["frames_in_per_s"], 0), _fmt(top["frames_per_s"], 0),
                     str(top["frames_in"] + top["frames_out"])])
    return _table(["target", "calls", "frames/s received by the simulator", "frames/s both directions",
                   "frames"], rows)


def _bounds(mode_name: str, mode: dict[str, Any]) -> list[str]:
    """What limits each target, with this run's numbers."""
    targets = mode["targets"]
    out = []

    def top(target: str) -> dict[str, Any] | None:
        levels = _measured(targets.get(target) or {})
        return max(levels, key=lambda lv: lv["calls"]) if levels else None

    def vs_floor(target: str) -> str:
        lv = top(target)
        if lv is None:
            return ""
        r = floor_ratio(mode, target, lv["calls"], stat="p99")
        return f" At {lv['calls']} calls its p99 first sentence is {_fmt(r, 2)}× the floor's." if r else ""

    if top("floor"):
        lv = top("floor")
        out.append(f"**floor** — the Serve proxy: one Python process per node relays every frame of every socket "
                   f"(it saturates near 650–700 frames/s on this machine; this run moved "
                   f"{_fmt(lv['frames_per_s'], 0)} frames/s at {lv['calls']} calls). Serve's opt-in direct ingress "
                   "(RAY_SERVE_ENABLE_DIRECT_INGRESS=1) bypasses it.")
    if top("baseline"):
        out.append("**baseline** — one Python process and one event loop for every socket and every LLM stream, "
                   "an untracked task per message and a new OpenAI client per call (setup cost in LLM mode); "
                   "it cannot use a second core, and a crash loses every call." + vs_floor("baseline"))
    if top("single"):
        out.append("**single** — the floor plus one Ray actor call per event (gateway replica → call host, "
                   "1–3 ms each under load) and the outbound stream back; one host process (one event loop) runs "
                   "the conversation and the agent of every call." + vs_floor("single"))
    if top("distributed"):
        out.append("**distributed** — adds Redis round trips per turn (state checkpoint, shared response cache) "
                   "and runs 2 gateway replicas and 4 hosts; on one small machine they share the same cores, so "
                   "it pays for redundancy here and gains capacity only with more nodes." + vs_floor("distributed"))
    if top("event_driven"):
        extra = ""
        lv = top("event_driven")
        if mode_name == "llm" and lv and lv["counts"].get("requests_sent"):
            share = 100 * lv.get("holding_phrases", 0) / lv["counts"]["requests_sent"]
            p99 = lv["latency_ms"]["first_sentence_ms"]["p99"]
            extra = (f" With the LLM, the first sentence often arrives after the 300 ms budget, so a holding "
                     f"phrase goes out instead ({share:.0f}% of requests at {lv['calls']} calls): the budget "
                     f"caps first-sentence latency (p99 {_fmt(p99)} ms, i.e. the budget plus the path to the "
                     "caller), the LLM bounds the answer.")
        out.append("**event_driven** — as distributed, plus every event published to Redis Streams and consumed "
                   "by background actors; replicas autoscale on open calls." + extra + vs_floor("event_driven"))
    entry = targets.get("dedicated")
    if entry and entry.get("status") == "ok" and top("dedicated"):
        lv = top("dedicated")
        mem = entry.get("memory") or {}
        per_call = f"{mem['per_call_kb'] / 1024:.0f} MB per idle call measured here" if mem.get("per_call_kb") \
            else "about 90 MB per actor"
        out.append(f"**dedicated** — one Ray actor per call: actor start-up (about 2.6 per second on this machine, "
                   f"softened by the warm pool) bounds call setup (p99 {_fmt(lv['latency_ms']['setup_ms']['p99'])} ms "
                   f"at {lv['calls']} calls), and memory ({per_call}) bounds calls per node." + vs_floor("dedicated"))
    for target, entry in targets.items():
        if entry.get("status") != "ok":
            out.append(f"**{target}** — {entry.get('status')}: {entry.get('error') or 'no detail'}")
        for lv in entry.get("levels", []):
            if lv.get("skipped"):
                out.append(f"**{target}** — {lv['calls']} calls not run: {lv['skipped']}")
            elif lv.get("simulator_bottleneck"):
                out.append(f"**{target}** at {lv['calls']} calls — the simulator's own event loop lagged "
                           f"(p99 {lv['loop_lag_p99_ms']} ms): part of that latency is the load generator's.")
    return out


def _llm_floor_note(mode_name: str, mode: dict[str, Any]) -> list[str]:
    """In LLM mode: the floor's first sentence is the LLM's own, which no budget below it can beat."""
    levels = _measured(mode["targets"].get("floor") or {})
    if mode_name != "llm" or not levels:
        return []
    p50 = min(levels, key=lambda lv: lv["calls"])["latency_ms"]["first_sentence_ms"]["p50"]
    return [f"The floor's p50 first sentence ({_fmt(p50)} ms) is essentially the fake LLM's own time to the end of "
            "its first sentence; a budget below that is met only by saying a holding phrase first.", ""]


def render_report(results: dict[str, Any], img_dir: str = "img", raw_path: str | None = None) -> str:
    """The markdown report of one suite run (plots referenced under ``img_dir``)."""
    s, m = results["settings"], results["machine"]
    llm = s["llm"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `callray bench` on {results['started_at'][:16].replace('T', ' ')} UTC "
        f"in {results.get('duration_s', 0) / 60:.0f} min. Every number below comes from one run on one machine: "
        "each target is measured next to the bare Serve floor, so ratios to the floor are comparable even on a "
        "noisy, shared machine, and absolute numbers are not a promise for other hardware.",
        "",
        "Reproduce (from the repository root; starts and stops its own Ray, Redis and fake LLM):",
        "",
        "```bash",
        "python -m callray.cli bench          # the full suite (callray bench, if installed)",
        "```",
        "",
        f"This report: `{results['command']}`" + (f", raw results in `{raw_path}`." if raw_path else "."),
    ]
    if results.get("quick"):
        lines += ["", "> **Quick run** (small concurrency levels): indicative only. The full suite "
                      f"runs every target at {', '.join(map(str, DEFAULT_LEVELS))} calls with both agent modes."]
    if not results.get("complete", True):
        lines += ["", "> **Incomplete run**: the suite was interrupted; only the targets below were measured."]
    lines += [
        "",
        "## Machine",
        "",
        _table(["", ""], align="ll", rows=[["CPU cores (nproc)", str(m["nproc"])], ["CPU", m.get("cpu") or "-"],
                          ["memory", f"{m['memory_gb']:.1f} GB"], ["Ray", m["ray"]], ["Python", m["python"]],
                          ["OS", m["os"]], ["load average at start (1 min)", _fmt(m.get("load_1m"), 2)]]),
        "",
        "The simulator, the fake LLM, Redis and Ray all share these cores (and the machine may be shared with "
        "other work): the load generator competes with the system under test, which inflates tails at the "
        "higher levels for every target alike.",
        "",
        "## Method",
        "",
        _table(["target", "what it is"], [[t, TARGET_NOTES[t]] for t in s["targets"]], "ll"),
        "",
        f"- **Load**: `callray sim` plays Retell's side over real loopback WebSockets. At each level N calls open "
        f"within at most {s['max_ramp_s']:.0f} s and overlap; each call takes the greeting (response 0), sends "
        f"`call_details`, then {s['turns']} caller turns with a mean talk time of {s['think_s']} s (an `update_only` "
        f"frame mid-way), {s['supersede_rate'] * 100:.0f}% of turns asked early and superseded, "
        f"{s['reminder_rate'] * 100:.0f}% reminders, and `ping_pong` every 2 s. Levels: "
        f"{', '.join(map(str, s['levels']))} concurrent calls. Every frame is checked against the protocol; "
        "a level with a violation or a dropped call is marked.",
        "- **Agents**: `flow` — callray's default flow agent (the clinic); floor and baseline answer with a fixed "
        f"two-chunk echo. `llm` — every target streams from the same fake OpenAI-compatible LLM (first token "
        f"after {llm['ttft_ms']:.0f} ms, then {llm['tokens_per_s']:.0f} tokens/s); callray runs "
        "`config/agents/assistant_llm.yaml` pointed at it. Floor and baseline forward every token as its own "
        "frame (as Retell's demo does); callray sends phrase-sized frames, so its first chunk is its first phrase.",
        "- **Setup**: socket open to response 0 complete. **First chunk / first sentence**: request sent to the "
        "first content / the first sentence end (or completion). **Over TTFT**: first sentence minus the LLM's "
        "time to first token — it includes the LLM streaming the words of its first sentence, which the floor "
        "pays too, so compare it with the floor's row. **Holding**: share of requests answered first by a holding "
        "phrase (callray says one when the budget passes with no speech ready).",
        "- **× floor**: the target's first-sentence p50 / p99 divided by the floor's at the same level in the same "
        "run. **Capacity**: the largest tested level whose p99 first sentence stays within each architecture's "
        "budget (800 / 500 / 300 ms) with every lower level also inside and no violation or drop; `≥ N` means "
        "the highest level tested still fit.",
        "- **Memory per call**: resident memory (RSS) summed over the target's processes (Serve proxy, gateway "
        "replicas, call hosts and any other actor of the target; the baseline's one process) before and after "
        "opening N idle calls, divided by N. **Frames/s**: frames through the target's front door per second, "
        "averaged over the highest level's run (for Serve targets, all of them pass the single proxy).",
    ]
    for mode_name, mode in results["modes"].items():
        title = "flow agent (no LLM)" if mode_name == "flow" else "LLM agent (fake LLM)"
        lines += ["", f"## Results: {title}", "", "### Latency (ms)", "", _latency_table(mode_name, mode), "",
                  "### Capacity within the latency budgets", "", _capacity_table(mode), "",
                  *_llm_floor_note(mode_name, mode),
                  "### Memory", "", _memory_table(mode) or "Not measured in this mode.", "",
                  "### Frames through the front door (highest level)", "", _frames_table(mode), "",
                  "### Plots", "",
                  f"![first-sentence latency CDF, {mode_name}]({img_dir}/bench-{mode_name}-cdf.png)",
                  "",
                  f"![p99 first sentence vs concurrent calls, {mode_name}]({img_dir}/bench-{mode_name}-p99.png)",
                  "", "### What bounds each target", ""]
        lines += [f"- {b}" for b in _bounds(mode_name, mode)]
    return "\n".join(lines) + "\n"


def _save_plot(fig: Any, ax: Any, path: Path) -> Path:
    """Grid, legend, tight layout, PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], img_dir: Path) -> list[Path]:
    """Per agent mode: first-sentence CDF per target and p99 first sentence vs calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    img_dir.mkdir(parents=True, exist_ok=True)
    colors = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(ALL_TARGETS)}  # the same target, the same colour
    written = []
    for mode_name, mode in results["modes"].items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for target, entry in mode["targets"].items():
            levels = [lv for lv in _measured(entry) if lv["samples"]["first_sentence_ms"]]
            if not levels:
                continue
            top = max(levels, key=lambda lv: lv["calls"])
            data = sorted(top["samples"]["first_sentence_ms"])
            ax.plot(data, [(i + 1) / len(data) for i in range(len(data))], label=f"{target} ({top['calls']} calls)",
                    color=colors.get(target))
        for budget in BUDGETS_MS.values():
            ax.axvline(budget, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("first sentence (ms, log scale)")
        ax.set_ylabel("share of turns")
        ax.set_title(f"First-sentence latency CDF at each target's highest level ({mode_name})")
        written.append(_save_plot(fig, ax, img_dir / f"bench-{mode_name}-cdf.png"))

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for target, entry in mode["targets"].items():
            points = [(lv["calls"], lv["latency_ms"]["first_sentence_ms"]["p99"]) for lv in _measured(entry)
                      if lv["latency_ms"]["first_sentence_ms"]["p99"] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=target, color=colors.get(target))
        for name, budget in BUDGETS_MS.items():
            ax.axhline(budget, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(f"{name} budget {budget:.0f} ms", (0.01, budget), xycoords=("axes fraction", "data"), fontsize=7,
                        color="grey", va="bottom")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xticks(sorted({lv["calls"] for e in mode["targets"].values() for lv in _measured(e)}))
        ax.set_xlabel("concurrent calls")
        ax.set_ylabel("p99 first sentence (ms, log scale)")
        ax.set_title(f"p99 first sentence vs concurrent calls ({mode_name})")
        written.append(_save_plot(fig, ax, img_dir / f"bench-{mode_name}-p99.png"))
    return written


def write_report(results: dict[str, Any], out: Path, raw_path: Path | None = None) -> list[Path]:
    """Write the markdown report to ``out`` and its plots to ``<out dir>/img``; returns every file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out.parent / "img")
    raw = None
    if raw_path is not None:
        raw = os.path.relpath(raw_path.resolve(), PROJECT_DIR) if raw_path.resolve().is_relative_to(PROJECT_DIR) else str(raw_path)
    out.write_text(render_report(results, "img", raw))
    return [out, *plots]


# ====================================================================== processes


def _wait_until(ready: Callable[[], bool], what: str, proc: subprocess.Popen | None = None,
                timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} was not ready within {timeout_s:.0f} s")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Processes:
    """The subprocesses this suite started, each stopped by its pid (terminate, then kill)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.running: dict[int, tuple[str, subprocess.Popen]] = {}
        atexit.register(self.stop_all)

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as logf:
            # A new session: Ctrl-C reaches only this process, which then stops the children in order.
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.running[proc.pid] = (name, proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        self.running.pop(proc.pid, None)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running.values())):
            self.stop(proc)

    def start_redis(self, data_dir: Path) -> str:
        """A private redis-server (appendonly, fsync every second), stopped with the others."""
        server = RedisServer(data_dir, fsync="everysec", log_path=self.log_dir / "redis.log")
        server.start()
        self.running[server.proc.pid] = ("redis", server.proc)
        return server.url

    def start_fake_llm(self, ttft_ms: float, tokens_per_s: float) -> str:
        port = free_port()
        proc = self.start("fake-llm", [sys.executable, "-m", "callray.sim.fake_llm", "--port", str(port),
                                       "--ttft-ms", str(ttft_ms), "--tokens-per-s", str(tokens_per_s)],
                          cwd=PROJECT_DIR)
        _wait_until(lambda: _http_ok(f"http://127.0.0.1:{port}/v1/models"), f"fake LLM on port {port}", proc, 30)
        return f"http://127.0.0.1:{port}/v1"

    def start_baseline(self, llm_base_url: str | None) -> tuple[subprocess.Popen, int]:
        port = free_port()
        argv = [sys.executable, str(PROJECT_DIR / "bench" / "baseline_server.py"), "--port", str(port)]
        argv += ["--llm-base-url", llm_base_url] if llm_base_url else ["--echo"]
        proc = self.start("baseline", argv, cwd=PROJECT_DIR, env={**os.environ, "OPENAI_API_KEY": "baseline-no-key"})
        _wait_until(lambda: _port_open(port), f"baseline server on port {port}", proc, 30)
        return proc, port


# ====================================================================== Ray and Serve


@contextlib.contextmanager
def ray_session(console: Console) -> Iterator[int]:
    """A private local Ray with Serve on a free port; yields the port. Shut down on exit."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="crb-", dir="/tmp")  # short: Ray's socket paths have a length limit
    console.log(f"starting a private local Ray (temp dir {temp_dir})")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}}, logging_level="warning", log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    failed = False
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    except BaseException:
        failed = True
        raise
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        if failed:
            console.log(f"Ray logs kept in {temp_dir}/session_latest/logs")
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _actor_table() -> list[dict[str, Any]]:
    """Alive actors from the GCS (the state API needs the dashboard, which the suite does not start)."""
    from ray._private import state

    return [a for a in state.actors().values() if a.get("State") == "ALIVE"]


def _target_actors(app: str) -> list[dict[str, Any]]:
    """The actors serving ``app``: the Serve proxy, its replicas and every non-Serve actor (hosts, pools,
    consumers); the suite kills each target's own actors before the next one, so those are ``app``'s."""
    mine = []
    for actor in _actor_table():
        cls = actor.get("ActorClassName", "")
        if cls.startswith(f"ServeReplica:{app}:") or not cls.startswith("Serve"):  # ProxyActor included
            mine.append(actor)
    return mine


def _kill_target_actors() -> None:
    """Kill the named actors a callray target left (hosts are detached); unnamed ones die with their owner."""
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "serve":
            continue
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]), no_restart=True)


def _psutil() -> Any:
    """psutil, which Ray ships in ray/thirdparty_files and puts on sys.path when imported."""
    try:
        import psutil
    except ImportError:
        import ray  # noqa: F401 - adds ray/thirdparty_files to sys.path

        import psutil
    return psutil


def _rss_mb(pids: list[int]) -> float:
    psutil = _psutil()
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**20


# ====================================================================== targets


@dataclass
class Deployed:
    """A running target: where to call it and how to find its processes."""

    url: str
    processes: Callable[[], list[tuple[str, int]]]
    teardown: Callable[[], None]
    holding: frozenset[str] = frozenset()


def _deployment_options(config_file: str) -> dict[str, Any]:
    doc = yaml.safe_load((PROJECT_DIR / config_file).read_text())
    dep = (doc["applications"][0].get("deployments") or [{}])[0]
    keys = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "graceful_shutdown_timeout_s",
            "ray_actor_options")
    return {k: dep[k] for k in keys if k in dep}


def callray_args(target: str, *, namespace: str, redis_url: str | None, agent_file: Path | None) -> dict[str, Any]:
    """The Serve application args of a callray target: its config file's, pointed at the suite's
    Redis, a namespace of its own and (LLM mode) the bench LLM agent."""
    doc = yaml.safe_load((PROJECT_DIR / CONFIG_FILES[target]).read_text())
    args = doc["applications"][0]["args"]
    args["hosts"]["namespace"] = namespace
    args["gateway"].pop("guard", None)  # the simulator connects from loopback without the secret
    args["webhook"]["api_key"] = ""
    if target == "dedicated":
        args["hosts"]["placement"] = "dedicated"
    if args["state"]["backend"] == "redis" or args["cache"]["backend"] == "redis" or \
            args["events"]["backend"] == "redis_streams":
        if redis_url is None:
            raise RuntimeError(f"{target} needs Redis")
        args["state"]["redis_url"] = redis_url
    if agent_file is not None:
        args["agents"] = {"default": "bench_llm", "files": {"bench_llm": str(agent_file)}, "by_retell_agent_id": {}}
    return args


def write_llm_agent(directory: Path, llm_base_url: str) -> Path:
    """``config/agents/assistant_llm.yaml`` with its provider replaced by the fake LLM."""
    data = yaml.safe_load((PROJECT_DIR / "config/agents/assistant_llm.yaml").read_text())
    data["providers"] = [{"base_url": llm_base_url, "model": "gpt-4o-mini",
                          "api_key_env": "CALLRAY_BENCH_UNSET_KEY", "api_key_fallback": "fake-key"}]
    path = directory / "bench_llm.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    _wait_until(lambda: _http_ok(url), url, timeout_s=timeout_s)


def _serve_processes(app: str) -> Callable[[], list[tuple[str, int]]]:
    return lambda: [(a.get("ActorClassName", "?"), a["Pid"]) for a in _target_actors(app) if a.get("Pid")]


def deploy_serve_target(target: str, mode: str, port: int, *, redis_url: str | None, llm_base_url: str | None,
                        agent_file: Path | None, run_tag: str) -> Deployed:
    """Deploy ``target`` as Serve application ``target`` under ``/target``; wait until healthy."""
    from ray import serve

    base = f"http://127.0.0.1:{port}/{target}"
    gateway_opts = _deployment_options(CONFIG_FILES["single"])

    def teardown() -> None:
        with contextlib.suppress(Exception):
            serve.delete(target)
        _kill_target_actors()

    try:
        if target == "floor":
            from bench.floor_app import Floor

            app = Floor.options(max_ongoing_requests=gateway_opts.get("max_ongoing_requests", 1000)).bind(
                llm_base_url=llm_base_url if mode == "llm" else None)
            serve.run(app, name=target, route_prefix=f"/{target}", blocking=False)
            _wait_healthy(f"{base}/healthz")
            return Deployed(f"ws://127.0.0.1:{port}/{target}/llm-websocket", _serve_processes(target), teardown)

        from serve_app import CallGateway

        args = callray_args(target, namespace=f"bench-{run_tag}-{target}-{mode}", redis_url=redis_url,
                            agent_file=agent_file)
        settings = CallraySettings.parse(args, source=f"{CONFIG_FILES[target]} (bench {target})")
        app = CallGateway.options(**_deployment_options(CONFIG_FILES[target])).bind(settings.model_dump(mode="json"))
        serve.run(app, name=target, route_prefix=f"/{target}", blocking=False)
        _wait_healthy(f"{base}/healthz")
        return Deployed(f"ws://127.0.0.1:{port}/{target}{settings.gateway.path_prefix}", _serve_processes(target),
                        teardown, holding=frozenset(p.strip() for p in settings.turns.holding_phrases))
    except Exception as exc:
        detail = _deploy_failure(target)
        teardown()
        if detail:
            raise RuntimeError(f"deploying {target} failed: {detail}") from exc
        raise
    except BaseException:
        teardown()
        raise


def _deploy_failure(app: str) -> str:
    """The last line of the error Serve recorded for ``app`` (e.g. the replica constructor's exception)."""
    from ray import serve

    try:
        status = serve.status().applications.get(app)
    except Exception:  # the status itself is best effort
        return ""
    if status is None:
        return ""
    messages = [d.message for d in status.deployments.values() if d.message] + [status.message]
    lines = [line.strip() for m in messages if m for line in m.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ====================================================================== measuring one target


def _sim_config(url: str, calls: int, options: BenchOptions, tag: str) -> SimConfig:
    return SimConfig(url=url, calls=calls, turns=options.turns, think_s=options.think_s,
                     ramp_s=min(options.max_ramp_s, 0.05 * calls), supersede_rate=options.supersede_rate,
                     reminder_rate=options.reminder_rate, seed=options.seed + calls, call_id_prefix=tag)


def _simulate(config: SimConfig, tap: FrameTap, console: Console, label: str) -> SimResult:
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        calls = bar.add_task(f"{label} calls", total=config.calls)
        turns = bar.add_task(f"{label} turns", total=config.calls * config.turns)

        def progress(calls_done: int, turns_done: int) -> None:
            bar.update(calls, completed=calls_done)
            bar.update(turns, completed=turns_done)

        with tap.installed():
            return asyncio.run(run_simulation(config, progress))


async def _hold_idle_calls(url: str, n: int, prefix: str, measure: Callable[[], float]) -> dict[str, Any]:
    """Open ``n`` calls, let each take its greeting, measure with all of them open, close them."""
    from websockets.asyncio.client import connect

    opened = []
    limit = asyncio.Semaphore(20)

    async def open_one(i: int) -> None:
        call_id = f"{prefix}-{i}"
        async with limit:
            ws = await connect(call_url(url, call_id), open_timeout=30, ping_interval=None, max_size=None,
                               compression=None, proxy=None)
            opened.append(ws)
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame.get("response_type") == "config" and (frame.get("config") or {}).get("call_details"):
                    await ws.send(json.dumps({"interaction_type": "call_details",
                                              "call": {"call_id": call_id, "agent_id": "agent_bench",
                                                       "call_type": "phone_call", "call_status": "ongoing"}}))
                if frame.get("response_id") == 0 and frame.get("content_complete"):
                    return

    before = measure()
    outcomes = await asyncio.gather(*(open_one(i) for i in range(n)), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    await asyncio.sleep(3)  # let the servers settle (lazy allocations, GC) with every call open
    after = measure()
    await asyncio.gather(*(asyncio.wait_for(ws.close(), 10) for ws in opened), return_exceptions=True)
    held = n - len(failures)
    return {"calls": held, "failed": len(failures), "rest_mb": round(before, 1), "open_mb": round(after, 1),
            "per_call_kb": round((after - before) * 1024 / held, 1) if held else None,
            "error": repr(failures[0]) if failures else None}


def measure_target(target: str, mode: str, deployed: Deployed, options: BenchOptions, console: Console,
                   run_tag: str, on_level: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Warm up, measure memory with idle calls, then every level; returns the target's entry."""
    psutil = _psutil()
    ttft = options.llm_ttft_ms if mode == "llm" else None
    entry: dict[str, Any] = {"status": "ok", "error": None, "levels": [], "memory": None}

    warm = _simulate(SimConfig(url=deployed.url, calls=4, turns=1, think_s=0.2, call_id_prefix=f"warm-{run_tag}"),
                     FrameTap(), console, f"{target} warm-up")
    if warm.counts.get("calls_completed", 0) == 0:
        raise RuntimeError(f"warm-up: no call completed (dropped: {warm.dropped}, violations: {warm.violations})")

    cap = DEDICATED_MAX_CALLS if target == "dedicated" else None
    n_idle = options.idle_calls or max(options.levels)
    if cap:
        n_idle = min(n_idle, DEDICATED_IDLE_CALLS)

    def measure() -> float:
        return _rss_mb([pid for _, pid in deployed.processes()])

    console.log(f"{target}/{mode}: memory: opening {n_idle} idle calls")
    memory = asyncio.run(_hold_idle_calls(deployed.url, n_idle, f"idle-{run_tag}-{target}-{mode}", measure))
    procs = deployed.processes()
    memory.update(processes=len(procs), kinds=sorted({kind.split(":")[0] for kind, _ in procs}))
    entry["memory"] = memory
    console.log(f"{target}/{mode}: memory: {memory['rest_mb']:.0f} MB at rest, "
                f"{_fmt(memory['per_call_kb'])} KB per idle call over {len(procs)} processes")

    for calls in options.levels:
        if cap and calls > cap:
            entry["levels"].append({"calls": calls, "skipped": f"dedicated placement is not run above {cap} calls "
                                                               "(one ~90 MB actor per call)"})
            continue
        available_mb = psutil.virtual_memory().available / 2**20
        need_mb = calls * max((memory["per_call_kb"] or 0) / 1024, 100)
        if cap and need_mb > available_mb / 2:
            entry["levels"].append({"calls": calls, "skipped": f"needs ~{need_mb:.0f} MB, only {available_mb:.0f} MB "
                                                               "free"})
            continue
        tap = FrameTap(holding=deployed.holding)
        config = _sim_config(deployed.url, calls, options, f"{target}-{mode}-{calls}")
        result = _simulate(config, tap, console, f"{target}/{mode} {calls}")
        stats = level_stats(result, calls=calls, frames_in=tap.frames, holding=tap.holding_count, ttft_ms=ttft)
        entry["levels"].append(stats)
        on_level(entry)
        lat = stats["latency_ms"]
        console.log(
            f"{target}/{mode}: {calls} calls: setup p50/p99 {_fmt(lat['setup_ms']['p50'])}/"
            f"{_fmt(lat['setup_ms']['p99'])} ms, first sentence p50/p99 {_fmt(lat['first_sentence_ms']['p50'])}/"
            f"{_fmt(lat['first_sentence_ms']['p99'])} ms, {stats['frames_per_s']:.0f} frames/s"
            + ("" if stats["ok"] else escape(f" violations {stats['violations']} dropped {stats['dropped']}")))
        if sum(stats["dropped"].values()) > STOP_DROP_SHARE * calls:
            entry["levels"] += [{"calls": c, "skipped": f"{calls} calls already dropped "
                                                        f"{sum(stats['dropped'].values())} calls"}
                                for c in options.levels if c > calls]
            break
        time.sleep(1)  # let the previous level's sockets close
    return entry


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
    """Run every (agent mode, target) and return the results and where the raw JSON was saved.

    The JSON is rewritten after every level, so an interrupted run keeps what it measured.
    """
    started = time.monotonic()
    run_tag = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results_path = (options.results_dir / f"{run_tag}.json").resolve()
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "schema": 1, "started_at": _now(), "command": options.command, "quick": options.quick, "complete": False,
        "machine": machine_info(),
        "settings": {
            "targets": list(options.targets), "levels": list(options.levels), "agents": list(options.agents),
            "turns": options.turns, "think_s": options.think_s, "max_ramp_s": options.max_ramp_s,
            "supersede_rate": options.supersede_rate, "reminder_rate": options.reminder_rate,
            "idle_calls": options.idle_calls or max(options.levels),
            "llm": {"ttft_ms": options.llm_ttft_ms, "tokens_per_s": options.llm_tokens_per_s},
            "budgets_ms": BUDGETS_MS,
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
    os.chdir(PROJECT_DIR)  # Ray workers import serve_app, actors and bench.floor_app from here
    if str(PROJECT_DIR) not in sys.path:
        sys.path.insert(0, str(PROJECT_DIR))
    needs_ray = any(t != "baseline" for t in options.targets)
    try:
        redis_url = None
        if any(t in REDIS_TARGETS for t in options.targets):
            (tmp / "redis").mkdir()
            redis_url = procs.start_redis(tmp / "redis")
            console.log(f"private redis-server at {redis_url}")
        llm_url = None
        if "llm" in options.agents:
            llm_url = procs.start_fake_llm(options.llm_ttft_ms, options.llm_tokens_per_s)
            console.log(f"fake LLM at {llm_url} (TTFT {options.llm_ttft_ms:.0f} ms, "
                        f"{options.llm_tokens_per_s:.0f} tokens/s)")
        agent_file = write_llm_agent(tmp, llm_url) if llm_url else None
        with ray_session(console) if needs_ray else contextlib.nullcontext(0) as serve_port:
            for mode in options.agents:
                mode_results: dict[str, Any] = {"targets": {}}
                results["modes"][mode] = mode_results
                for target in options.targets:
                    console.rule(f"{target} · {mode} agent")
                    t0 = time.monotonic()

                    def on_level(entry: dict[str, Any], target: str = target,
                                 targets: dict[str, Any] = mode_results["targets"]) -> None:
                        targets[target] = entry
                        save()

                    mode_results["targets"][target] = _run_target(
                        target, mode, procs, console, options, run_tag, on_level, serve_port=serve_port,
                        redis_url=redis_url, llm_url=llm_url if mode == "llm" else None,
                        agent_file=agent_file if mode == "llm" else None)
                    save()
                    console.log(f"{target}/{mode}: done in {time.monotonic() - t0:.0f} s "
                                f"({mode_results['targets'][target]['status']})")
        results["complete"] = True
    finally:
        results["finished_at"] = _now()
        save()
        procs.stop_all()
        atexit.unregister(procs.stop_all)
        signal.signal(signal.SIGTERM, previous_sigterm)
        os.chdir(previous_cwd)
        if results["complete"]:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            console.log(f"logs of the redis, fake LLM and baseline processes kept in {tmp}")
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


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run_target(target: str, mode: str, procs: Processes, console: Console, options: BenchOptions, run_tag: str,
                on_level: Callable[[dict[str, Any]], None], *, serve_port: int, redis_url: str | None,
                llm_url: str | None, agent_file: Path | None) -> dict[str, Any]:
    """Deploy, measure and tear down one target; a failure is recorded, not raised."""
    baseline = None
    deployed = None
    try:
        if target == "baseline":
            baseline, port = procs.start_baseline(llm_url)
            pid = baseline.pid
            deployed = Deployed(f"ws://127.0.0.1:{port}/llm-websocket", lambda: [("baseline", pid)], lambda: None)
        else:
            console.log(f"{target}/{mode}: deploying")
            deployed = deploy_serve_target(target, mode, serve_port, redis_url=redis_url, llm_base_url=llm_url,
                                           agent_file=agent_file, run_tag=run_tag)
        return measure_target(target, mode, deployed, options, console, run_tag, on_level)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one target failing must not lose the others
        status = "not available" if target == "dedicated" else "failed"
        console.log(f"[red]{target}/{mode}: {status}: {escape(repr(exc))}[/]")
        log.debug("target %s failed", target, exc_info=True)
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        return {"status": status, "error": f"{exc.__class__.__name__}: {first_line}", "levels": [], "memory": None}
    finally:
        if deployed is not None:
            deployed.teardown()
        if baseline is not None:
            procs.stop(baseline)


# ====================================================================== command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``callray bench`` options."""
    parser.add_argument("--quick", action="store_true",
                        help=f"a small run: targets {' '.join(QUICK_TARGETS)}, levels "
                             f"{' '.join(map(str, QUICK_LEVELS))}, flow agent (a few minutes)")
    parser.add_argument("--targets", nargs="+", choices=ALL_TARGETS, metavar="TARGET",
                        help=f"targets to run, from: {' '.join(ALL_TARGETS)} (default: all)")
    parser.add_argument("--levels", nargs="+", type=int, metavar="CALLS",
                        help=f"concurrent calls per measurement (default: {' '.join(map(str, DEFAULT_LEVELS))})")
    parser.add_argument("--agent", nargs="+", choices=("flow", "llm"), dest="agents",
                        help="agent modes: flow (no LLM) and/or llm (fake LLM) (default: both)")
    parser.add_argument("--turns", type=int, default=3, help="caller turns per call (default: 3)")
    parser.add_argument("--idle-calls", type=int, help="idle calls for the memory measurement "
                                                       "(default: the highest level)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"),
                        help="markdown report; plots go to <its dir>/img (default: docs/benchmarks.md)")
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"),
                        help="where the raw results JSON goes (default: bench/results)")
    parser.add_argument("--from-json", type=Path, metavar="RESULTS",
                        help="only regenerate the report and plots from a saved results file")


def command_line(args: argparse.Namespace) -> str:
    """The ``callray bench`` command that reproduces ``args`` (quoted in the report)."""
    parts = ["python -m callray.cli bench"]
    if args.quick:
        parts.append("--quick")
    for flag, value in (("--targets", args.targets), ("--levels", args.levels), ("--agent", args.agents)):
        if value:
            parts.append(flag + " " + " ".join(map(str, value)))
    if args.turns != 3:
        parts.append(f"--turns {args.turns}")
    if args.idle_calls:
        parts.append(f"--idle-calls {args.idle_calls}")
    return " ".join(parts)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from parsed ``callray bench`` arguments (``--quick`` sets the small defaults)."""
    quick = bool(args.quick)
    values: dict[str, Any] = {
        "quick": quick,
        "targets": args.targets or list(QUICK_TARGETS if quick else ALL_TARGETS),
        "levels": sorted(set(args.levels or (QUICK_LEVELS if quick else DEFAULT_LEVELS))),
        "agents": args.agents or (["flow"] if quick else ["flow", "llm"]),
        "turns": args.turns,
        "idle_calls": args.idle_calls,
        "out": args.out.resolve(),
        "results_dir": args.results_dir.resolve(),
        "command": command_line(args),
    }
    if any(level < 1 for level in values["levels"]):
        raise ValueError(f"--levels must be positive, got {values['levels']}")
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
    console.log(f"callray bench: targets {' '.join(options.targets)}; levels {' '.join(map(str, options.levels))}; "
                f"agents {' '.join(options.agents)}")
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
