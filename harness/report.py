"""The benchmark report: ``docs/benchmarks.md`` and its plots, from a results file alone.

Every number and every sentence with a number in the report is computed here from the results
of one run (nothing is written by hand), so regenerating from a saved JSON
(``callray bench --from-json``) gives the same report. Latencies are the median over the run's
rounds of each round's percentile; ratios compare targets measured in the same run.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Iterable

from callray.settings import PROJECT_DIR
from callray.sim.report import SimResult
from harness.targets import TARGET_NOTES

#: The seed's latency budgets (server time to first sentence) of the three architectures.
BUDGETS_MS: dict[str, float] = {"single": 800.0, "distributed": 500.0, "event_driven": 300.0}
LATENCY_METRICS = ("setup_ms", "holding_ms", "first_chunk_ms", "first_sentence_ms", "complete_ms")
SAMPLE_METRICS = ("setup_ms", "first_chunk_ms", "first_sentence_ms")
CALLRAY = ("single", "python", "distributed", "event_driven", "dedicated")


# ====================================================================== measured numbers


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base`` rounded to 2 places; None when either is missing or the base is 0."""
    if value is None or base is None or base <= 0:
        return None
    return round(value / base, 2)


def frames_sent(counts: dict[str, int]) -> int:
    """Frames the simulator sent: requests, partial transcripts, pings, one call_details per socket."""
    return (counts.get("requests_sent", 0) + counts.get("update_only_sent", 0) + counts.get("pings_sent", 0)
            + counts.get("calls", 0) + counts.get("reconnects", 0))


def round_stats(result: SimResult) -> dict[str, Any]:
    """One round of one level: percentiles, counts, frame rates and the raw samples for the plots."""
    summary = result.summary()
    samples = result.samples()
    duration = max(result.duration_s, 1e-9)
    counts = summary["counts"]
    frames_in, frames_out = counts.get("frames_received", 0), frames_sent(counts)
    return {
        "duration_s": round(result.duration_s, 3),
        "ok": summary["ok"],
        "violations": summary["violations"],
        "warnings": summary["warnings"],
        "dropped": summary["dropped"],
        "examples": {k: v[:2] for k, v in summary["examples"].items()},
        "counts": counts,
        "simulator_bottleneck": summary["simulator_bottleneck"],
        "loop_lag_p99_ms": summary["loop_lag_ms"]["p99"],
        "latency_ms": {m: summary["latency_ms"][m] for m in LATENCY_METRICS},
        "holding_share": round(counts.get("holding_phrases", 0) / counts["requests_sent"], 3)
        if counts.get("requests_sent") else None,
        "frames_in": frames_in,
        "frames_out": frames_out,
        "frames_per_s": round((frames_in + frames_out) / duration, 1),
        "samples": {m: [round(x, 1) for x in samples[m]] for m in SAMPLE_METRICS},
    }


def median_of(values: Iterable[float | None]) -> float | None:
    """The median of the values present (None when there are none), to 2 places."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def aggregate(calls: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A level over its rounds: each statistic is the median of the rounds' values; the rounds'
    own values are kept (``rounds_p50``, ``rounds_p99``) to show the spread."""
    latency = {}
    for metric in LATENCY_METRICS:
        p50s = [r["latency_ms"][metric]["p50"] for r in rounds]
        p99s = [r["latency_ms"][metric]["p99"] for r in rounds]
        latency[metric] = {"p50": median_of(p50s), "p99": median_of(p99s), "rounds_p50": p50s, "rounds_p99": p99s,
                           "n": sum(r["latency_ms"][metric]["n"] for r in rounds)}
    requests = sum(r["counts"].get("requests_sent", 0) for r in rounds)
    return {
        "calls": calls,
        "rounds": len(rounds),
        "ok": all(r["ok"] for r in rounds),
        "violations": _sum_dicts(r["violations"] for r in rounds),
        "dropped": _sum_dicts(r["dropped"] for r in rounds),
        "simulator_bottleneck": any(r["simulator_bottleneck"] for r in rounds),
        "latency_ms": latency,
        "holding_share": round(sum(r["counts"].get("holding_phrases", 0) for r in rounds) / requests, 3)
        if requests else None,
        "frames_per_s": median_of(r["frames_per_s"] for r in rounds),
        "samples": {m: [x for r in rounds for x in r["samples"][m]] for m in SAMPLE_METRICS},
        "per_round": [{k: v for k, v in r.items() if k != "samples"} for r in rounds],
    }


def _sum_dicts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


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


def measured(entry: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [lv for lv in (entry or {}).get("levels", []) if not lv.get("skipped")]


def level(entry: dict[str, Any] | None, calls: int) -> dict[str, Any] | None:
    return next((lv for lv in measured(entry) if lv["calls"] == calls), None)


def stat(lv: dict[str, Any] | None, metric: str, which: str) -> float | None:
    return None if lv is None else lv["latency_ms"][metric][which]


def peer_ratio(mode: dict[str, Any], target: str, peer: str, calls: int, metric: str, which: str) -> float | None:
    """``target``'s statistic over ``peer``'s, both measured at ``calls`` in the same run."""
    targets = mode["targets"]
    return ratio(stat(level(targets.get(target), calls), metric, which),
                 stat(level(targets.get(peer), calls), metric, which))


# ====================================================================== the targets


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The turn-path issue's targets, each with its measured figure and whether it was met."""
    out: list[dict[str, Any]] = []
    flow, llm = results["modes"].get("flow"), results["modes"].get("llm")

    def add(goal: str, figure: float | None, limit: float, unit: str = "×", lower_is_better: bool = True) -> None:
        met = None if figure is None else (figure <= limit if lower_is_better else figure >= limit)
        out.append({"goal": goal, "figure": figure, "limit": limit, "unit": unit, "met": met})

    if flow:
        calls = 100 if level(flow["targets"].get("single"), 100) else max(
            (lv["calls"] for lv in measured(flow["targets"].get("single"))), default=None)
        if calls:
            add(f"flow, {calls} calls: first chunk p50 ≤ 1.3× floor",
                peer_ratio(flow, "single", "floor", calls, "first_chunk_ms", "p50"), 1.3)
            add(f"flow, {calls} calls: first chunk p99 ≤ 1.5× floor",
                peer_ratio(flow, "single", "floor", calls, "first_chunk_ms", "p99"), 1.5)
            add(f"flow, {calls} calls: call setup p99 ≤ 1.5× floor (warm)",
                peer_ratio(flow, "single", "floor", calls, "setup_ms", "p99"), 1.5)
        fresh = flow.get("fresh_setup") or {}
        if fresh.get("single") and fresh.get("floor"):
            add(f"flow: call setup p99 on a fresh deployment ≤ 3× floor ({fresh['single']['calls']} calls)",
                ratio(fresh["single"]["setup_ms"]["p99"], fresh["floor"]["setup_ms"]["p99"]), 3.0)
        cache = (flow.get("scenarios") or {}).get("cache_hit")
        if cache and cache.get("server_first_chunk_ms"):
            add(f"cache hit (distributed, {cache['calls']} calls): server first chunk p99 < 10 ms",
                cache["server_first_chunk_ms"]["p99"], 10.0, "ms")
        entry = flow["targets"].get("event_driven")
        if measured(entry):
            cap = capacity(measured(entry), BUDGETS_MS["event_driven"])
            add("event-driven, flow: calls inside the 300 ms budget ≥ 200", cap["calls"], 200, "calls",
                lower_is_better=False)
        memory = {t: (flow["targets"].get(t) or {}).get("memory") for t in ("single", "floor")}
        if all(m and m.get("per_call_kb") is not None for m in memory.values()):
            add("memory per connected call ≤ floor + 20 KB",
                round(memory["single"]["per_call_kb"] - memory["floor"]["per_call_kb"], 1), 20.0, "KB above")
        idle = flow.get("idle_turn") or {}
        if idle.get("single") and idle.get("floor"):
            add("one idle call's flow turn (first chunk p50) ≤ 1.5× floor",
                ratio(idle["single"]["first_chunk_ms"]["p50"], idle["floor"]["first_chunk_ms"]["p50"]), 1.5)
    if llm and llm["targets"].get("retell_demo", {}).get("status") == "ok":
        for calls in sorted({lv["calls"] for lv in measured(llm["targets"].get("single"))}):
            for which in ("p50", "p99"):
                add(f"LLM, {calls} calls: first sentence {which} ≤ Retell's demo",
                    peer_ratio(llm, "single", "retell_demo", calls, "first_sentence_ms", which), 1.0)
    return out


# ====================================================================== rendering


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[str]], align: str = "l") -> str:
    """A markdown table; ``align`` gives l/r per column, the last letter repeating (default: the
    first left, the rest right, for a name followed by numbers)."""
    align = align if len(align) > 1 else "lr"
    marks = [{"l": "---", "r": "---:"}[align[min(i, len(align) - 1)]] for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _spread(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return f"{min(present):.0f}–{max(present):.0f}" if len(present) > 1 else "-"


def _problems(lv: dict[str, Any]) -> str:
    problems = [f"{k} {v}" for k, v in lv["violations"].items()]
    problems += [f"dropped:{k} {v}" for k, v in lv["dropped"].items()]
    if lv["simulator_bottleneck"]:
        problems.append("simulator lagged")
    return "yes" if not problems else "no: " + ", ".join(problems)


def latency_table(mode_name: str, mode: dict[str, Any]) -> str:
    llm = mode_name == "llm"
    metric = "first_sentence_ms" if llm else "first_chunk_ms"
    headers = ["target", "calls", "setup p50", "setup p99", "first chunk p50", "first chunk p99",
               "first sentence p50", "first sentence p99", f"{'sentence' if llm else 'chunk'} p50 spread",
               "× floor p50 / p99"]
    if llm:
        headers += ["× demo p50 / p99", "holding first"]
    headers += ["complete p99", "ok"]
    rows = []
    has_demo = (mode["targets"].get("retell_demo") or {}).get("status") == "ok"
    for target, entry in mode["targets"].items():
        for lv in measured(entry):
            lat, calls = lv["latency_ms"], lv["calls"]
            row = [target, str(calls), fmt(lat["setup_ms"]["p50"]), fmt(lat["setup_ms"]["p99"]),
                   fmt(lat["first_chunk_ms"]["p50"]), fmt(lat["first_chunk_ms"]["p99"]),
                   fmt(lat["first_sentence_ms"]["p50"]), fmt(lat["first_sentence_ms"]["p99"]),
                   _spread(lat[metric]["rounds_p50"]),
                   "-" if target == "floor" else " / ".join(
                       fmt(peer_ratio(mode, target, "floor", calls, metric, w), 2) for w in ("p50", "p99"))]
            if llm:
                row.append("-" if target == "retell_demo" or not has_demo else " / ".join(
                    fmt(peer_ratio(mode, target, "retell_demo", calls, metric, w), 2) for w in ("p50", "p99")))
                row.append("-" if lv["holding_share"] is None else f"{100 * lv['holding_share']:.0f}%")
            row += [fmt(lat["complete_ms"]["p99"]), _problems(lv)]
            rows.append(row)
    return table(headers, rows)


def capacity_table(mode: dict[str, Any]) -> str:
    rows = []
    for target, entry in mode["targets"].items():
        if measured(entry):
            rows.append([target] + [format_capacity(capacity(measured(entry), b)) for b in BUDGETS_MS.values()])
    return table(["target"] + [f"p99 first sentence ≤ {b:.0f} ms ({a})" for a, b in BUDGETS_MS.items()], rows)


def memory_table(mode: dict[str, Any]) -> str:
    rows = []
    for target, entry in mode["targets"].items():
        mem = (entry or {}).get("memory")
        if mem:
            rows.append([target, fmt(mem["rest_mb"], 0), fmt(mem["per_call_kb"], 0), str(mem["calls"]),
                         str(mem["processes"]), ", ".join(mem.get("kinds", []))])
    if not rows:
        return ""
    return table(["target", "resident at rest (MB)", "per idle call (KB)", "idle calls", "processes", "what"], rows,
                 "lrrrrl")


def _per_target(title: str, data: dict[str, Any] | None, metric: str) -> list[str]:
    if not data:
        return []
    rows = [[t, str(d["calls"]), fmt(d[metric]["p50"]), fmt(d[metric]["p99"]), fmt(d.get("rounds"))]
            for t, d in data.items()]
    return [title, "", table(["target", "calls", f"{metric} p50", f"{metric} p99", "rounds"], rows), ""]


def goals_table(results: dict[str, Any]) -> str:
    rows = []
    for g in goals(results):
        verdict = "-" if g["met"] is None else "met" if g["met"] else "**not met**"
        figure = fmt(g["figure"], 2 if g["unit"] == "×" else 1)
        rows.append([g["goal"], f"{figure} {g['unit']}", verdict])
    return table(["target (the turn-path issue)", "measured", ""], rows, "lrl")


def bounds(mode_name: str, mode: dict[str, Any]) -> list[str]:
    """What limits each target, in this run's own numbers."""
    out = []
    targets = mode["targets"]

    def top(target: str) -> dict[str, Any] | None:
        levels = measured(targets.get(target))
        return max(levels, key=lambda lv: lv["calls"]) if levels else None

    metric = "first_sentence_ms" if mode_name == "llm" else "first_chunk_ms"
    floor = top("floor")
    if floor:
        out.append(f"**floor**: at {floor['calls']} calls the bare Serve app moved {fmt(floor['frames_per_s'])} frames/s "
                   f"through the one Serve proxy, first {metric.split('_')[1]} p99 {fmt(stat(floor, metric, 'p99'))} ms.")
    for target in targets:
        lv = top(target)
        if target == "floor" or lv is None:
            continue
        r50 = peer_ratio(mode, target, "floor", lv["calls"], metric, "p50")
        r99 = peer_ratio(mode, target, "floor", lv["calls"], metric, "p99")
        line = (f"**{target}** at {lv['calls']} calls: {metric.replace('_ms', '').replace('_', ' ')} p50/p99 "
                f"{fmt(stat(lv, metric, 'p50'))}/{fmt(stat(lv, metric, 'p99'))} ms, {fmt(r50, 2)}×/{fmt(r99, 2)}× "
                f"the floor's")
        if lv.get("holding_share"):
            line += f"; {100 * lv['holding_share']:.0f}% of requests heard a holding phrase first"
        out.append(line + ".")
    for target, entry in targets.items():
        if entry.get("status") != "ok":
            out.append(f"**{target}**: {entry.get('status')}: {entry.get('error') or 'no detail'}")
        for lv in entry.get("levels", []):
            if lv.get("skipped"):
                out.append(f"**{target}**: {lv['calls']} calls not run: {lv['skipped']}")
            elif lv.get("simulator_bottleneck"):
                out.append(f"**{target}** at {lv['calls']} calls: the simulator's own event loop lagged in a round, "
                           "so part of that latency is the load generator's.")
    return out


def profile_section(profile: dict[str, Any] | None) -> list[str]:
    if not profile:
        return []
    if profile.get("error"):
        return ["### Profile", "", f"Not taken: {profile['error']}", ""]
    lines = ["### Profile of the gateway replica", "",
             f"py-spy sampled the `{profile['target']}` replica (pid {profile['pid']}) at {profile['rate']} Hz for "
             f"{profile['duration_s']:.0f} s while {profile['calls']} calls ran: {profile['samples']} samples "
             f"(idle samples dropped). Share of samples by where the time went (a stack counts for the first "
             "area it passes through, from the top):", "",
             table(["area", "share of samples"], [[a, f"{100 * s:.1f}%"] for a, s in profile["areas"].items()]), "",
             "Functions with the most samples on top of the stack (self time):", "",
             table(["function", "self share"], [[f"`{f}`", f"{100 * s:.1f}%"] for f, s in profile["top_self"]],
                   "lr"), ""]
    if profile.get("raw_path"):
        lines += [f"Raw collapsed stacks: `{profile['raw_path']}`.", ""]
    return lines


def render_report(results: dict[str, Any], img_dir: str = "img", raw_path: str | None = None) -> str:
    """The markdown report of one suite run (plots referenced under ``img_dir``)."""
    s, m = results["settings"], results["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `callray bench` on {results['started_at'][:16].replace('T', ' ')} UTC in "
        f"{results.get('duration_s', 0) / 60:.0f} min. Every number below comes from "
        + ("one run per agent mode (" + results["joined"] + ")" if results.get("joined") else "this one run")
        + f" on one machine, in {s['rounds']} rounds: in each round every target runs every level, in an order that "
        "rotates from round to round, so the machine's noise falls on all of them alike; a statistic is the median "
        "of the rounds' values.",
        "",
        "Reproduce (from the repository root; starts and stops its own Ray, Redis, fake LLM and peers):",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Raw results: `{raw_path}`." if raw_path else "",
    ]
    if results.get("quick"):
        lines += ["", "> **Quick run**: small levels and few rounds; indicative only."]
    if not results.get("complete", True):
        lines += ["", "> **Incomplete run**: the suite was interrupted; only what is below was measured."]
    lines += [
        "",
        "## Machine",
        "",
        table(["", ""], align="ll", rows=[["CPU cores (nproc)", str(m["nproc"])], ["CPU", m.get("cpu") or "-"],
                                          ["memory", f"{m['memory_gb']:.1f} GB"], ["Ray", m["ray"]],
                                          ["Python", m["python"]], ["OS", m["os"]],
                                          ["load average at start (1 min)", fmt(m.get("load_1m"), 2)]]),
        "",
        "The simulator, the fake LLM, Redis, Ray and the peers share these cores: the load generator competes "
        "with the system under test, for every target alike.",
        "",
        "## Method",
        "",
        table(["target", "what it is"], [[t, s.get("target_notes", TARGET_NOTES).get(t, "-")]
                                         for t in s["targets_run"]], "ll"),
        "",
        f"- **Load** (Retell-shaped): `callray sim` plays Retell's side over real loopback WebSockets. At each level "
        f"N calls open within {s['max_ramp_s']:.0f} s and overlap; each takes its greeting, sends `call_details`, "
        f"then {s['turns']} caller turns with a mean talk time of {s['think_s']} s. Every event carries the whole "
        f"transcript with per-word timings, an `update_only` arrives mid-utterance, {s['supersede_rate'] * 100:.0f}% "
        f"of turns are asked early and superseded, {s['reminder_rate'] * 100:.0f}% are reminders, and `ping_pong` "
        "comes every 2 s. Every frame is checked against the protocol; a level with a violation or a dropped call "
        "is marked.",
        f"- **Agents**: `flow`: callray's clinic flow agent; floor and baseline answer with a fixed two-chunk echo. "
        f"`llm`: every target streams from the same fake OpenAI-compatible LLM (first token after "
        f"{s['llm']['ttft_ms']:.0f} ms, then {s['llm']['tokens_per_s']:.0f} tokens/s), callray with "
        "`config/agents/assistant_llm.yaml` pointed at it.",
        "- **First chunk / first sentence**: request sent to the answer's first content / first sentence end (or "
        "completion). A holding phrase (callray says one when its latency budget passes with nothing ready) is not "
        "the answer: it is timed apart, and **holding first** is the share of requests that heard one.",
        "- **× floor**, **× demo**: the target's statistic over the floor's (or Retell's demo's), same level, same "
        "run. Flow mode compares first chunks, LLM mode first sentences. **Spread**: lowest–highest p50 of the "
        "rounds.",
        f"- **Niceness**: Ray runs its workers at nice {results.get('niceness', '-')}; the peers outside Ray "
        "(baseline, Retell's demo) run at the same niceness, the simulator and the fake LLM at 0.",
        "- **Memory per call**: resident memory summed over the target's processes before and after opening N idle "
        "calls, divided by N. **Capacity**: the largest tested level whose p99 first sentence stays within each "
        "architecture's budget with every lower level also inside and no violation or drop (`≥ N`: the highest "
        "level tested still fit).",
        "",
        "## The turn-path targets",
        "",
        goals_table(results),
    ]
    for mode_name, mode in results["modes"].items():
        title = "flow agent (no LLM)" if mode_name == "flow" else "LLM agent (fake LLM)"
        lines += ["", f"## Results: {title}", "", "### Latency (ms, median of rounds)", "",
                  latency_table(mode_name, mode), "",
                  "### Capacity within the latency budgets", "", capacity_table(mode), "",
                  "### Memory", "", memory_table(mode) or "Not measured in this mode.", ""]
        lines += _per_target("### Call setup on a freshly started deployment (ms)", mode.get("fresh_setup"),
                             "setup_ms")
        lines += _per_target("### One idle call, ten turns (ms)", mode.get("idle_turn"), "first_chunk_ms")
        cache = (mode.get("scenarios") or {}).get("cache_hit")
        if cache:
            lines += ["### Cache hits", "",
                      f"{cache['calls']} calls on `{cache['target']}` ask the agent's `common_questions` "
                      f"({cache['turns']} turns each); {cache['hits']} of {cache['answered']} answers came from the "
                      "cache. Server time is the conversation's own (request in to first frame out, from the "
                      "archived call records); the client's adds the proxy and the loopback.", "",
                      table(["measure", "p50 (ms)", "p99 (ms)"], [
                          ["server first chunk (cache hits)", fmt(cache["server_first_chunk_ms"]["p50"], 1),
                           fmt(cache["server_first_chunk_ms"]["p99"], 1)],
                          ["client first chunk", fmt(cache["client_first_chunk_ms"]["p50"], 1),
                           fmt(cache["client_first_chunk_ms"]["p99"], 1)]]), ""]
        lines += profile_section(mode.get("profile"))
        lines += ["### Plots", "",
                  f"![first-sentence latency CDF, {mode_name}]({img_dir}/bench-{mode_name}-cdf.png)", "",
                  f"![p99 first sentence vs concurrent calls, {mode_name}]({img_dir}/bench-{mode_name}-p99.png)", "",
                  "### What bounds each target", ""]
        lines += [f"- {b}" for b in bounds(mode_name, mode)]
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
    names = list(TARGET_NOTES)
    colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(names)}  # a target keeps its colour
    written = []
    for mode_name, mode in results["modes"].items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for target, entry in mode["targets"].items():
            levels = [lv for lv in measured(entry) if lv["samples"]["first_sentence_ms"]]
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
        ax.set_title(f"First-sentence latency CDF at each target's highest level ({mode_name}, all rounds)")
        written.append(_save_plot(fig, ax, img_dir / f"bench-{mode_name}-cdf.png"))

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for target, entry in mode["targets"].items():
            points = [(lv["calls"], lv["latency_ms"]["first_sentence_ms"]["p99"]) for lv in measured(entry)
                      if lv["latency_ms"]["first_sentence_ms"]["p99"] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=target, color=colors.get(target))
        for name, budget in BUDGETS_MS.items():
            ax.axhline(budget, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(f"{name} budget {budget:.0f} ms", (0.01, budget), xycoords=("axes fraction", "data"),
                        fontsize=7, color="grey", va="bottom")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xticks(sorted({lv["calls"] for e in mode["targets"].values() for lv in measured(e)}))
        ax.set_xlabel("concurrent calls")
        ax.set_ylabel("p99 first sentence (ms, log scale; median of rounds)")
        ax.set_title(f"p99 first sentence vs concurrent calls ({mode_name})")
        written.append(_save_plot(fig, ax, img_dir / f"bench-{mode_name}-p99.png"))
    return written


def write_report(results: dict[str, Any], out: Path, raw_path: Path | None = None) -> list[Path]:
    """Write the markdown report to ``out`` and its plots to ``<out dir>/img``; returns every file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out.parent / "img")
    raw = None
    if raw_path is not None:
        resolved = raw_path.resolve()
        raw = os.path.relpath(resolved, PROJECT_DIR) if resolved.is_relative_to(PROJECT_DIR) else str(raw_path)
    out.write_text(render_report(results, "img", raw))
    return [out, *plots]
