"""The benchmark suite's cheap parts: helpers, the report generator, the CLI. No Ray here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from callray import bench
from callray.agents.registry import load_agent
from callray.settings import PROJECT_DIR, CallraySettings
from callray.sim import simulator
from callray.sim.report import CallSample, SimResult, TurnSample


def sim_result(calls: int, first_sentence: list[float], *, setup_ms: float = 20.0, dropped: int = 0,
               duration_s: float = 10.0) -> SimResult:
    """A result as the simulator would return it: ``calls`` calls, turns with the given latencies."""
    turns = [TurnSample(call=i % calls, turn=i // calls, response_id=i + 1, kind="response_required", t_s=0.1 * i,
                        first_chunk_ms=x * 0.4, first_sentence_ms=x, complete_ms=x + 50)
             for i, x in enumerate(first_sentence)]
    return SimResult(
        config={"calls": calls}, started_at=0.0, duration_s=duration_s,
        calls=[CallSample(call=i, call_id=f"c{i}", t_s=0.0, setup_ms=setup_ms + 2 * i, turns_answered=3, reconnects=0,
                          ended="completed") for i in range(calls)],
        turns=turns,
        counts={"calls": calls, "requests_sent": len(turns), "update_only_sent": len(turns), "pings_sent": 10,
                "turns_answered": len(turns), "dropped_calls": dropped},
        dropped={"connection_lost": dropped} if dropped else {},
    )


def level(calls: int, p: float, **kw) -> dict:
    """A measured level whose first-sentence samples are all ``p`` ms (so p50 = p99 = p)."""
    return bench.level_stats(sim_result(calls, [p] * (3 * calls), **kw), calls=calls, frames_in=calls * 12,
                             holding=0, ttft_ms=None)


def synthetic_results() -> dict:
    def target(*levels: dict, memory: dict | None = None, status: str = "ok", error: str | None = None) -> dict:
        return {"status": status, "error": error, "levels": list(levels), "memory": memory}

    memory = {"calls": 30, "failed": 0, "rest_mb": 400.0, "open_mb": 412.0, "per_call_kb": 409.6,
              "processes": 3, "kinds": ["CallHost", "ProxyActor", "ServeReplica"]}
    llm_level = bench.level_stats(sim_result(10, [380.0] * 30), calls=10, frames_in=300, holding=6, ttft_ms=200.0)
    return {
        "schema": 1, "started_at": "2025-01-02T03:04:05+00:00", "finished_at": "2025-01-02T03:14:05+00:00",
        "duration_s": 600.0, "command": "python -m callray.cli bench --quick", "quick": True, "complete": True,
        "machine": {"nproc": 2, "cpu": "Test CPU", "memory_gb": 24.0, "ray": "2.60.0", "python": "3.11.7",
                    "os": "Linux 6", "load_1m": 0.5},
        "settings": {"targets": ["floor", "single", "dedicated"], "levels": [10, 30], "agents": ["flow", "llm"],
                     "turns": 3, "think_s": 2.0, "max_ramp_s": 5.0, "supersede_rate": 0.1, "reminder_rate": 0.05,
                     "idle_calls": 30, "llm": {"ttft_ms": 200.0, "tokens_per_s": 50.0},
                     "budgets_ms": bench.BUDGETS_MS},
        "modes": {
            "flow": {"targets": {
                "floor": target(level(10, 10.0), level(30, 20.0), memory=memory),
                "single": target(level(10, 25.0), level(30, 600.0), memory=memory),
                "dedicated": target(status="not available", error="RuntimeError: placement not implemented"),
            }},
            "llm": {"targets": {
                "floor": target(bench.level_stats(sim_result(10, [300.0] * 30), calls=10, frames_in=400, holding=0,
                                                  ttft_ms=200.0)),
                "single": target(llm_level),
            }},
        },
    }


# --------------------------------------------------------------------------- helpers


def test_ratio():
    assert bench.ratio(30.0, 10.0) == 3.0
    assert bench.ratio(10.0, 30.0) == 0.33
    assert bench.ratio(None, 10.0) is None
    assert bench.ratio(10.0, None) is None
    assert bench.ratio(10.0, 0.0) is None


def test_capacity_is_the_largest_level_inside_the_budget():
    levels = [level(10, 100.0), level(50, 400.0), level(100, 700.0), level(200, 900.0)]
    assert bench.capacity(levels, 800.0) == {"calls": 100, "bounded": True, "lowest": 10}
    assert bench.capacity(levels, 500.0)["calls"] == 50
    assert bench.capacity(levels, 50.0) == {"calls": None, "bounded": True, "lowest": 10}
    assert bench.capacity(levels, 1000.0) == {"calls": 200, "bounded": False, "lowest": 10}
    assert bench.format_capacity(bench.capacity(levels, 800.0)) == "100"
    assert bench.format_capacity(bench.capacity(levels, 50.0)) == "< 10"
    assert bench.format_capacity(bench.capacity(levels, 1000.0)) == "≥ 200"


def test_capacity_stops_at_the_first_failing_level_and_ignores_skipped_ones():
    # 50 calls is over budget: the lucky 100 must not count
    levels = [level(10, 100.0), level(50, 900.0), level(100, 100.0), {"calls": 200, "skipped": "too big"}]
    assert bench.capacity(levels, 800.0)["calls"] == 10
    # a level with a dropped call is not inside the budget, however fast it was
    levels = [level(10, 100.0), level(50, 100.0, dropped=1)]
    assert bench.capacity(levels, 800.0) == {"calls": 10, "bounded": True, "lowest": 10}
    assert bench.capacity([{"calls": 10, "skipped": "x"}], 800.0)["lowest"] is None


def test_level_stats_rates_overhead_and_samples():
    result = sim_result(10, [300.0, 400.0, 500.0], duration_s=2.0)
    stats = bench.level_stats(result, calls=10, frames_in=100, holding=2, ttft_ms=200.0)
    assert stats["ok"] and stats["calls"] == 10
    assert stats["latency_ms"]["first_sentence_ms"]["p50"] == 400.0
    assert stats["overhead_ms"]["first_sentence"]["p50"] == 200.0
    assert stats["overhead_ms"]["first_chunk"]["p50"] == -40.0  # first chunks are 120/160/200 ms
    # frames sent: 3 requests + 3 update_only + 10 pings + 10 call_details
    assert stats["frames_out"] == 26
    assert stats["frames_in_per_s"] == 50.0 and stats["frames_per_s"] == 63.0
    assert stats["samples"]["first_sentence_ms"] == [300.0, 400.0, 500.0]
    assert stats["holding_phrases"] == 2
    assert bench.level_stats(result, calls=10, frames_in=0, holding=0, ttft_ms=None)["overhead_ms"] is None


def test_floor_ratio_compares_the_same_level_in_the_same_run():
    mode = synthetic_results()["modes"]["flow"]
    assert bench.floor_ratio(mode, "single", 10) == 2.5
    assert bench.floor_ratio(mode, "single", 30, stat="p99") == 30.0
    assert bench.floor_ratio(mode, "single", 200) is None
    assert bench.floor_ratio(mode, "dedicated", 10) is None


def test_frame_tap_counts_frames_and_holding_phrases_then_uninstalls():
    original = simulator.validate_frame
    tap = bench.FrameTap(holding=frozenset({"One moment."}))
    frames = [{"response_type": "config", "config": {}},
              {"response_type": "response", "response_id": 1, "content": "One moment. ", "content_complete": False},
              {"response_type": "response", "response_id": 1, "content": "Hi.", "content_complete": True}]
    with tap.installed():
        for frame in frames:
            data, issues = simulator.validate_frame(json.dumps(frame))
            assert data is not None and not issues
    assert simulator.validate_frame is original
    assert (tap.frames, tap.holding_count) == (3, 1)


# --------------------------------------------------------------------------- target config


def test_callray_args_point_every_target_at_the_suites_redis_and_namespace(tmp_path):
    agent = bench.write_llm_agent(tmp_path, "http://127.0.0.1:9/v1")
    loaded = load_agent(agent)
    assert loaded.config.providers[0].base_url == "http://127.0.0.1:9/v1"
    for target in ("single", "distributed", "event_driven", "dedicated"):
        args = bench.callray_args(target, namespace=f"ns-{target}", redis_url="redis://127.0.0.1:1/0",
                                  agent_file=agent)
        settings = CallraySettings.parse(args)
        assert settings.hosts.namespace == f"ns-{target}"
        assert settings.agents.resolve(settings.agents.default) == agent
        assert settings.hosts.placement == ("dedicated" if target == "dedicated" else "local")
        if target in bench.REDIS_TARGETS:
            assert settings.state.redis_url == "redis://127.0.0.1:1/0"
    with pytest.raises(RuntimeError, match="needs Redis"):
        bench.callray_args("distributed", namespace="x", redis_url=None, agent_file=None)


# --------------------------------------------------------------------------- report


def test_report_has_machine_method_tables_and_plots(tmp_path):
    results = synthetic_results()
    out = tmp_path / "docs" / "benchmarks.md"
    files = bench.write_report(results, out, PROJECT_DIR / "bench" / "results" / "x.json")
    text = out.read_text()
    for heading in ("## Machine", "## Method", "## Results: flow agent (no LLM)", "## Results: LLM agent (fake LLM)",
                    "### Capacity within the latency budgets", "### Memory", "### What bounds each target"):
        assert heading in text
    assert "python -m callray.cli bench" in text and "bench/results/x.json" in text
    assert "Quick run" in text
    assert "| CPU cores (nproc) | 2 |" in text
    # latency rows with the ratio to the floor measured in the same run
    assert "| single | 10 | 29 | 38 | 10 | 10 | 25 | 25 | 2.50 / 2.50 | 75 | yes |" in text
    assert "| single | 30 |" in text and "30.00 / 30.00" in text
    # capacity: single fits 800 ms at 10 calls but not at 30 (600 ms p99 is over 500 and inside 800)
    assert "| single | ≥ 30 | 10 | 10 |" in text
    assert "| floor | ≥ 30 | ≥ 30 | ≥ 30 |" in text
    assert "| floor | 400 | 410 | 30 | 3 | CallHost, ProxyActor, ServeReplica |" in text
    assert "Not measured in this mode." in text  # the LLM mode of the synthetic run has no memory entry
    # LLM mode: overhead above the LLM's first token and the holding-phrase share
    assert "| single | 10 | 29 | 38 | 152 | 152 | 380 | 380 | 1.27 / 1.27 | 180 | 180 | 20% | 430 | yes |" in text
    assert "**dedicated** — not available: RuntimeError: placement not implemented" in text
    assert "essentially the fake LLM's own time" in text  # the LLM mode's floor explains the 300 ms column
    pngs = [f for f in files if f.suffix == ".png"]
    assert {p.name for p in pngs} == {"bench-flow-cdf.png", "bench-flow-p99.png", "bench-llm-cdf.png",
                                      "bench-llm-p99.png"}
    for png in pngs:
        assert png.parent == out.parent / "img"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"img/{png.name}" in text


def test_report_of_an_interrupted_run_says_so():
    results = synthetic_results()
    results["complete"] = False
    assert "Incomplete run" in bench.render_report(results)


# --------------------------------------------------------------------------- command line


def test_bench_help_works_without_importing_ray():
    out = subprocess.run([sys.executable, "-m", "callray.cli", "bench", "--help"], cwd=PROJECT_DIR,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--quick", "--targets", "--levels", "--agent", "--out"):
        assert flag in out.stdout
    probe = "import sys, callray.cli, callray.bench; print('ray' in sys.modules, 'matplotlib' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=60)
    assert imported.stdout.split() == ["False", "False"], imported.stderr


def test_options_from_args_quick_defaults_and_command_line():
    from callray.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--levels", "20", "10"])
    options = bench.options_from_args(args)
    assert options.quick and options.targets == list(bench.QUICK_TARGETS)
    assert options.levels == [10, 20] and options.agents == ["flow"]
    assert options.command == "python -m callray.cli bench --quick --levels 20 10"
    full = bench.options_from_args(build_parser().parse_args(["bench", "--agent", "llm"]))
    assert full.targets == list(bench.ALL_TARGETS) and full.levels == list(bench.DEFAULT_LEVELS)
    assert full.agents == ["llm"]
    with pytest.raises(ValueError, match="levels"):
        bench.options_from_args(build_parser().parse_args(["bench", "--levels", "0"]))


def test_regenerate_report_from_saved_json(tmp_path):
    from callray.cli import main

    raw = tmp_path / "results.json"
    raw.write_text(json.dumps(synthetic_results()))
    out = tmp_path / "report.md"
    assert main(["bench", "--from-json", str(raw), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Benchmarks")
    assert (tmp_path / "img" / "bench-flow-p99.png").exists()

