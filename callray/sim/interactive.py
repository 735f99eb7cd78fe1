"""One call placed by a person or a script, showing both sides as the conversation goes.

Plays Retell's part for a single call (config, call_details, ping_pong, the begin message,
one ``response_required`` per caller line) on a :class:`~callray.sim.client.RetellSocket`,
and reports what happens as ``CallEvent``s, so the CLI can render them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

from websockets.exceptions import WebSocketException

from callray.sim.client import RetellSocket, call_url

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
    transcript: list[dict[str, Any]] = []
    current = {"rid": 0, "sent": loop.time(), "parts": [], "first_sentence": None}
    done = asyncio.Event()
    hung_up = False

    def issue(kind: str, detail: str) -> None:
        outcome.issues.append(f"{kind}: {detail}")
        on_event(CallEvent("issue", f"{kind}: {detail}"))

    def on_response(data: dict[str, Any]) -> None:
        nonlocal hung_up
        rid = data["response_id"]
        if rid != current["rid"] or done.is_set():
            if data["content"] or data["content_complete"]:
                issue("stale_content", f"frame for response_id {rid} while {current['rid']} is "
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

    def on_frame(_: RetellSocket, data: dict[str, Any], __: float) -> None:
        rtype = data["response_type"]
        if rtype == "config":
            on_event(CallEvent("info", f"config {json.dumps(data['config'])}"))
        elif rtype == "response":
            on_response(data)
        elif rtype == "agent_interrupt":
            on_event(CallEvent("action", f"agent_interrupt: {data['content']!r}"))
        elif rtype in ("tool_call_invocation", "tool_call_result", "update_agent", "metadata"):
            shown = {k: v for k, v in data.items() if k != "response_type"}
            on_event(CallEvent("action", f"{rtype} {json.dumps(shown)[:200]}"))

    def call_object() -> dict[str, Any]:
        return {"call_id": outcome.call_id, "call_type": "web_call", "call_status": "ongoing",
                "agent_id": "agent_cli", "start_timestamp": int(time.time() * 1000), "metadata": {}}

    url = call_url(url, outcome.call_id)
    try:
        sock = await RetellSocket.open(url, on_frame=on_frame, on_issue=issue, call_object=call_object,
                                       ping_interval_s=ping_interval_s)
    except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
        outcome.ended = "connect_failed"
        on_event(CallEvent("issue", f"cannot connect to {url}: {exc}"))
        return outcome
    on_event(CallEvent("info", f"connected, call_id {outcome.call_id}"))

    async def wait_done() -> bool:
        waiter = asyncio.ensure_future(done.wait())
        await asyncio.wait([waiter, sock.reader], timeout=turn_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        return done.is_set()

    answered = await wait_done()
    if answered and current["parts"]:
        transcript.append({"role": "agent", "content": "".join(current["parts"])})
    elif answered:
        on_event(CallEvent("info", "(the agent waits for the caller to speak first)"))
    while answered and not hung_up and not sock.closed.is_set():
        line = await next_line()
        if line is None:
            break
        if not line.strip():
            continue
        transcript.append({"role": "user", "content": line})
        on_event(CallEvent("caller", line))
        current.update(rid=current["rid"] + 1, sent=loop.time(), parts=[], first_sentence=None)
        done.clear()
        await sock.send({"interaction_type": "response_required", "response_id": current["rid"],
                         "transcript": transcript})
        answered = await wait_done()
        if answered:
            outcome.turns += 1
            if current["parts"]:
                transcript.append({"role": "agent", "content": "".join(current["parts"])})
    if not answered and not sock.closed.is_set():
        issue("no_complete", f"response_id {current['rid']} within {turn_timeout_s} s")
        outcome.ended = "timeout"
    elif sock.closed.is_set():
        code = sock.close_code
        if not (hung_up and code == 1000):
            outcome.ended = "connection_lost" if code in (None, 1006) else f"server_close_{code}"
            on_event(CallEvent("issue", f"the server closed the call ({code})"))
    elif hung_up:
        outcome.ended = "end_call"
    await sock.close(1000)
    if hung_up and outcome.ended == "caller_hangup":
        outcome.ended = "end_call"
    on_event(CallEvent("info", f"call ended: {outcome.ended}"))
    return outcome
