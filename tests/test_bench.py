"""The benchmark harness's cheap parts: rounds, ratios, goals, the report, the CLI. No Ray here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from callray.agents.registry import load_agent
from callray.settings import PROJECT_DIR, CallraySettings
from callray.sim.report import CallSample, SimResult, TurnSample
from harness import report, suite, targets


def sim_result(calls: int, first_sentence: list[float], *, setup_ms: float = 20.0, dropped: int = 0,
               holding: int = 0, duration_s: float = 10.0) -> SimResult:
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
                "turns_answered": len(turns), "dropped_calls": dropped, "holding_phrases": holding,
                "frames_received": 4 * len(turns)},
        dropped={"connection_lost": dropped} if dropped else {},
    )


def level(calls: int, *rounds_p: float, holding: int = 0) -> dict:
    """A level measured in one round per value of ``rounds_p`` (each round's samples all equal it)."""
    return report.aggregate(calls, [report.round_stats(sim_result(calls, [p] * (3 * calls), holding=holding))
                                    for p in rounds_p])


def synthetic_results() -> dict:
    def target(*levels: dict, memory: dict | None = None, status: str = "ok", error: str | None = None) -> dict:
        return {"status": status, "error": error, "levels": list(levels), "memory": memory, "notes": []}

    def memory(per_call_kb: float) -> dict:
        return {"calls": 30, "failed": 0, "rest_mb": 400.0, "open_mb": 412.0, "per_call_kb": per_call_kb,
                "processes": 2, "kinds": ["ProxyActor", "ServeReplica"]}

    return {
        "schema": 2, "started_at": "2025-01-02T03:04:05+00:00", "finished_at": "2025-01-02T03:14:05+00:00",
        "duration_s": 600.0, "command": "callray bench --quick", "quick": True, "complete": True, "niceness": 15,
        "machine": {"nproc": 2, "cpu": "Test CPU", "memory_gb": 24.0, "ray": "2.60.0", "python": "3.11.7",
                    "os": "Linux 6", "load_1m": 0.5},
        "settings": {"agents": ["flow", "llm"], "levels": [10, 30], "llm_levels": [10], "rounds": 3, "turns": 3,
                     "think_s": 2.0, "max_ramp_s": 5.0, "supersede_rate": 0.1, "reminder_rate": 0.05,
                     "idle_calls": 30, "llm": {"ttft_ms": 200.0, "tokens_per_s": 50.0},
                     "targets_run": ["floor", "single", "dedicated", "retell_demo"]},
        "modes": {
            "flow": {
                "targets": {
                    "floor": target(level(10, 10.0, 12.0, 11.0), level(30, 20.0, 20.0, 20.0), memory=memory(270.0)),
                    "single": target(level(10, 25.0, 30.0, 20.0), level(30, 600.0, 610.0, 590.0),
                                     memory=memory(281.0)),
                    "dedicated": target(status="not available", error="RuntimeError: placement not implemented"),
                },
                "idle_turn": {"floor": {"calls": 1, "first_chunk_ms": {"p50": 4.0, "p99": 6.0}},
                              "single": {"calls": 1, "first_chunk_ms": {"p50": 5.0, "p99": 9.0}}},
                "fresh_setup": {"floor": {"calls": 30, "rounds": 3, "setup_ms": {"p50": 40.0, "p99": 100.0}},
                                "single": {"calls": 30, "rounds": 3, "setup_ms": {"p50": 60.0, "p99": 250.0}}},
                "scenarios": {"cache_hit": {"target": "distributed", "calls": 20, "turns": 2, "answered": 40,
                                            "hits": 38, "server_first_chunk_ms": {"p50": 0.8, "p99": 3.5},
                                            "client_first_chunk_ms": {"p50": 6.0, "p99": 20.0}, "ok": True}},
            },
            "llm": {"targets": {
                "floor": target(level(10, 300.0, 300.0, 300.0)),
                "retell_demo": target(level(10, 400.0, 420.0, 410.0)),
                "single": target(level(10, 380.0, 380.0, 380.0, holding=6)),
            }},
        },
    }


# --------------------------------------------------------------------------- numbers


def test_ratio():
    assert report.ratio(30.0, 10.0) == 3.0
    assert report.ratio(10.0, 30.0) == 0.33
    assert report.ratio(None, 10.0) is None and report.ratio(5.0, 0.0) is None


def test_a_level_is_the_median_of_its_rounds_and_keeps_each_rounds_value():
    lv = level(10, 25.0, 30.0, 20.0)
    assert lv["rounds"] == 3 and lv["calls"] == 10
    assert lv["latency_ms"]["first_sentence_ms"]["p50"] == 25.0  # the median round, not the mean
    assert lv["latency_ms"]["first_sentence_ms"]["rounds_p50"] == [25.0, 30.0, 20.0]
    assert len(lv["samples"]["first_sentence_ms"]) == 90  # every round's samples, for the plots
    holding = level(10, 100.0, 100.0, holding=3)
    assert holding["holding_share"] == 0.1  # 6 of 60 requests heard a holding phrase first
    dropped = report.aggregate(10, [report.round_stats(sim_result(10, [5.0] * 30)),
                                    report.round_stats(sim_result(10, [5.0] * 30, dropped=2))])
    assert not dropped["ok"] and dropped["dropped"] == {"connection_lost": 2}


def test_capacity_is_the_largest_level_inside_the_budget_and_stops_at_the_first_failure():
    levels = [level(10, 100.0), level(50, 400.0), level(100, 900.0), level(200, 200.0)]
    assert report.capacity(levels, 800) == {"calls": 50, "bounded": True, "lowest": 10}
    assert report.capacity(levels, 50) == {"calls": None, "bounded": True, "lowest": 10}
    assert report.format_capacity(report.capacity(levels[:2], 800)) == "≥ 50"
    skipped = levels[:1] + [{"calls": 50, "skipped": "too big"}]
    assert report.capacity(skipped, 800) == {"calls": 10, "bounded": False, "lowest": 10}


def test_goals_are_read_from_the_measured_data():
    results = synthetic_results()
    by_goal = {g["goal"]: g for g in report.goals(results)}
    p50 = by_goal["flow, 30 calls: first chunk p50 ≤ 1.3× floor"]
    assert p50["figure"] == 30.0 and p50["met"] is False  # 240 ms vs the floor's 8 ms (first chunk = 0.4 × sentence)
    assert by_goal["flow: call setup p99 on a fresh deployment ≤ 3× floor (30 calls)"]["figure"] == 2.5
    assert by_goal["cache hit (distributed, 20 calls): server first chunk p99 < 10 ms"]["met"] is True
    assert by_goal["memory per connected call ≤ floor + 20 KB"]["figure"] == 11.0
    assert by_goal["one idle call's flow turn (first chunk p50) ≤ 1.5× floor"]["figure"] == 1.25
    demo = by_goal["LLM, 10 calls: first sentence p50 ≤ Retell's demo"]
    assert demo["figure"] == round(380 / 410, 2) and demo["met"] is True


# --------------------------------------------------------------------------- targets


def test_callray_args_point_every_target_at_the_runs_redis_namespace_and_placement(tmp_path):
    agent = targets.write_llm_agent(tmp_path, "http://127.0.0.1:9/v1")
    assert load_agent(agent).config.providers[0].base_url == "http://127.0.0.1:9/v1"
    for target, (_, placement) in targets.CALLRAY_TARGETS.items():
        args = targets.callray_args(target, namespace=f"ns-{target}", redis_url="redis://127.0.0.1:1/0",
                                    agent_file=agent)
        settings = CallraySettings.parse(args)
        assert settings.hosts.namespace == f"ns-{target}" and settings.hosts.placement == placement
        assert settings.agents.resolve(settings.agents.default) == agent
        if target in targets.REDIS_TARGETS:
            assert settings.redis.url == "redis://127.0.0.1:1/0"
    with pytest.raises(RuntimeError, match="needs Redis"):
        targets.callray_args("distributed", namespace="x", redis_url=None, agent_file=None)


def test_flow_mode_deploys_the_flow_agent_even_when_the_run_also_has_an_llm_mode(tmp_path, monkeypatch):
    """A flow row answered by the fake LLM once came out ~400 ms slow: the agent file leaked."""
    deployed: list[tuple[str, object, object]] = []
    monkeypatch.setattr(suite, "deploy_serve_target", lambda target, port, **kw: deployed.append(
        (target, kw["llm_base_url"], kw["agent_file"])))
    options = suite.BenchOptions(agents=["flow", "llm"])
    for mode in ("flow", "llm"):
        run = suite.ModeRun(mode, options, None, None, "t", 1, None, "http://llm/v1", tmp_path / "a.yaml", lambda: None)
        run.deploy("single")
        run.deploy("floor")
    assert deployed == [("single", None, None), ("floor", None, None),
                        ("single", "http://llm/v1", tmp_path / "a.yaml"), ("floor", "http://llm/v1", None)]


def test_the_retell_demo_runs_from_a_copy_with_its_readme_env(tmp_path):
    """The checkout stays untouched; a missing checkout is refused naming the path."""
    with pytest.raises(RuntimeError, match="no app/server.py"):
        targets.start_retell_demo(targets.Processes(tmp_path), tmp_path / "nowhere", "http://x/v1", 0)
    assert "OPENAI_API_KEY=" in targets.DEMO_ENV and "RETELL_API_KEY=" in targets.DEMO_ENV
    checkout = tmp_path / "demo"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "python").write_text("")
    assert targets.demo_python(checkout, pinned=True) == checkout / ".venv" / "bin" / "python"
    assert targets.demo_python(checkout, pinned=False) == Path(sys.executable)
    with pytest.raises(RuntimeError, match="requirements.txt"):
        targets.demo_python(tmp_path, pinned=True)


# --------------------------------------------------------------------------- report


def test_report_has_goals_tables_spread_ratios_and_plots(tmp_path):
    results = synthetic_results()
    out = tmp_path / "docs" / "benchmarks.md"
    files = report.write_report(results, out, PROJECT_DIR / "bench" / "results" / "x.json")
    text = out.read_text()
    for heading in ("## Machine", "## Method", "## The turn-path targets", "## Results: flow agent (no LLM)",
                    "## Results: LLM agent (fake LLM)", "### Capacity within the latency budgets", "### Memory",
                    "### Call setup on a freshly started deployment (ms)", "### One idle call, ten turns (ms)",
                    "### Cache hits", "### What bounds each target"):
        assert heading in text, heading
    assert "callray bench --quick" in text and "bench/results/x.json" in text and "Quick run" in text
    assert "in 3 rounds" in text and "nice 15" in text
    # first chunk 0.4 × sentence; spread of the rounds' p50; ratio to the floor in the same run
    assert "| single | 10 | 29 | 38 | 10 | 10 | 25 | 25 | 8–12 | 2.27 / 2.27 | 75 | yes |" in text
    # LLM: ratios against the floor and against Retell's demo, holding share
    assert "| single | 10 | 29 | 38 | 152 | 152 | 380 | 380 | 380–380 | 1.27 / 1.27 | 0.93 / 0.93 | 20% | 430 | yes |" \
        in text
    assert "| single | ≥ 30 | 10 | 10 |" in text
    assert "**dedicated**: not available: RuntimeError: placement not implemented" in text
    assert "| cache hit (distributed, 20 calls): server first chunk p99 < 10 ms | 3.5 ms | met |" in text
    assert "**not met**" in text  # the synthetic single is 30x the floor at 30 calls
    pngs = [f for f in files if f.suffix == ".png"]
    assert {p.name for p in pngs} == {"bench-flow-cdf.png", "bench-flow-p99.png", "bench-llm-cdf.png",
                                      "bench-llm-p99.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"img/{png.name}" in text


def test_report_of_an_interrupted_run_says_so():
    results = synthetic_results()
    results["complete"] = False
    assert "Incomplete run" in report.render_report(results)


def test_a_profile_is_summarised_by_where_the_cpu_was(tmp_path):
    from harness import profile

    raw = tmp_path / "stacks.txt"
    raw.write_text("main (serve_app.py:1);handle (callray/session.py:9) 60\n"
                   "main (serve_app.py:1);relay (ray/serve/_private/replica.py:5) 30\n"
                   "main (serve_app.py:1);loads (json/decoder.py:3) 10\n")
    summary = profile.summarise(raw)
    assert summary["samples"] == 100
    assert summary["areas"] == {"callray (this project)": 0.6, "Ray Serve (ASGI relay, router, replica)": 0.3,
                                "json": 0.1}
    assert summary["top_self"][0] == ("handle (callray/session.py:9)", 0.6)


# --------------------------------------------------------------------------- command line


def test_callray_loads_no_harness_ray_or_matplotlib_until_a_harness_command_runs():
    out = subprocess.run([sys.executable, "-m", "callray.cli", "bench", "--help"], cwd=PROJECT_DIR,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--quick", "--targets", "--levels", "--rounds", "--retell-demo", "--profile", "--out"):
        assert flag in out.stdout
    probe = ("import sys, callray.cli; callray.cli.build_parser(); "
             "print(any(m.startswith('harness') for m in sys.modules), 'ray' in sys.modules, 'matplotlib' in sys.modules)")
    imported = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=60)
    assert imported.stdout.split() == ["False", "False", "False"], imported.stderr


def _bench_args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_options_from_args_quick_defaults_and_command_line(tmp_path):
    options = suite.options_from_args(_bench_args("--quick", "--levels", "20", "10"))
    assert options.quick and options.targets == list(suite.QUICK_TARGETS) and options.rounds == 2
    assert options.levels == [10, 20] and options.agents == ["flow"]
    assert options.command == "callray bench --quick --levels 20 10"
    full = suite.options_from_args(_bench_args("--agent", "llm", "--rounds", "5"))
    assert full.targets is None
    assert full.mode_targets("llm") == [t for t in suite.LLM_TARGETS if not t.startswith("retell_demo")]
    assert full.mode_levels("llm") == list(suite.DEFAULT_LLM_LEVELS) and full.rounds == 5
    with pytest.raises(ValueError, match="levels"):
        suite.options_from_args(_bench_args("--levels", "0"))
    with pytest.raises(ValueError, match="retell-custom-llm-python-demo"):
        suite.options_from_args(_bench_args("--retell-demo", str(tmp_path)))


def test_regenerate_report_from_saved_json(tmp_path):
    from callray.cli import main

    raw = tmp_path / "results.json"
    raw.write_text(json.dumps(synthetic_results()))
    out = tmp_path / "report.md"
    assert main(["bench", "--from-json", str(raw), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Benchmarks")
    assert (tmp_path / "img" / "bench-flow-p99.png").exists()


def test_versions_checks_out_each_revision_alone_and_compares_them_round_by_round(tmp_path):
    from harness import versions

    old = versions.checkout("d26051d", tmp_path / "before")  # before callray/replica.py became runtime.py
    new = versions.checkout("HEAD", tmp_path / "after")
    assert (old / "callray/replica.py").exists() and not (old / "callray/runtime.py").exists()
    assert (new / "callray/runtime.py").exists() and (new / "serve_app.py").exists()
    assert not (new / "bench/results").exists()  # a replica's working_dir ships only the code
    stats = {name: [report.round_stats(sim_result(10, [p] * 30)) for p in ps]
             for name, ps in {"baseline": [100, 100, 100], "before": [200, 400, 300], "after": [100, 400, 600]}.items()}
    rounds = {("llm", name, 10): rs for name, rs in stats.items()}
    row = versions.summarise(rounds, versions.VersionsOptions(before="x", agents=["llm"], levels=[10]))["llm/10"]
    assert row["before"]["p50"] == 300 and row["after"]["p50"] == 400
    assert row["after_vs_before"]["p50"] == 1.0  # the median of 0.5, 1.0 and 2.0, each within its round
    with pytest.raises(subprocess.CalledProcessError):
        versions.checkout("no-such-revision", tmp_path / "nowhere")


VERSION_PROBE = """
import sys
from pathlib import Path
from rich.console import Console
from harness import versions
from harness.targets import deploy_serve_target, ray_session

folder = versions.checkout("HEAD", Path(sys.argv[1]))
with ray_session(Console(stderr=True)) as port:
    deployed = deploy_serve_target("single", port, namespace="versions-probe", app="probe", code=folder)
    try:
        versions.check_runs(deployed, folder)
    finally:
        deployed.teardown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_replica_deployed_from_another_checkout_imports_that_checkout(tmp_path):
    """Before, Ray put the driver's current directory (this project) first on every worker's
    sys.path: the replica imported this checkout's callray whatever its working_dir, and
    ``callray versions`` measured one version twice. Its own Ray, in a process of its own."""
    probe = subprocess.run([sys.executable, "-c", VERSION_PROBE, str(tmp_path / "other")], cwd=PROJECT_DIR,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]


def test_each_ingress_report_keeps_a_plot_of_its_own(tmp_path):
    """A second report (another --out) overwrote docs/ingress.md's plot: the plot is named after its report."""
    from harness.ingress import IngressOptions, write_report

    saved = json.loads((PROJECT_DIR / "bench/results/ingress-flow-20261206-141353.json").read_text())
    plots = set()
    for out in ("ingress.md", "ingress-haproxy.md"):
        options = IngressOptions(**{**saved["options"], "out": str(tmp_path / out)})
        text = write_report(saved, options, tmp_path / out).read_text()
        plots.add(text.split("](", 1)[1].split(")", 1)[0])
    assert plots == {"img/ingress-flow.png", "img/ingress-haproxy-flow.png"}
    assert all((tmp_path / p).exists() for p in plots)


def test_an_ingress_report_shows_how_far_the_rounds_ratios_spread(tmp_path):
    """A median of a few rounds hid that one round's ratio to the one-process server was 1.67 and
    another's 2.11: the report gives the rounds' range beside the median."""
    from harness.ingress import IngressOptions, summarise, write_report

    saved = json.loads((PROJECT_DIR / "bench/results/ingress-flow-20261207-081104.json").read_text())
    rounds = {tuple(key.split("/")[:2]) + (int(key.split("/")[2]),): rs for key, rs in saved["rounds"].items()}
    options = IngressOptions(**{**saved["options"], "out": str(tmp_path / "ingress.md")})
    level = summarise(rounds, options)["haproxy"]["single"][0]
    single, base = rounds[("haproxy", "single", 100)], rounds[("haproxy", "baseline", 100)]
    p50s = [round(a["latency_ms"]["first_chunk_ms"]["p50"] / b["latency_ms"]["first_chunk_ms"]["p50"], 2)
            for a, b in zip(single, base)]
    assert level["vs_baseline_range"]["p50"] == [min(p50s), max(p50s)]
    assert min(p50s) < level["vs_baseline"]["p50"] < max(p50s)
    text = write_report({**saved, "summary": summarise(rounds, options)}, options, tmp_path / "ingress.md").read_text()
    low, high = level["vs_baseline_range"]["p50"]
    assert f"; rounds x{low}-{high} / x" in text
    assert "| baseline | 0.76 / 1.85 |" in text  # the peers' own row has no ratio, hence no range


def test_an_ingress_report_says_which_agent_its_profile_ran(tmp_path):
    """An LLM run's report said its profile was of the flow agent (the profile deployed the
    single config's default agent whatever was measured): the profile runs the measured agent
    and its paragraph names it with the measured figure; runs saved before still read as flow."""
    from harness.ingress import IngressOptions, write_report

    saved = json.loads((PROJECT_DIR / "bench/results/ingress-llm-20261207-083309.json").read_text())
    options = IngressOptions(**{**saved["options"], "out": str(tmp_path / "llm.md")})
    old = write_report(saved, options, tmp_path / "llm.md").read_text()
    assert "replica (flow agent) under py-spy" in old and "first chunk p50" in old
    profile = {k: v for k, v in saved["profiles"][0].items() if k != "first_chunk_ms"}
    profile.update(agent="llm", latency_ms={"p50": 371.9, "p99": 403.9})
    new = write_report({**saved, "profiles": [profile]}, options, tmp_path / "llm.md").read_text()
    assert "replica (llm agent) under py-spy" in new and "first sentence p50 371.9 / p99 403.9 ms" in new


HAPROXY_CFG = """backend http-single
    server SERVE_REPLICA_single-CallGateway-aah3axg7 127.0.0.1:30000 check observe layer4
    server SERVE_PROXY_ACTOR-fallback-d1b5 127.0.0.1:8500 check backup
backend http-distributed
    server SERVE_REPLICA_distributed-CallGateway-k2 127.0.0.1:30001 check
    server SERVE_REPLICA_distributed-CallGateway-k3 127.0.0.1:30002 check
backend http-floor_token
    server SERVE_REPLICA_floor_token-Floor-x1 127.0.0.1:30003 check
"""


def test_direct_rows_call_a_single_replica_target_at_its_replicas_port(tmp_path, monkeypatch):
    """``callray ingress --direct``: the HAProxy hop's cost, measured by calling a target's one
    replica where HAProxy calls it. A target of several replicas gets no row (all its calls on
    one replica would measure something else), and neither does a target HAProxy has not listed."""
    import io

    from rich.console import Console

    from harness.ingress import IngressOptions, direct_targets, summarise, write_report

    (tmp_path / "d1b5").mkdir()  # Serve writes the config one directory down, named after the cluster
    (tmp_path / "d1b5" / "haproxy.cfg").write_text(HAPROXY_CFG)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", str(tmp_path / "haproxy.cfg"))
    assert targets.replica_addresses("distributed") == ["127.0.0.1:30001", "127.0.0.1:30002"]
    assert targets.replica_addresses("floor") == []  # floor_token's replica is not floor's

    def deployed(name: str) -> targets.Deployed:
        return targets.Deployed(name, f"ws://127.0.0.1:8000/{name}/llm-websocket", lambda: [], lambda: None,
                                holding=frozenset({"One moment."}))

    log = io.StringIO()
    rows = direct_targets({n: deployed(n) for n in ("single", "distributed", "floor")}, Console(file=log))
    assert list(rows) == ["single_direct"]
    assert rows["single_direct"].url == "ws://127.0.0.1:30000/single/llm-websocket"
    assert rows["single_direct"].holding == frozenset({"One moment."})
    assert "distributed: 2 replicas" in log.getvalue() and "floor: 0 replicas" in log.getvalue()

    def level(p50: float, p99: float) -> dict:
        return {"latency_ms": {"first_chunk_ms": {"p50": p50, "p99": p99}, "first_sentence_ms": {"p99": p99},
                               "setup_ms": {"p99": 3.0}}, "violations": {}, "dropped": {}, "simulator_bottleneck": False}

    rounds = {("haproxy", "single_direct", 100): [level(0.9, 2.0), level(1.0, 2.5), level(0.8, 1.9)],
              ("haproxy", "baseline", 100): [level(0.5, 1.0)] * 3,
              ("haproxy", "single", 100): [level(1.0, 2.5), level(1.3, 2.6), level(0.95, 2.4)]}
    options = IngressOptions(ingresses=["haproxy"], targets=["single"], levels=[100], direct=True, out=tmp_path / "i.md")
    summary = summarise(rounds, options)
    assert list(summary["haproxy"]) == ["baseline", "single", "single_direct"]  # each beside its target
    # the hop is the median of each round's difference (0.1, 0.3, 0.15), not a difference of medians (0.05)
    assert summary["haproxy"]["single"][0]["hop_ms"] == {"p50": 0.15, "p99": 0.5}
    assert summary["haproxy"]["single_direct"][0]["hop_ms"] is None
    text = write_report({"started_at": "t", "machine": {}, "summary": summary, "results": "r.json", "command": "c"},
                        options, tmp_path / "i.md").read_text()
    assert "- single: +0.15 / +0.5 ms at 100 calls" in text
    # a direct row whose rounds have no figure (every call dropped) gives no hop, not "+None"
    rounds[("haproxy", "single_direct", 100)] = [{**level(0, 0), "latency_ms": {
        "first_chunk_ms": {"p50": None, "p99": None}, "first_sentence_ms": {"p99": None}, "setup_ms": {"p99": None}}}] * 3
    text = write_report({"started_at": "t", "machine": {}, "summary": summarise(rounds, options), "results": "r.json",
                         "command": "c"}, options, tmp_path / "i.md").read_text()
    assert "+None" not in text and "HAProxy's hop" not in text
