"""One call placed by a person or a script, showing both sides as the conversation goes.

Plays Retell's part for a single call (config, call_details, ping_pong, the begin message,
one ``response_required`` per caller line) and reports what happens as ``CallEvent``s, so
the CLI can render them; frames are judged with the simulator's ``validate_frame``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from callray.sim.simulator import call_url, validate_frame

EventKind = Literal["info", "caller", "agent_start", "agent_chunk", "agent_end", "action", "issue"]


@dataclass
class CallEvent:
    """Something to show: a caller line, a streamed agent chunk, an action, a protocol issue."""

    kind: EventKind
    text: str = ""
    response_id: int | None = None
    first_sentence_ms: float | None = None
    complete_ms: float | None = None


@dataclass
class CallOutcome:
    """How the call went."""

    call_id: str
    turns: int = 0
    issues: list[str] = field(default_factory=list)
    ended: str = "caller_hangup"  # caller_hangup | end_call | connect_failed | server_close_<code> | connection_lost | timeout

    @property
    def ok(self) -> bool:
        return not self.issues and self.ended in ("caller_hangup", "end_call")


#: Returns the caller's next line, or None to hang up.
LineSource = Callable[[], Awaitable[str | None]]


async def place_call(url: str, next_line: LineSource, on_event: Callable[[CallEvent], None],
                     call_id: str | None = None, turn_timeout_s: float = 30.0,
                     ping_interval_s: float = 2.0) -> CallOutcome:
    """Open ``{url}/{call_id}`` and talk until ``next_line`` returns None or the agent hangs up."""
    outcome = CallOutcome(call_id=call_id or f"cli-{secrets.token_hex(4)}")
    loop = asyncio.get_running_loop()
    try:
        ws = await connect(call_url(url, outcome.call_id), open_timeout=7, ping_interval=None,
                           max_size=None, proxy=None)
    except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
        outcome.ended = "connect_failed"
        on_event(CallEvent("issue", f"cannot connect to {call_url(url, outcome.call_id)}: {exc}"))
        return outcome
    on_event(CallEvent("info", f"connected, call_id {outcome.call_id}"))

    transcript: list[dict[str, Any]] = []
    current = {"rid": 0, "sent": loop.time(), "parts": [], "first_sentence": None}
    done = asyncio.Event()
    pending_pings: dict[int, float] = {}
    hung_up = False
    tasks: list[asyncio.Task] = []

    def issue(text: str) -> None:
        outcome.issues.append(text)
        on_event(CallEvent("issue", text))

    async def pinger() -> None:
        last = 0
        while True:
            await asyncio.sleep(ping_interval_s)
            for ts, sent in list(pending_pings.items()):
                if loop.time() - sent > 5:
                    del pending_pings[ts]
                    issue(f"ping_unanswered: timestamp {ts}")
            last = max(int(time.time() * 1000), last + 1)
            pending_pings[last] = loop.time()
            try:
                await ws.send(json.dumps({"interaction_type": "ping_pong", "timestamp": last}))
            except ConnectionClosed:
                return

    def on_response(data: dict[str, Any]) -> None:
        nonlocal hung_up
        rid = data["response_id"]
        if rid != current["rid"] or done.is_set():
            if data["content"] or data["content_complete"]:
                issue(f"frame for response_id {rid} while {current['rid']} is "
                      f"{'complete' if done.is_set() else 'open'}: {data['content'][:40]!r}")
            return
        now = loop.time()
        if data["content"]:
            if not current["parts"]:
                on_event(CallEvent("agent_start", response_id=rid))
            current["parts"].append(data["content"])
            on_event(CallEvent("agent_chunk", data["content"], rid))
            if current["first_sentence"] is None and any(c in data["content"] for c in ".!?"):
                current["first_sentence"] = now
        if data["content_complete"]:
            first = current["first_sentence"] or now
            on_event(CallEvent("agent_end", "".join(current["parts"]), rid,
                               first_sentence_ms=round((first - current["sent"]) * 1000, 1),
                               complete_ms=round((now - current["sent"]) * 1000, 1)))
            for action in ("end_call", "transfer_number", "digit_to_press"):
                if data.get(action) not in (None, False):
                    on_event(CallEvent("action", f"{action}: {data[action]}", rid))
            hung_up = data.get("end_call") is True
            done.set()

    async def reader() -> None:
        async for raw in ws:
            data, issues = validate_frame(raw)
            for kind, detail in issues:
                issue(f"{kind}: {detail}")
            if data is None:
                continue
            rtype = data["response_type"]
            if rtype == "config":
                body = data["config"]
                on_event(CallEvent("info", f"config {json.dumps(body)}"))
                if body.get("call_details") is True:
                    await ws.send(json.dumps({"interaction_type": "call_details", "call": {
                        "call_id": outcome.call_id, "call_type": "web_call", "call_status": "ongoing",
                        "agent_id": "agent_cli", "start_timestamp": int(time.time() * 1000), "metadata": {}}}))
                if body.get("auto_reconnect") is True and ping_interval_s > 0 and len(tasks) == 1:
                    tasks.append(asyncio.create_task(pinger()))
            elif rtype == "ping_pong":
                pending_pings.pop(data["timestamp"], None)
            elif rtype == "response":
                on_response(data)
            elif rtype == "agent_interrupt":
                on_event(CallEvent("action", f"agent_interrupt: {data['content']!r}"))
            elif rtype in ("tool_call_invocation", "tool_call_result", "update_agent", "metadata"):
                shown = {k: v for k, v in data.items() if k != "response_type"}
                on_event(CallEvent("action", f"{rtype} {json.dumps(shown)[:200]}"))

    tasks.append(asyncio.create_task(reader()))

    async def wait_done() -> bool:
        waiter = asyncio.ensure_future(done.wait())
        await asyncio.wait([waiter, tasks[0]], timeout=turn_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        return done.is_set()

    try:
        answered = await wait_done()
        if answered and current["parts"]:
            transcript.append({"role": "agent", "content": "".join(current["parts"])})
        elif answered:
            on_event(CallEvent("info", "(the agent waits for the caller to speak first)"))
        while answered and not hung_up and not tasks[0].done():
            line = await next_line()
            if line is None:
                break
            if not line.strip():
                continue
            transcript.append({"role": "user", "content": line})
            on_event(CallEvent("caller", line))
            current.update(rid=current["rid"] + 1, sent=loop.time(), parts=[], first_sentence=None)
            done.clear()
            await ws.send(json.dumps({"interaction_type": "response_required", "response_id": current["rid"],
                                      "transcript": transcript}))
            answered = await wait_done()
            if answered:
                outcome.turns += 1
                if current["parts"]:
                    transcript.append({"role": "agent", "content": "".join(current["parts"])})
        if not answered and not tasks[0].done():
            issue(f"no_complete: response_id {current['rid']} within {turn_timeout_s} s")
            outcome.ended = "timeout"
        elif tasks[0].done():
            code = ws.close_code
            if not (hung_up and code == 1000):
                outcome.ended = "connection_lost" if code in (None, 1006) else f"server_close_{code}"
                on_event(CallEvent("issue", f"the server closed the call ({code})"))
        elif hung_up:
            outcome.ended = "end_call"
    except ConnectionClosed:
        outcome.ended = "connection_lost"
    finally:
        for task in tasks[1:]:
            task.cancel()
        await ws.close(1000)
        try:
            await tasks[0]
        except ConnectionClosed:
            pass
    if hung_up and outcome.ended == "caller_hangup":
        outcome.ended = "end_call"
    on_event(CallEvent("info", f"call ended: {outcome.ended}"))
    return outcome
