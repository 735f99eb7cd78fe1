"""The abuse run: hostile and broken clients against a live gateway, then a health check.

Against a running server (``--url``) or one it starts itself on a private local Ray (default:
``config/serve.yaml``'s single architecture), it sends, concurrently:

* **garbage**: random bytes, binary frames, invalid JSON, wrong types, unknown types, frames
  just over and far over ``max_frame_bytes``, deeply nested objects;
* **floods**: sockets sending ``ping_pong`` as fast as they can (expected: closed with 1008);
* **non-readers**: sockets with a tiny receive window that send and never read (closed with
  1013 once their frames pile up, or held idle);
* **bad ids**: call ids too long or outside ``[A-Za-z0-9_-]`` (refused with 4400);
* **big webhooks**: bodies far over ``webhook.max_body_bytes``, declared and chunked (413).

Then it measures how long a fresh call takes to be greeted and, when it started the server,
the resident memory of the server's processes before, during and after (back near the start?).

    python -m harness.abuse                      # start a private server, abuse it, report
    python -m harness.abuse --url ws://HOST:8000/llm-websocket --http http://HOST:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import websockets
from rich.console import Console

from callray.settings import GatewaySettings
from callray.sim.client import call_url

#: The server's limit the garbage frames go just over and far over (callray's default).
MAX_FRAME_BYTES = GatewaySettings.model_fields["max_frame_bytes"].default


def _garbage(rng: random.Random, max_frame_bytes: int) -> list[str | bytes]:
    deep = '{"interaction_type":"call_details","call":' + "[" * 5000 + "]" * 5000 + "}"
    return [
        bytes(rng.getrandbits(8) for _ in range(64)), b"\x00\xff" * 100, "{not json", "[]", "null", '"a string"',
        json.dumps({"interaction_type": "response_required", "response_id": "one"}),
        json.dumps({"interaction_type": "response_required", "response_id": -5, "transcript": "nope"}),
        json.dumps({"interaction_type": "update_only", "transcript": [{"role": 5}] * 50}),
        json.dumps({"interaction_type": "from_the_future", "x": [1, {"y": None}]}),
        json.dumps({"interaction_type": "ping_pong", "timestamp": "soon"}),
        deep, "x" * (max_frame_bytes + 1), "y" * (4 * max_frame_bytes),
        "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(500)),
    ]


async def _connect(url: str, **kwargs: Any) -> Any:
    return await websockets.connect(url, open_timeout=10, ping_interval=None, max_size=None, **kwargs)


async def _outcome(ws: Any, timeout: float = 10.0) -> int | None:
    """Read until the server closes (its close code), or None if it kept the socket open."""
    try:
        async with asyncio.timeout(timeout):
            async for _ in ws:
                pass
    except TimeoutError:
        await ws.close()
        return None
    except websockets.ConnectionClosed:
        pass
    return ws.close_code


async def garbage(url: str, n: int, max_frame_bytes: int, seed: int) -> Counter[str]:
    """Sockets sending every kind of bad frame, each followed by a real request."""
    out: Counter[str] = Counter()

    async def one(i: int) -> None:
        rng = random.Random(seed + i)
        ws = await _connect(call_url(url, f"abuse-garbage-{seed}-{i}"))
        try:
            for frame in _garbage(rng, max_frame_bytes):
                await ws.send(frame)
            await ws.send(json.dumps({"interaction_type": "response_required", "response_id": 1,
                                      "transcript": [{"role": "user", "content": "What are your hours?"}]}))
        except websockets.ConnectionClosed:
            pass
        out[f"garbage closed {await _outcome(ws, 5)}"] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def floods(url: str, n: int, seed: int) -> Counter[str]:
    out: Counter[str] = Counter()

    async def one(i: int) -> None:
        ws = await _connect(call_url(url, f"abuse-flood-{seed}-{i}"))
        try:
            for t in range(5000):
                await ws.send(json.dumps({"interaction_type": "ping_pong", "timestamp": t}))
        except websockets.ConnectionClosed:
            pass
        out[f"flood closed {await _outcome(ws)}"] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def non_readers(url: str, n: int, seed: int, hold_s: float) -> Counter[str]:
    """Sockets with a tiny receive window that keep sending (within the rate limit) and never read."""
    out: Counter[str] = Counter()
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)

    async def one(i: int) -> None:
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        ws = await _connect(call_url(url, f"abuse-slow-{seed}-{i}"), sock=sock, max_queue=1)
        deadline = time.monotonic() + hold_s
        try:
            t = 0
            while time.monotonic() < deadline:
                await ws.send(json.dumps({"interaction_type": "ping_pong", "timestamp": t}))
                t += 1
                await asyncio.sleep(0.05)
        except websockets.ConnectionClosed:
            pass
        out[f"non-reader closed {await _outcome(ws, 10)}"] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


async def bad_ids(url: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for call_id in ("x" * 129, "x" * 5000, "with%20space", "dots.in.it", "%00nul"):
        try:
            ws = await _connect(call_url(url, call_id))
            out[f"bad id closed {await _outcome(ws, 5)}"] += 1
        except websockets.InvalidStatus as exc:  # the HTTP layer refused the handshake itself
            out[f"bad id refused HTTP {exc.response.status_code}"] += 1
        except (OSError, websockets.WebSocketException) as exc:
            out[f"bad id refused {type(exc).__name__}"] += 1
    return out


def big_webhooks(http: str, n: int) -> Counter[str]:
    out: Counter[str] = Counter()
    body = b'{"event":"call_started","call":{"call_id":"abuse","pad":"' + b"x" * (8 << 20) + b'"}}'
    for i in range(n):
        chunked = i % 2 == 1
        data = iter([body[j:j + 65536] for j in range(0, len(body), 65536)]) if chunked else body
        headers = {"content-type": "application/json", "x-retell-signature": "v=1,d=" + "0" * 64}
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        request = urllib.request.Request(f"{http}/webhook", data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                out[f"webhook {'chunked' if chunked else 'declared'} {r.status}"] += 1
        except urllib.error.HTTPError as exc:
            out[f"webhook {'chunked' if chunked else 'declared'} {exc.code}"] += 1
        except OSError as exc:  # the server may hang up on the rest of a body it refused
            out[f"webhook {'chunked' if chunked else 'declared'} connection {type(exc).__name__}"] += 1
    return out


async def greeted_in_ms(url: str) -> float:
    """A new, well-behaved call: milliseconds from opening the socket to its greeting."""
    start = time.perf_counter()
    ws = await _connect(call_url(url, f"fresh-after-abuse-{random.getrandbits(32):08x}"))
    try:
        async with asyncio.timeout(10):
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("response_id") == 0 and frame.get("content_complete"):
                    if not frame.get("content"):
                        raise AssertionError("the fresh call was not greeted")
                    return round((time.perf_counter() - start) * 1000, 1)
    finally:
        await ws.close()
    raise AssertionError("no greeting")


async def abuse(url: str, http: str, *, sockets: int = 20, hold_s: float = 10.0, max_frame_bytes: int = MAX_FRAME_BYTES,
                seed: int = 1, rss: Callable[[], float] | None = None) -> dict[str, Any]:
    """Every kind of abuse at once, then the server's health. Returns the report."""
    report: dict[str, Any] = {"sockets_per_kind": sockets}
    report["rss_before_mb"] = round(rss(), 1) if rss else None
    report["greeted_before_ms"] = await greeted_in_ms(url)
    started = time.monotonic()
    results = await asyncio.gather(
        garbage(url, sockets, max_frame_bytes, seed), floods(url, max(1, sockets // 4), seed),
        non_readers(url, sockets, seed, hold_s), bad_ids(url),
        asyncio.to_thread(big_webhooks, http, 4))
    report["during_rss_mb"] = round(rss(), 1) if rss else None
    report["outcomes"] = dict(sum(results, Counter()))
    report["abuse_s"] = round(time.monotonic() - started, 1)
    await asyncio.sleep(3)  # let the server drop what the abusive sockets held
    report["greeted_after_ms"] = await greeted_in_ms(url)
    report["rss_after_mb"] = round(rss(), 1) if rss else None
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="WebSocket base of a running server (default: start a private one)")
    parser.add_argument("--http", help="its HTTP base, for the webhook abuse")
    parser.add_argument("--sockets", type=int, default=20, help="abusive sockets per kind (default: 20)")
    parser.add_argument("--hold-s", type=float, default=10.0, help="how long non-readers hold on (default: 10)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="abuse the private server this many times: memory that is reused stays at the first "
                             "round's high-water mark, a leak keeps growing (default: 1)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    console = Console()
    if args.url:
        report = asyncio.run(abuse(args.url, args.http or args.url.replace("ws", "http", 1).rsplit("/", 1)[0],
                                   sockets=args.sockets, hold_s=args.hold_s))
    else:
        report = _against_a_private_server(args, console)
    console.print_json(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _against_a_private_server(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from callray.settings import PROJECT_DIR
    from harness.suite import run_until_interrupted
    from harness.targets import deploy_serve_target, ray_session, rss_mb

    def run() -> dict[str, Any]:
        os.chdir(PROJECT_DIR)
        with ray_session(console) as port:
            deployed = deploy_serve_target("single", port, namespace=f"abuse-{os.getpid()}")
            try:
                def rss() -> float:
                    return rss_mb([pid for _, pid in deployed.processes()])

                rounds = [asyncio.run(abuse(deployed.url, deployed.http_base, sockets=args.sockets,
                                            hold_s=args.hold_s, rss=rss)) for _ in range(args.rounds)]
                report = {**rounds[0], "rss_after_each_round_mb": [r["rss_after_mb"] for r in rounds],
                          "greeted_after_each_round_ms": [r["greeted_after_ms"] for r in rounds]}
                report["server"] = "callray single (config/single.yaml, local placement) on a private Ray"
                return report
            finally:
                deployed.teardown()

    return run_until_interrupted(run, console) or {}


if __name__ == "__main__":
    sys.exit(main())
