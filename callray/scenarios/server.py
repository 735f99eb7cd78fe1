"""callray for one config, in this process: the FastAPI app every Serve replica runs, with its
local replica (stores, host, consumers), under uvicorn on a free loopback port.

``callray test`` runs suites against it when no ``--url`` is given: one command in a user's CI,
no Ray cluster to start or stop. It is the same gateway code as on Serve, with ``local``
placement, minus Serve's proxy.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import uvicorn

from callray.erasure import Erasure
from callray.gateway import Gateway, build_api
from callray.runtime import CallsRuntime
from callray.settings import CallraySettings
from callray.sim.local import free_port


class LocalServer:
    """Serves ``settings`` on 127.0.0.1 in a thread with its own event loop (a context manager)."""

    def __init__(self, settings: CallraySettings, *, start_timeout_s: float = 30.0):
        self.settings, self.start_timeout_s = settings, start_timeout_s
        self.port = free_port()
        self.runtime: CallsRuntime | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="callray-local-server", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.runtime = await CallsRuntime.start(self.settings, "local")
            app = build_api(Gateway(self.settings, self.runtime, self.runtime, live=self.runtime.live,
                                    erasure=Erasure(self.runtime, self.settings.privacy, self.runtime.stores)))
            self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                         lifespan="off"))
            serving = asyncio.create_task(self._server.serve())
            while not self._server.started and not serving.done():
                await asyncio.sleep(0.02)
            self._started.set()
            try:
                await serving
            finally:
                await self.runtime.close()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by __enter__ when it happens before the start
            self._error = exc
            self._started.set()

    def __enter__(self) -> LocalServer:
        self._thread.start()
        if not self._started.wait(self.start_timeout_s):
            raise RuntimeError(f"callray did not start on port {self.port} within {self.start_timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"callray did not start: {self._error}") from self._error
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout=30)

    @property
    def ws(self) -> str:
        """The LLM WebSocket base URL (Retell's llm_websocket_url)."""
        return f"ws://127.0.0.1:{self.port}{self.settings.gateway.path_prefix}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on_loop(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop (tests look inside the replica)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)
