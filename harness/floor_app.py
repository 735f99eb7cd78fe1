"""The Serve platform floor: the least a Ray Serve WebSocket app can do per Retell call.

A bare FastAPI ingress deployment speaking the same protocol as callray, with no actors and
no state beyond the socket: ``config``, response 0, ``ping_pong`` echoed, and for every
request two chunks (``"Got it."`` + ``" You said: <last user line>."``, the second with
``content_complete``). With ``llm_base_url`` it streams the answer from an OpenAI-compatible
server instead, with one ``AsyncOpenAI`` client shared by every call, in one of two framings:

* ``phrase``: the way callray streams (the SDK client over aiohttp, raw SSE lines, callray's
  phrase chunker, one frame per phrase), so the floor's row isolates what callray itself adds;
* ``token``: the SDK used the ordinary way, one frame per token, as a first bare Serve app is
  usually written.

``callray bench`` runs it next to callray in the same run; whatever callray adds is measured
against it.
"""

# No `from __future__ import annotations` here: FastAPI must resolve the WebSocket annotation
# of the class-based routes Serve rewrites, and string annotations break that (HTTP 403).
import asyncio
import contextlib
import json
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from ray import serve

from callray.agents.llm import stream_delta
from callray.agents.phrases import PhraseChunker, chunk_phrases

#: Same as callray's CallGateway: each open socket is one ongoing request for the whole call.
MAX_ONGOING_REQUESTS = 1000

GREETING = "Hello, you reached the floor."
SYSTEM_PROMPT = "You are a receptionist on a phone call. Answer in one or two short sentences."
REMINDER_PROMPT = "(The caller has gone quiet. Briefly check whether they are still there.)"
FALLBACK = "Sorry, could you say that again?"

api = FastAPI(title="callray bench floor")


def echo_chunks(request: dict[str, Any]) -> list[str]:
    """The two fixed chunks answering ``request`` (a response or reminder request)."""
    if request.get("interaction_type") == "reminder_required":
        return ["Are you still there?", " Take your time."]
    users = [u.get("content", "") for u in request.get("transcript") or [] if u.get("role") == "user"]
    last = (users[-1] if users else "nothing").rstrip(" .!?")
    return ["Got it.", f" You said: {last}."]


def chat_messages(request: dict[str, Any]) -> list[dict[str, str]]:
    """Retell's transcript as chat messages (agent -> assistant, user -> user)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for utterance in request.get("transcript") or []:
        role = {"agent": "assistant", "user": "user"}.get(utterance.get("role"))
        if role:
            messages.append({"role": role, "content": utterance.get("content", "")})
    if request.get("interaction_type") == "reminder_required":
        messages.append({"role": "user", "content": REMINDER_PROMPT})
    return messages


def _response(response_id: int, content: str, complete: bool) -> str:
    return json.dumps({"response_type": "response", "response_id": response_id, "content": content,
                       "content_complete": complete})


@serve.deployment(name="Floor", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                  graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class Floor:
    def __init__(self, llm_base_url: str | None = None, model: str = "fake-llm", framing: str = "phrase"):
        if framing not in ("phrase", "token"):
            raise ValueError(f"framing must be 'phrase' or 'token', got {framing!r}")
        self.model, self.framing = model, framing
        self.client = None
        if llm_base_url:
            import openai

            lean = {"http_client": openai.DefaultAioHttpClient()} if framing == "phrase" else {}
            self.client = openai.AsyncOpenAI(base_url=llm_base_url, api_key="floor-no-key", max_retries=0, timeout=20.0,
                                             **lean)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "mode": f"llm ({self.framing} frames)" if self.client else "echo"}

    @api.websocket("/llm-websocket/{call_id}")
    async def socket(self, websocket: WebSocket, call_id: str) -> None:
        await websocket.accept()
        await websocket.send_text(json.dumps(
            {"response_type": "config", "config": {"auto_reconnect": True, "call_details": True}}))
        await websocket.send_text(_response(0, GREETING, True))
        answering: asyncio.Task | None = None
        try:
            while True:
                message = json.loads(await websocket.receive_text())
                kind = message.get("interaction_type")
                if kind == "ping_pong":
                    await websocket.send_text(json.dumps({"response_type": "ping_pong",
                                                          "timestamp": message["timestamp"]}))
                elif kind in ("response_required", "reminder_required"):
                    if self.client is None:
                        chunks = echo_chunks(message)
                        for i, chunk in enumerate(chunks):
                            await websocket.send_text(_response(message["response_id"], chunk, i == len(chunks) - 1))
                        continue
                    if answering is not None:  # the newer request supersedes the running answer
                        answering.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await answering
                    answering = asyncio.create_task(self._stream(websocket, message))
        except (WebSocketDisconnect, RuntimeError):  # closed by the caller, or while we wrote
            pass
        finally:
            if answering is not None:
                answering.cancel()

    async def _stream(self, websocket: WebSocket, request: dict[str, Any]) -> None:
        """The answer as it arrives (per phrase or per token); then ``content_complete``."""
        response_id = request["response_id"]
        chunks = self._phrases(request) if self.framing == "phrase" else self._tokens(request)
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the socket went away mid-answer
            try:
                async with contextlib.aclosing(chunks) as stream:
                    async for chunk in stream:  # phrases keep their own spacing, as tokens do
                        await websocket.send_text(_response(response_id, chunk, False))
            except (asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                raise
            except Exception:  # noqa: BLE001 - the caller must never be left in silence
                await websocket.send_text(_response(response_id, FALLBACK, False))
            await websocket.send_text(_response(response_id, "", True))

    async def _tokens(self, request: dict[str, Any]):
        stream = await self.client.chat.completions.create(model=self.model, messages=chat_messages(request),
                                                           stream=True)
        async with stream:
            async for event in stream:
                delta = event.choices[0].delta.content if event.choices else None
                if delta:
                    yield delta

    async def _phrases(self, request: dict[str, Any]):
        async def tokens():
            async with self.client.chat.completions.with_streaming_response.create(
                    model=self.model, messages=chat_messages(request), stream=True) as response:
                async for line in response.iter_lines():
                    delta = stream_delta(line)
                    if delta and delta.get("content"):
                        yield delta["content"]

        async with contextlib.aclosing(chunk_phrases(tokens(), PhraseChunker())) as phrases:
            async for phrase in phrases:
                yield phrase
