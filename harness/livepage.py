"""What the live calls page costs and how fresh it is, at 100 live calls.

On a private local Ray it deploys the single architecture with a read token, runs the same
Retell-shaped load twice (without the page, then with the page open in headless Debian
chromium), and reports the gateway replica's CPU time for each run and the page's update
delay: from a turn's event on the server to the page rendering it (both on this machine's
clock), as the page records it.

    python -m harness.livepage [--calls 100] [--turns 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from callray.settings import PROJECT_DIR
from callray.sim.report import describe
from callray.sim.simulator import SimConfig, run_simulation


def _cpu_s(pids: list[int]) -> float:
    from harness.targets import psutil

    ps = psutil()
    total = 0.0
    for pid in pids:
        try:
            times = ps.Process(pid).cpu_times()
            total += times.user + times.system
        except ps.Error:
            continue
    return total


async def _run(url: str, calls: int, turns: int, tag: str, replicas: list[int]) -> dict[str, Any]:
    before = _cpu_s(replicas)
    result = await run_simulation(SimConfig(url=url, calls=calls, turns=turns, think_s=2.0, ramp_s=5.0,
                                            supersede_rate=0.1, reminder_rate=0.05, seed=3, call_id_prefix=tag))
    return {"cpu_s": round(_cpu_s(replicas) - before, 2), "turns": result.counts.get("turns_answered", 0),
            "duration_s": round(result.duration_s, 1), "ok": result.ok}


async def measure(http: str, url: str, token: str, calls: int, turns: int, replicas: list[int]) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    report = {"calls": calls, "turns": turns, "without_page": await _run(url, calls, turns, "closed", replicas)}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(f"{http}/ui?token={token}")
            await page.wait_for_selector("#page:not([hidden])")
            report["with_page"] = await _run(url, calls, turns, "open", replicas)
            delays = await page.evaluate("window.__callray_delays")
            await page.click("tr[data-call]")  # a call's transcript beside the list, for the docs
            await page.wait_for_timeout(500)
            report["screenshot"] = str(PROJECT_DIR / "docs" / "img" / "live-calls.png")
            await page.screenshot(path=report["screenshot"])
        finally:
            await browser.close()
    report["update_delay_ms"] = describe(delays)
    without, with_page = report["without_page"]["cpu_s"], report["with_page"]["cpu_s"]
    report["cpu_added_share"] = round((with_page - without) / without, 3) if without else None
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.livepage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    console = Console()
    from harness.suite import run_until_interrupted
    from harness.targets import READ_TOKEN, deploy_serve_target, ray_session

    def run() -> dict[str, Any]:
        os.chdir(PROJECT_DIR)
        with ray_session(console) as port:
            deployed = deploy_serve_target("single", port, namespace=f"livepage-{os.getpid()}")
            try:
                replicas = [pid for kind, pid in deployed.processes() if kind.startswith("ServeReplica")]
                return asyncio.run(measure(deployed.http_base, deployed.url, READ_TOKEN, args.calls, args.turns, replicas))
            finally:
                deployed.teardown()

    report = run_until_interrupted(run, console)
    if report is None:
        return 130
    console.print_json(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
