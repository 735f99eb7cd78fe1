"""A small Retell-platform client for integration tests: speaks the wire protocol over a socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets


class RetellClient:
    """One call as Retell would place it; collects every frame the server sends."""

    def __init__(self, base_url: str, call_id: str):
        self.url = f"{base_url}/{call_id}"
        self.call_id = call_id
        self.frames: list[dict[str, Any]] = []
        self.transcript: list[dict[str, str]] = []
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task | None = None
        self.ws: Any = None
        self.close_code: int | None = None

    async def connect(self) -> "RetellClient":
        self.ws = await websockets.connect(self.url, max_size=None, open_timeout=30)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                frame = json.loads(message)
                async with self._arrived:
                    self.frames.append(frame)
                    self._arrived.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            async with self._arrived:
                self._arrived.notify_all()

    async def wait_for(self, predicate, timeout: float = 15.0) -> dict[str, Any]:
        """The first frame (old or new) matching ``predicate``."""
        async def find():
            async with self._arrived:
                while True:
                    for frame in self.frames:
                        if predicate(frame):
                            return frame
                    if self._reader.done():
                        raise ConnectionError(f"socket closed ({self.close_code}) before the frame arrived")
                    await self._arrived.wait()
        return await asyncio.wait_for(find(), timeout)

    async def complete(self, response_id: int, timeout: float = 15.0) -> str:
        """Wait for ``content_complete`` of ``response_id``; return the whole content."""
        await self.wait_for(lambda f: f.get("response_id") == response_id and f.get("content_complete"), timeout)
        return "".join(f.get("content", "") for f in self.frames
                       if f.get("response_type") == "response" and f.get("response_id") == response_id)

    async def send(self, payload: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(payload))

    async def say(self, response_id: int, text: str, kind: str = "response_required") -> None:
        if text:
            self.transcript.append({"role": "user", "content": text})
        await self.send({"interaction_type": kind, "response_id": response_id, "transcript": list(self.transcript)})

    async def turn(self, response_id: int, text: str, kind: str = "response_required") -> str:
        await self.say(response_id, text, kind)
        answer = await self.complete(response_id)
        self.transcript.append({"role": "agent", "content": answer})
        return answer

    async def close(self, code: int = 1000) -> None:
        await self.ws.close(code)
        if self._reader:
            await asyncio.gather(self._reader, return_exceptions=True)

    def responses(self, response_id: int) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("response_id") == response_id and f.get("response_type") == "response"]
