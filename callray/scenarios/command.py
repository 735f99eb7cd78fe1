"""``callray test PATH...``: load every suite first (a bad file fails before any call), start
callray for a config in this process unless ``--url`` names a running server, play the
scenarios, print and write what happened; the exit code is 1 if any scenario failed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Iterator

from rich.console import Console

from callray.scenarios.report import print_result, print_summary, write_junit
from callray.scenarios.runner import Target, run_suites
from callray.scenarios.server import LocalServer
from callray.scenarios.suite import Suite, SuiteError, load_suite
from callray.settings import ArchiveSettings, CallraySettings, SettingsError, load_serve_config


def _suite_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))
        else:
            files.append(path)
    return files


def local_settings(config: Path, archive_dir: str) -> CallraySettings:
    """The config's settings as a local test run serves them: no socket secret (the runner
    connects from loopback), a webhook key of the run's own, the archive in ``archive_dir``."""
    _, settings = load_serve_config(config)
    update = {
        "gateway": settings.gateway.model_copy(update={"guard": type(settings.gateway.guard)()}),
        "webhook": settings.webhook.model_copy(update={"api_key": settings.webhook.api_key or secrets.token_hex(16)}),
        "archive": ArchiveSettings(backend="files", dir=archive_dir),
    }
    return settings.model_copy(update=update)


@contextlib.contextmanager
def _target(url: str | None, config: Path, webhook_url: str | None, webhook_key: str | None,
            console: Console) -> Iterator[tuple[Target, CallraySettings | None]]:
    if url is not None:
        yield Target(url, webhook_url, webhook_key or os.environ.get("RETELL_API_KEY") or None), None
        return
    with tempfile.TemporaryDirectory(prefix="callray-test-") as scratch:
        settings = local_settings(config, scratch)
        started = time.monotonic()
        with LocalServer(settings) as server:
            console.print(f"[dim]callray for {config} on {server.ws} (started in {time.monotonic() - started:.1f} s)[/]")
            yield Target(server.ws, f"{server.http}/webhook", settings.webhook.api_key), settings


def run_tests(paths: list[Path], *, url: str | None = None, config: Path = Path("config/serve.yaml"),
              repeat: int = 1, concurrency: int = 8, junit: Path | None = None, webhook_url: str | None = None,
              webhook_key: str | None = None, console: Console | None = None) -> int:
    """Run the suites; 0 when every scenario passed, 1 when one failed, 2 when nothing could run."""
    console = console or Console(soft_wrap=True)
    try:
        files = _suite_files(paths)
        if not files:
            raise SuiteError(f"no suite files in {', '.join(map(str, paths))}")
        suites: list[tuple[str, Suite]] = [(str(f), load_suite(f)) for f in files]
    except SuiteError as exc:
        console.print(f"[red]invalid suite[/]\n{exc}", highlight=False)
        return 2
    try:
        with _target(url, config, webhook_url, webhook_key, console) as (target, settings):
            if settings is not None:
                phrases = list(settings.turns.holding_phrases)
                suites = [(name, suite if "holding_phrases" in suite.model_fields_set
                           else suite.model_copy(update={"holding_phrases": phrases})) for name, suite in suites]
            started = time.monotonic()
            results = asyncio.run(run_suites(target, suites, repeat=repeat, concurrency=concurrency,
                                             on_result=lambda r: print_result(r, console, repeat)))
    except (SettingsError, ValueError, RuntimeError) as exc:
        console.print(f"[red]cannot start callray for {config}[/]: {exc}", highlight=False)
        return 2
    print_summary(results, console, time.monotonic() - started, repeat)
    if junit is not None:
        write_junit(results, junit)
        console.print(f"[dim]JUnit XML: {junit}[/]")
    return 0 if all(r.passed for r in results) else 1
