"""A fake OpenAI-compatible chat-completions server for tests and benchmarks.

It speaks the real wire format (``POST /v1/chat/completions``, streamed as SSE
``data: {chat.completion.chunk}`` lines ending in ``data: [DONE]``, or one JSON object), so the
official ``openai`` client parses it. Latency (time to first token, tokens per second, jitter)
and failures (an error rate answering 429 or 500) are configurable; replies can be scripted
(fixed texts, tool calls with arguments split across many deltas, forced errors, a stream
that breaks). Without a script the reply echoes the key words of the last user message, so a
load test can check that no caller hears another caller's answer. Every request is recorded,
including whether the client went away mid-stream.

Run it: ``python -m callray.sim.fake_llm --port 8100 --ttft-ms 200 --tokens-per-s 50``.
In tests: ``with running_fake_llm(FakeLLMSettings(...)) as fake: ... fake.base_url``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# --------------------------------------------------------------------------- settings


class ScriptedToolCall(BaseModel):
    """A tool call the fake model makes."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Function name.")
    arguments: str | dict[str, Any] = Field(default="{}", description="Arguments (object or JSON text).")
    id: str | None = Field(default=None, description="Tool call id; generated when omitted.")

    @property
    def arguments_json(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


class ScriptedReply(BaseModel):
    """One scripted answer; unset fields fall back to the server settings."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="Reply text; default: the echo reply (unless tool calls).")
    tool_calls: list[ScriptedToolCall] = Field(default_factory=list, description="Tool calls, after the text.")
    status: int | None = Field(default=None, description="Answer with this HTTP error status instead.")
    ttft_ms: float | None = Field(default=None, ge=0, description="Override the time to first token.")
    tokens_per_s: float | None = Field(default=None, ge=0, description="Override the token rate.")
    arg_chunk_chars: int = Field(default=4, ge=1, description="Characters of tool arguments per delta.")
    break_after_tokens: int | None = Field(
        default=None, ge=0, description="Drop the connection after this many content tokens."
    )


class FakeLLMSettings(BaseModel):
    """Behaviour of the fake server."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float = Field(default=200.0, ge=0, description="Time to first token (ms).")
    tokens_per_s: float = Field(default=50.0, ge=0, description="Token rate after the first (0 = no delay).")
    jitter_ms: float = Field(default=0.0, ge=0, description="Uniform +/- jitter on every delay (ms).")
    error_rate: float = Field(default=0.0, ge=0, le=1, description="Fraction of requests answered with an error.")
    error_statuses: list[int] = Field(default=[429, 500], min_length=1, description="Error statuses to pick from.")
    seed: int | None = Field(default=None, description="Random seed (errors, jitter) for repeatable runs.")
    model: str = Field(default="fake-llm", description="Model name reported in responses.")
    filler_sentences: int = Field(default=1, ge=0, le=10, description="Extra sentences in the echo reply.")
    api_key: str | None = Field(default=None, description="If set, requests must carry this bearer key (else 401).")
    script: list[ScriptedReply] = Field(default_factory=list, description="Replies used in order, then the echo.")


Responder = Callable[[dict[str, Any]], "ScriptedReply | None"]


# --------------------------------------------------------------------------- state


@dataclass
class RequestRecord:
    """What one request asked and how it ended."""

    index: int
    body: dict[str, Any]
    headers: dict[str, str]
    stream: bool
    status: int = 200
    completed: bool = False  # the whole answer was sent
    disconnected: bool = False  # the client closed the stream before the end
    aborted: bool = False  # the server broke the stream on purpose (break_after_tokens)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])

    @property
    def last_user_text(self) -> str:
        return last_user_text(self.messages)


class FakeLLMState:
    """Recorded requests, the script queue and the random source of one fake server."""

    def __init__(self, settings: FakeLLMSettings, responder: Responder | None = None) -> None:
        self.settings = settings
        self.responder = responder
        self.records: list[RequestRecord] = []
        self.script: deque[ScriptedReply] = deque(settings.script)
        self.rng = random.Random(settings.seed)
        self._lock = threading.Lock()

    def enqueue(self, *replies: ScriptedReply) -> None:
        """Script the next replies (used in order before the echo reply)."""
        with self._lock:
            self.script.extend(replies)

    def record(self, body: dict[str, Any], headers: dict[str, str]) -> RequestRecord:
        with self._lock:
            rec = RequestRecord(index=len(self.records), body=body, headers=headers, stream=bool(body.get("stream")))
            self.records.append(rec)
            return rec

    def next_reply(self, body: dict[str, Any]) -> ScriptedReply:
        if self.responder is not None:
            reply = self.responder(body)
            if reply is not None:
                return reply
        with self._lock:
            return self.script.popleft() if self.script else ScriptedReply()

    def delay(self, ms: float) -> float:
        """Seconds to wait for a nominal ``ms``, with jitter."""
        jitter = self.settings.jitter_ms
        if jitter:
            ms += self.rng.uniform(-jitter, jitter)
        return max(0.0, ms) / 1000.0


# --------------------------------------------------------------------------- reply text

_STOPWORDS = frozenset(
    "a an the i im i'm me my we our you your it its is are was were be been am do does did to of "
    "and or but in on at for with about this that there here so can could would should will just "
    "please hi hello hey yes no okay ok um uh like want need".split()
)
_FILLERS = (
    "Let me take care of that for you.",
    "That should only take a moment.",
    "I have all the details I need.",
    "Thanks for your patience.",
)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def echo_reply(messages: list[dict[str, Any]], filler_sentences: int = 1) -> str:
    """A voice-like answer built from the key words of the last user message."""
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        return f"I checked that for you. The result is {str(last.get('content'))[:200]}. Anything else?"
    words = [w for w in re.findall(r"[A-Za-z0-9']+", last_user_text(messages)) if w.lower() not in _STOPWORDS]
    topic = " ".join(words[:8])
    if last.get("role") == "system":  # a reminder
        return "Are you still there? I'm happy to keep helping." if not topic else (
            f"Are you still there? I'm happy to keep helping with {topic}."
        )
    if not topic:
        return "I'm here. How can I help you today?"
    fillers = [_FILLERS[i % len(_FILLERS)] for i in range(filler_sentences)]
    return " ".join([f"You said {topic}.", "I can help with that.", *fillers, "Is there anything else?"])


def split_tokens(text: str) -> list[str]:
    """Word-sized tokens with their leading whitespace, like a BPE stream."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


# --------------------------------------------------------------------------- wire format


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    payload = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return f"data: {json.dumps(payload)}\n\n"


def _error(status: int, message: str) -> JSONResponse:
    kind = {401: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


class _BrokenStream(Exception):
    """Raised inside the body to drop the connection on purpose."""


def create_app(settings: FakeLLMSettings | None = None, *, responder: Responder | None = None) -> Starlette:
    """The ASGI app; its ``FakeLLMState`` is ``app.state.fake``.

    ``responder(body)`` may return a ``ScriptedReply`` for a request (None: use the script
    queue, then the echo reply).
    """
    state = FakeLLMState(settings or FakeLLMSettings(), responder)

    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        rec = state.record(body, {k.lower(): v for k, v in request.headers.items()})
        cfg = state.settings
        if cfg.api_key is not None and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            rec.status, rec.ended = 401, time.monotonic()
            return _error(401, "Incorrect API key provided (fake).")
        reply = state.next_reply(body)
        status = reply.status
        if status is None and cfg.error_rate and state.rng.random() < cfg.error_rate:
            status = state.rng.choice(cfg.error_statuses)
        if status is not None:
            rec.status, rec.ended = status, time.monotonic()
            return _error(status, f"Injected error {status} (fake).")

        tool_calls = [] if body.get("tool_choice") == "none" else reply.tool_calls
        text = reply.text
        if text is None and not tool_calls:
            text = echo_reply(list(body.get("messages") or []), cfg.filler_sentences)
        tokens = split_tokens(text or "")
        ttft_ms = cfg.ttft_ms if reply.ttft_ms is None else reply.ttft_ms
        rate = cfg.tokens_per_s if reply.tokens_per_s is None else reply.tokens_per_s
        gap_ms = 1000.0 / rate if rate > 0 else 0.0
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model = str(body.get("model") or cfg.model)
        calls = [(c.id or f"call_{uuid.uuid4().hex[:24]}", c.name, c.arguments_json) for c in tool_calls]
        finish = "tool_calls" if calls else "stop"

        if not body.get("stream"):
            await asyncio.sleep(state.delay(ttft_ms) + state.delay(gap_ms) * max(0, len(tokens) - 1))
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if calls:
                message["tool_calls"] = [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls
                ]
            rec.completed, rec.ended = True, time.monotonic()
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": _usage(body, tokens),
            })

        async def events() -> AsyncIterator[str]:
            try:
                await asyncio.sleep(state.delay(ttft_ms))
                yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
                for n, token in enumerate(tokens):
                    if reply.break_after_tokens is not None and n >= reply.break_after_tokens:
                        rec.aborted = True
                        raise _BrokenStream("fake stream broken on purpose")
                    if n:
                        await asyncio.sleep(state.delay(gap_ms))
                    yield _chunk(cid, created, model, {"content": token})
                for index, (call_id, name, arguments) in enumerate(calls):
                    head = {"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": ""}}
                    yield _chunk(cid, created, model, {"tool_calls": [head]})
                    step = reply.arg_chunk_chars
                    for start in range(0, len(arguments), step):
                        await asyncio.sleep(state.delay(gap_ms))
                        piece = {"index": index, "function": {"arguments": arguments[start:start + step]}}
                        yield _chunk(cid, created, model, {"tool_calls": [piece]})
                yield _chunk(cid, created, model, {}, finish)
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [], "usage": _usage(body, tokens)}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
                rec.completed = True
            finally:
                rec.ended = time.monotonic()
                if not rec.completed and not rec.aborted:
                    rec.disconnected = True

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": state.settings.model, "object": "model", "created": 0, "owned_by": "callray"}
        ]})

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ])
    app.state.fake = state
    return app


def _usage(body: dict[str, Any], tokens: list[str]) -> dict[str, int]:
    prompt = sum(len(str(m.get("content") or "")) // 4 for m in body.get("messages") or [])
    return {"prompt_tokens": prompt, "completion_tokens": len(tokens), "total_tokens": prompt + len(tokens)}


# --------------------------------------------------------------------------- running it


@dataclass
class FakeLLMServer:
    """A running fake server: its base URL (ending in /v1) and its state."""

    base_url: str
    state: FakeLLMState

    @property
    def records(self) -> list[RequestRecord]:
        return self.state.records

    def enqueue(self, *replies: ScriptedReply) -> None:
        self.state.enqueue(*replies)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True


@contextmanager
def running_fake_llm(
    settings: FakeLLMSettings | None = None,
    *,
    responder: Responder | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> Iterator[FakeLLMServer]:
    """Serve the fake on ``host:port`` (0 = a free port) in a background thread."""
    app = create_app(settings, responder=responder)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-llm", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fake LLM server did not start on {host}:{bound_port}")
            time.sleep(0.01)
        yield FakeLLMServer(base_url=f"http://{host}:{bound_port}/v1", state=app.state.fake)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> tuple[FakeLLMSettings, str, int]:
    """Settings, host and port from the command line."""
    parser = argparse.ArgumentParser(prog="python -m callray.sim.fake_llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--ttft-ms", type=float, default=200.0, help="time to first token")
    parser.add_argument("--tokens-per-s", type=float, default=50.0, help="token rate (0 = no delay)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- jitter on every delay")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests failing")
    parser.add_argument("--error-status", type=int, action="append", help="status to fail with (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--model", default="fake-llm")
    parser.add_argument("--filler-sentences", type=int, default=1, help="extra sentences per echo reply")
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    parser.add_argument("--script", type=Path, default=None, help="JSON file: a list of scripted replies")
    args = parser.parse_args(argv)
    script = []
    if args.script is not None:
        script = TypeAdapter(list[ScriptedReply]).validate_json(args.script.read_text(encoding="utf-8"))
    settings = FakeLLMSettings(
        ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s, jitter_ms=args.jitter_ms,
        error_rate=args.error_rate, error_statuses=args.error_status or [429, 500], seed=args.seed,
        model=args.model, filler_sentences=args.filler_sentences, api_key=args.api_key, script=script,
    )
    return settings, args.host, args.port


def main(argv: list[str] | None = None) -> None:
    """Run the fake server in the foreground until interrupted."""
    settings, host, port = parse_args(argv)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
