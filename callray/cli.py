"""The ``callray`` command line.

    callray call URL [--say FILE] [--say-line TEXT ...] [--call-id ID]   talk to a server
    callray sim URL --calls N --turns T [...]                            load + conformance test
    callray fake-llm ...                                                 OpenAI-compatible fake LLM
    callray check CONFIG                                                 validate a Serve config
    callray test SUITE... [--url URL]                                    scenario suites for an agent
    callray bench [...]                                                  the benchmark suite
    callray chaos [...]                                                  fault injection under live calls
    callray soak [...]                                                   a long run: memory, drift, errors
    callray ingress [...]                                                Serve's Python proxy against HAProxy
    callray export URL --since 7d [--format jsonl|csv] [--out FILE]      archived records, for analysis
    callray erase URL (--call ID | --phone NUMBER)                       erase a call's or a caller's data

URL is the LLM WebSocket base, e.g. ``ws://127.0.0.1:8000/llm-websocket``; the call id is
appended as Retell does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from callray.sim.interactive import CallEvent, place_call
from callray.sim.report import METRICS, SimResult
from callray.sim.client import VIOLATION_KINDS, WARNING_KINDS
from callray.sim.simulator import SimConfig, run_simulation

# ---------------------------------------------------------------------------------- call


def _add_call(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("call", help="place one call and show both sides",
                       description="Place one call as Retell would and print the conversation as it streams. "
                                   "Caller lines come from --say/--say-line, else from a prompt.")
    p.add_argument("url", help="LLM WebSocket base URL, e.g. ws://127.0.0.1:8000/llm-websocket")
    p.add_argument("--say", type=Path, metavar="FILE", help="caller lines, one per line")
    p.add_argument("--say-line", action="append", default=[], metavar="TEXT", help="a caller line (repeatable)")
    p.add_argument("--call-id", help="call id to use (default: random)")
    p.add_argument("--turn-timeout-s", type=float, default=30.0, help="seconds to wait for each answer")
    p.set_defaults(handler=_cmd_call)


def _cmd_call(args: argparse.Namespace) -> int:
    console = Console()
    scripted: list[str] = []
    if args.say:
        try:
            scripted += [line.strip() for line in args.say.read_text().splitlines() if line.strip()]
        except OSError as exc:
            console.print(f"[red]cannot read --say file {args.say}: {exc}[/]")
            return 2
    scripted += args.say_line
    interactive = not scripted
    lines = iter(scripted)

    async def next_line() -> str | None:
        if not interactive:
            return next(lines, None)
        try:
            return await asyncio.to_thread(console.input, "[bold green]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            return None

    def show(event: CallEvent) -> None:
        if event.kind == "caller" and not interactive:
            console.print(f"[bold green]caller>[/] {event.text}", highlight=False)
        elif event.kind == "agent_start":
            console.print("[bold cyan]agent>[/] ", end="")
        elif event.kind == "agent_chunk":
            console.print(event.text, end="", markup=False, highlight=False)
        elif event.kind == "agent_end":
            if event.text:
                console.print()
            console.print(f"[dim]  (#{event.response_id}: first sentence {event.first_sentence_ms} ms, "
                          f"complete {event.complete_ms} ms)[/]")
        elif event.kind == "action":
            console.print(f"[magenta]  {event.text}[/]", markup=True, highlight=False)
        elif event.kind == "issue":
            console.print(f"[bold red]! {event.text}[/]", highlight=False)
        elif event.kind == "info":
            console.print(f"[dim]{event.text}[/]", highlight=False)

    outcome = asyncio.run(place_call(args.url, next_line, show, call_id=args.call_id,
                                     turn_timeout_s=args.turn_timeout_s))
    return 0 if outcome.ok else 1


# ---------------------------------------------------------------------------------- sim


def _option_type(annotation: Any) -> type:
    """int for ``int``, ``int | None`` and friends."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str]) -> None:
    """One --flag per config field, help text from the field's description, so they never drift."""
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        typ = _option_type(f.annotation)
        help_text = f.description or ""
        if "default" not in help_text:
            help_text += f" (default: {f.get_default(call_default_factory=True)})"
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=typ, default=None, help=help_text, metavar=typ.__name__.upper())


def _add_sim(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="simulate many Retell calls: latency percentiles and protocol violations",
                       description="Play Retell's side for many concurrent calls and judge the server by the wire "
                                   "protocol. Exits 1 on any protocol violation or dropped call.")
    p.add_argument("url", help="LLM WebSocket base URL, e.g. ws://127.0.0.1:8000/llm-websocket")
    _add_model_options(p, SimConfig, skip={"url", "caller_lines"})
    p.add_argument("--lines", type=Path, metavar="FILE", help="caller lines, one per line; '{name}' is replaced "
                                                               "by the call's unique caller name")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the summary and every sample as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_sim)


def _sim_config(args: argparse.Namespace) -> SimConfig:
    values = {k: v for k, v in vars(args).items() if k in SimConfig.model_fields and v is not None}
    if args.lines:
        values["caller_lines"] = [line for line in args.lines.read_text().splitlines() if line.strip()]
    return SimConfig(**values)


def _cmd_sim(args: argparse.Namespace) -> int:
    console = Console()
    try:
        config = _sim_config(args)
    except (ValidationError, OSError) as exc:
        console.print(f"[red]bad simulation settings:[/] {exc}")
        return 2
    if args.quiet:
        result = asyncio.run(run_simulation(config))
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            calls = bar.add_task("calls", total=config.calls)
            turns = bar.add_task("turns", total=config.calls * config.turns)

            def progress(calls_done: int, turns_done: int) -> None:
                bar.update(calls, completed=calls_done)
                bar.update(turns, completed=turns_done)

            result = asyncio.run(run_simulation(config, progress))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(result.to_json())
    print_result(result, console)
    if args.json:
        console.print(f"[dim]samples written to {args.json}[/]")
    return 0 if result.ok else 1


def print_result(result: SimResult, console: Console) -> None:
    """Latency percentiles, counts, violations, drops and notes as rich tables."""
    s = result.summary()
    latency = Table(title=f"callray sim: {s['counts']['calls']} calls, {s['duration_s']} s, "
                          f"{s['turns_per_s']} turns/s", title_justify="left")
    for col in ("metric (ms)", "n", "p50", "p90", "p99", "max"):
        latency.add_column(col, justify="left" if col.startswith("metric") else "right")
    for metric in METRICS:
        st = s["latency_ms"][metric]
        latency.add_row(metric, str(st["n"]), *("-" if st[k] is None else f"{st[k]:.1f}"
                                                for k in ("p50", "p90", "p99", "max")))
    console.print(latency)
    console.print("  ".join(f"{k}={v}" for k, v in s["counts"].items()), style="dim", highlight=False)
    issues = Table(title="protocol", title_justify="left")
    for col in ("kind", "count", "meaning", "example"):
        issues.add_column(col)
    for kind, n in s["violations"].items():
        issues.add_row(f"[red]{kind}[/]", str(n), VIOLATION_KINDS.get(kind, ""), (s["examples"].get(kind) or [""])[0])
    for kind, n in s["warnings"].items():
        issues.add_row(f"[yellow]{kind}[/]", str(n), WARNING_KINDS.get(kind, ""), (s["examples"].get(kind) or [""])[0])
    for reason, n in s["dropped"].items():
        issues.add_row(f"[red]dropped: {reason}[/]", str(n), "call ended by the socket, not by the caller", "")
    if issues.row_count:
        console.print(issues)
    lag = s["loop_lag_ms"]
    console.print(f"simulator loop lag p50 {lag['p50']} ms, p99 {lag['p99']} ms", style="dim")
    for note in s["notes"]:
        console.print(f"[yellow]note: {note}[/]")
    console.print("[bold green]OK: no violations, no dropped calls[/]" if s["ok"]
                  else "[bold red]FAILED: protocol violations or dropped calls[/]")


# ---------------------------------------------------------------------------------- fake-llm


def _add_fake_llm(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("fake-llm", add_help=False, help="run the OpenAI-compatible fake LLM (see callray fake-llm --help)")


def _cmd_fake_llm(argv: list[str]) -> int:
    from callray.sim.fake_llm import main as fake_llm_main  # lazy: its own dependencies

    return fake_llm_main(argv) or 0


# ---------------------------------------------------------------------------------- entry

def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a Serve config file and its agents",
                       description="Validate callray's settings in a Serve config file (env references "
                                   "expanded) and load every agent it names; errors name the file and field.")
    p.add_argument("config", help="e.g. config/serve.yaml")
    p.set_defaults(handler=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from callray.agents.registry import AgentRegistry
    from callray.settings import SettingsError, load_serve_config

    console = Console()
    try:
        doc, settings = load_serve_config(args.config)
        agents = AgentRegistry.from_settings(settings.agents)
    except (SettingsError, ValueError) as exc:
        console.print(f"[red]invalid[/red] {exc}", highlight=False)
        return 1
    for warning in (public_without_secret(doc, settings), unfindable_callers(settings)):
        if warning:
            console.print(f"[bold yellow]WARNING[/] {args.config}: {warning}", highlight=False)
    console.print(f"[green]ok[/green] {args.config}: architecture {settings.architecture}, agents "
                  f"{', '.join(sorted(agents.agents))} (default {agents.default_name}), "
                  f"state {settings.state.backend}, events {settings.events.backend}", highlight=False)
    return 0


def public_without_secret(doc: dict[str, Any], settings: Any) -> str | None:
    """Why a config serves sockets beyond this machine with no secret guarding them, or None."""
    import ipaddress

    host = str((doc.get("http_options") or {}).get("host", "127.0.0.1"))
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    guard = settings.gateway.guard
    if local or guard.secret is not None or guard.allow_ips:
        return None
    return (f"http_options.host {host} serves the socket route beyond this machine with no "
            "gateway.guard.secret and no allow_ips: anyone who reaches it can talk to the agent")


def unfindable_callers(settings: Any) -> str | None:
    """Why erasure by phone number will not find a caller's records in this config's archive, or None."""
    if settings.archive.backend == "postgres" and settings.privacy.redact and settings.privacy.caller_key is None:
        return ("privacy.redact is on without privacy.caller_key (set CALLRAY_PRIVACY_KEY): the archive's "
                "records hold no caller number, so erasure by phone number cannot find them")
    return None


def _add_test(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("test", help="run scenario suites against an agent (docs/testing.md)",
                       description="Play each scenario of the suite files (or folders of them) as Retell would and "
                                   "check what the agent says and does. Without --url, callray for --config is "
                                   "started in this process and stopped after. Exit 1 if a scenario failed.")
    p.add_argument("paths", nargs="+", type=Path, help="suite files or folders of them")
    p.add_argument("--url", help="a running server's LLM WebSocket base, e.g. ws://HOST:8000/llm-websocket")
    p.add_argument("--config", type=Path, default=Path("config/serve.yaml"),
                   help="without --url: the Serve config to start (default: config/serve.yaml)")
    p.add_argument("--repeat", type=int, default=1, help="play every scenario N times and report pass rates")
    p.add_argument("--concurrency", type=int, default=8, help="scenarios played at once (default 8)")
    p.add_argument("--junit", type=Path, metavar="FILE", help="write JUnit XML for CI systems")
    p.add_argument("--webhook-url", help="with --url: where webhook steps POST (e.g. http://HOST:8000/webhook)")
    p.add_argument("--webhook-key", help="with --url: the key that signs webhook steps (default: RETELL_API_KEY)")
    p.set_defaults(handler=_cmd_test)


def _cmd_test(args: argparse.Namespace) -> int:
    from callray.scenarios.command import run_tests

    if args.repeat < 1 or args.concurrency < 1:
        Console().print("[red]--repeat and --concurrency must be at least 1[/]")
        return 2
    return run_tests(args.paths, url=args.url, config=args.config, repeat=args.repeat, concurrency=args.concurrency,
                     junit=args.junit, webhook_url=args.webhook_url, webhook_key=args.webhook_key)


# ---------------------------------------------------------------------------------- export, erase


def _http_client(url: str, token_env: str) -> Any:
    """An HTTP client for a running callray at ``url`` with the bearer token from ``token_env``."""
    import os

    import httpx

    token = os.environ.get(token_env)
    if not token:
        raise ValueError(f"set {token_env} to the token the server was started with")
    return httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=60.0)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="stream archived call records as JSON lines or CSV",
                       description="Page through a running callray's archive (GET /calls, with CALLRAY_READ_TOKEN) "
                                   "and write each record as a JSON line, or each turn as a CSV row.")
    p.add_argument("url", help="callray's HTTP base, e.g. http://127.0.0.1:8000")
    p.add_argument("--since", help="calls that ended since: 7d, 12h, 30m, an ISO date or time, or unix seconds "
                                   "(default: all)")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "csv"), help="jsonl: a record per line; csv: a "
                                                                                "turn per row (default jsonl)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write here instead of standard output")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from callray.export import parse_since, write_export

    console = Console(stderr=True)
    try:
        since = parse_since(args.since) if args.since else None
        client = _http_client(args.url, "CALLRAY_READ_TOKEN")
    except ValueError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        return 2
    out = args.out.open("w", encoding="utf-8", newline="") if args.out else sys.stdout
    try:
        with client, Progress(TextColumn("records"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("records", total=None)
            count = write_export(client, out, since=since, fmt=args.format,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (RuntimeError, OSError) as exc:
        console.print(f"[red]export failed: {exc}[/]", highlight=False)
        return 1
    finally:
        if args.out:
            out.close()
    console.print(f"[dim]{count} records exported{f' to {args.out}' if args.out else ''}[/]", highlight=False)
    return 0


def _add_erase(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("erase", help="erase one call's data, or every call of one caller",
                       description="Ask a running callray (with CALLRAY_ADMIN_TOKEN) to erase a call's record, "
                                   "state, cache entries and events (DELETE /calls/ID), or those of every "
                                   "archived call from one phone number (DELETE /callers/NUMBER).")
    p.add_argument("url", help="callray's HTTP base, e.g. http://127.0.0.1:8000")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--call", metavar="ID", help="the call id")
    target.add_argument("--phone", metavar="NUMBER", help="the caller's number, in any format (+1 555 123 4567)")
    p.add_argument("--force", action="store_true", help="with --call: erase even if the call has not ended")
    p.set_defaults(handler=_cmd_erase)


def _cmd_erase(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from callray.export import detail

    console = Console()
    try:
        client = _http_client(args.url, "CALLRAY_ADMIN_TOKEN")
    except ValueError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        return 2
    with client:
        if args.call:
            reply = client.delete(f"/calls/{quote(args.call, safe='')}", params={"force": args.force})
        else:
            reply = client.delete(f"/callers/{quote(args.phone, safe='')}")
    if reply.status_code != 200:
        console.print(f"[red]erase failed ({reply.status_code}): {detail(reply)}[/]", highlight=False)
        return 1
    body = reply.json()
    for call in body.get("calls", [body]):
        console.print(f"erased call {call['call_id']}: record {call['record']}, state {call['state']}, "
                      f"{call['cache_entries']} cache entries, {call['events']} events", highlight=False)
    if args.phone:
        console.print(f"{len(body['calls'])} calls of that caller erased", highlight=False)
    if body.get("note"):
        console.print(f"[yellow]note: {body['note']}[/]", highlight=False)
    return 0


#: Subcommand registrars, in help order (each adds a parser with set_defaults(handler=...)).
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_call, _add_sim, _add_fake_llm, _add_check,
                                                                _add_test, _add_export, _add_erase]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "fake-llm":  # its options belong to fake_llm.main, not to this parser
            return _cmd_fake_llm(argv[1:])
        if argv and argv[0] in HARNESS:
            return _run_harness(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------------- the harness

#: Commands of the measurement harness (``harness/``): their options live in the harness module,
#: which is imported only when one of them runs, so ``callray call`` loads none of it.
HARNESS: dict[str, tuple[str, str, str]] = {
    "bench": ("harness.suite", "run the benchmark suite and write docs/benchmarks.md",
              "Deploy the Serve floor, the peers (hand-written baseline, Retell's demo) and callray in each "
              "architecture on a private local Ray, Redis and fake LLM; drive each with the simulator in repeated "
              "rounds; write raw JSON, the markdown report and plots. Every process it starts is stopped on exit."),
    "chaos": ("harness.chaos", "kill gateway replicas, consumers and Redis under live calls",
              "Drive simulated Retell calls against the distributed or event-driven architecture (private Ray, "
              "Serve and Redis) while killing gateway replicas, event consumers and Redis; report lost turns, "
              "dropped calls, lost or duplicated events and recovery times. Exit 1 unless nothing was lost."),
    "ingress": ("harness.ingress", "Serve's Python proxy against HAProxy, with the floor and the one-process server",
                "Start a private Ray behind each ingress in turn (rounds alternate the order), deploy the floor and "
                "callray's configs, run the one-process server beside them and play every level of Retell-shaped "
                "calls against each; write docs/ingress.md, a plot and the raw JSON."),
    "versions": ("harness.versions", "two versions of callray side by side in one Ray session (a change's cost)",
                 "Deploy a git revision (--before) and another (--after, default HEAD) of callray side by side in "
                 "each round's private Ray, with the one-process server beside them; play Retell-shaped calls with the "
                 "flow and LLM agents against each; print after / before within each round and write the raw JSON."),
    "soak": ("harness.soak", "many calls for a long time: memory growth, latency drift, errors",
             "Hold N simulated calls for a duration on a private Ray, Serve and Redis, sampling memory, "
             "throughput, first-sentence latency and errors; write JSON and a PNG plot."),
}


def _add_harness(sub: argparse._SubParsersAction) -> None:
    for name, (_, help_text, description) in HARNESS.items():
        sub.add_parser(name, help=help_text, description=description, add_help=False)


def _run_harness(name: str, argv: list[str]) -> int:
    import importlib

    module_name, _, description = HARNESS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"callray {name}", description=description)
    module.add_arguments(parser)
    return module.run_command(parser.parse_args(argv))


COMMANDS.append(_add_harness)


if __name__ == "__main__":
    sys.exit(main())
