"""The benchmark baseline: a Retell custom-LLM server written by hand, as most users start.

It follows Retell's public Python demo: one FastAPI process, state in a dict, one untracked
task per incoming message, and each answer streamed token by token from an OpenAI-compatible
LLM (``--llm-base-url`` points it at the fake LLM for benchmarks), but without the demo's
handicaps: one ``AsyncOpenAI`` client shared by every call (the demo builds one per call) and
no SDK retries (a benchmark must not hide a slow answer behind a retry). ``--echo`` replaces the LLM with a fixed two-chunk answer that
repeats the caller's last line, to measure the server alone.

    python -m harness.baseline_server --port 8200 [--llm-base-url URL] [--model NAME] [--echo]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from openai import AsyncOpenAI

GREETING = "Hello, thanks for calling Maple Street Clinic. How can I help you today?"
SYSTEM_PROMPT = (
    "You are the receptionist of Maple Street Clinic on a phone call. "
    "Answer in one or two short, friendly sentences."
)
REMINDER_PROMPT = "(The caller has gone quiet. Briefly check whether they are still there.)"
FALLBACK = "Sorry, I didn't catch that. Could you say it again?"


def _messages(request: dict[str, Any]) -> list[dict[str, str]]:
    """Retell's transcript as chat messages (agent -> assistant, user -> user)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for utterance in request.get("transcript", []):
        if utterance.get("role") == "agent":
            messages.append({"role": "assistant", "content": utterance.get("content", "")})
        elif utterance.get("role") == "user":
            messages.append({"role": "user", "content": utterance.get("content", "")})
    if request["interaction_type"] == "reminder_required":
        messages.append({"role": "user", "content": REMINDER_PROMPT})
    return messages


def _echo_chunks(request: dict[str, Any]) -> list[str]:
    if request["interaction_type"] == "reminder_required":
        return ["Are you still there?", " Take your time."]
    users = [u.get("content", "") for u in request.get("transcript", []) if u.get("role") == "user"]
    return ["Got it.", f" You said: {users[-1] if users else 'nothing'}"]


def create_app(echo: bool = False, llm_base_url: str | None = None, model: str = "gpt-4o-mini",
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app; ``echo`` answers without an LLM."""
    app = FastAPI()
    calls: dict[str, dict[str, Any]] = {}  # call_id -> {"greeted": bool, "details": call object}
    client = None if echo else AsyncOpenAI(
        base_url=llm_base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "sk-baseline"), max_retries=0)

    @app.websocket("/llm-websocket/{call_id}")
    async def llm_websocket(websocket: WebSocket, call_id: str) -> None:
        await websocket.accept()
        state = calls.setdefault(call_id, {"greeted": False, "details": None})
        latest_id = 0

        await websocket.send_json(
            {"response_type": "config", "config": {"auto_reconnect": True, "call_details": True}})
        await websocket.send_json({"response_type": "response", "response_id": 0,
                                   "content": "" if state["greeted"] else GREETING, "content_complete": True})
        state["greeted"] = True

        async def send_chunk(response_id: int, content: str, complete: bool) -> None:
            await websocket.send_json({"response_type": "response", "response_id": response_id,
                                       "content": content, "content_complete": complete, "end_call": False})

        async def answer(request: dict[str, Any]) -> None:
            response_id = request["response_id"]
            if client is None:
                chunks = _echo_chunks(request)
                for i, chunk in enumerate(chunks):
                    if response_id != latest_id:
                        return  # a newer request superseded this one
                    await send_chunk(response_id, chunk, i == len(chunks) - 1)
                return
            try:
                stream = await client.chat.completions.create(model=model, messages=_messages(request), stream=True)
                async for event in stream:
                    if response_id != latest_id:
                        await stream.close()
                        return
                    delta = event.choices[0].delta.content if event.choices else None
                    if delta:
                        await send_chunk(response_id, delta, False)
            except Exception:  # noqa: BLE001 - never leave the agent silent
                if response_id == latest_id:
                    await send_chunk(response_id, FALLBACK, False)
            if response_id == latest_id:
                await send_chunk(response_id, "", True)

        async def handle_message(message: dict[str, Any]) -> None:
            nonlocal latest_id
            try:
                kind = message.get("interaction_type")
                if kind == "ping_pong":
                    await websocket.send_json({"response_type": "ping_pong", "timestamp": message["timestamp"]})
                elif kind == "call_details":
                    state["details"] = message.get("call")
                elif kind in ("response_required", "reminder_required"):
                    latest_id = message["response_id"]
                    await answer(message)
            except (WebSocketDisconnect, RuntimeError):
                pass  # the socket went away mid-answer (e.g. Retell reconnected)

        try:
            async for message in websocket.iter_json():
                asyncio.create_task(handle_message(message))
        except WebSocketDisconnect:
            pass

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--llm-base-url", default=os.environ.get("LLM_BASE_URL") or os.environ.get("OPENAI_BASE_URL"),
                        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8300/v1 (env LLM_BASE_URL)")
    parser.add_argument("--model", default=os.environ.get("LLM_MODEL", "gpt-4o-mini"))
    parser.add_argument("--echo", action="store_true", help="answer with a fixed two-chunk echo, no LLM")
    args = parser.parse_args(argv)
    app = create_app(echo=args.echo, llm_base_url=args.llm_base_url, model=args.model)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
