"""Run aiohttp applications on 127.0.0.1 in a background event-loop thread.

Tests can then drive them with blocking clients (the sync ``openai`` SDK) or from their own loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from aiohttp import web

from kaiyuan.server import fast_routes

T = TypeVar("T")


class ServerThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kaiyuan-test-servers", daemon=True)
        self._runners: list[web.AppRunner] = []
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Awaitable[T], timeout: float = 60) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def run_sync(self, fn: Callable[[], T], timeout: float = 60) -> T:
        async def wrap() -> T:
            return fn()

        return self.call(wrap(), timeout)

    def serve(self, app: web.Application, port: int = 0, **runner_kwargs: Any) -> str:
        """Start ``app`` on 127.0.0.1 and return its base URL (``http://127.0.0.1:PORT``)."""

        async def start() -> str:
            kwargs = {"handler_cancellation": True, "shutdown_timeout": 1.0, **runner_kwargs}
            runner = web.AppRunner(app, access_log=None, **kwargs)
            await runner.setup()
            fast_routes.install(runner)  # as kaiyuan serve does (server.app.run_server)
            site = web.TCPSite(runner, "127.0.0.1", port)
            await site.start()
            self._runners.append(runner)
            server = site._server
            assert server is not None
            sock = server.sockets[0]  # type: ignore[attr-defined]
            return f"http://127.0.0.1:{sock.getsockname()[1]}"

        return self.call(start())

    def stop(self, app: web.Application | None = None) -> None:
        async def cleanup() -> None:
            for r in list(self._runners):
                if app is None or r.app is app:
                    await r.cleanup()
                    self._runners.remove(r)

        self.call(cleanup())

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
