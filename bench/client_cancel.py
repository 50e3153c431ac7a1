"""Does cancelling a request stop it at the upstream? One check per candidate HTTP client.

    python bench/client_cancel.py

A gateway must stop an upstream call when its client leaves (an LLM upstream otherwise keeps
generating, and billing, for nobody). In asyncio that means: cancel the task awaiting the call and
the connection to the upstream closes. This starts a local upstream (aiohttp, with handler
cancellation on, so it sees a peer that goes away), then for each client that is installed
(aiohttp, pyreqwest, pyqwest, rnet) sends a request the upstream holds for HOLD_S seconds, cancels the
awaiting task after CANCEL_AFTER_S, and reports whether the upstream saw the disconnect or
finished its answer for nobody. Twice per client: cancelled before the reply's head, and after the
head while the body is still coming. Also whether the client's own timeout closes the connection.
Issue 13, sixth round: bench/RESULTS.md and docs/dependencies.md quote it.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from aiohttp import web

HOLD_S = 2.0
CANCEL_AFTER_S = 0.3
PORT = 18779
URL = f"http://127.0.0.1:{PORT}/"


class Upstream:
    """Answers after HOLD_S; records "disconnect" or "finished" per request."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            if request.query.get("head"):
                resp = web.StreamResponse()
                await resp.prepare(request)
                await resp.write(b"{")
                await asyncio.sleep(HOLD_S)
                await resp.write(b"}")
                self.outcomes.append("finished")
                return resp
            await asyncio.sleep(HOLD_S)
            self.outcomes.append("finished")
            return web.Response(text="{}")
        except asyncio.CancelledError:
            self.outcomes.append("disconnect")
            raise


Call = Callable[[str, float | None], Awaitable[Any]]


def aiohttp_client() -> tuple[Call, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession()

    async def call(url: str, own_timeout_s: float | None) -> Any:
        tmo = aiohttp.ClientTimeout(total=own_timeout_s)
        async with session.post(url, data=b"{}", timeout=tmo) as r:
            return await r.read()

    return call, session.close


def pyreqwest_client() -> tuple[Call, Callable[[], Awaitable[None]]]:
    from pyreqwest.client import ClientBuilder

    client = ClientBuilder().gzip(False).build()

    async def call(url: str, own_timeout_s: float | None) -> Any:
        b = client.post(url).body_bytes(b"{}")
        if own_timeout_s:
            b = b.timeout(timedelta(seconds=own_timeout_s))
        async with b.build_streamed() as r:
            return await r.body_reader.bytes()

    return call, client.close


def pyqwest_client() -> tuple[Call, Callable[[], Awaitable[None]]]:
    import pyqwest

    transport = pyqwest.HTTPTransport(enable_gzip=False, enable_brotli=False, enable_zstd=False, follow_redirects=False)
    client = pyqwest.Client(transport)

    async def call(url: str, own_timeout_s: float | None) -> Any:
        coro = client.post(url, {"content-type": "application/json"}, b"{}")
        r = await (asyncio.wait_for(coro, own_timeout_s) if own_timeout_s else coro)
        return r.content

    return call, transport.aclose


def rnet_client() -> tuple[Call, Callable[[], Awaitable[None]]]:
    import rnet

    client = rnet.Client()

    async def call(url: str, own_timeout_s: float | None) -> Any:
        r = await (asyncio.wait_for(client.post(url, body=b"{}"), own_timeout_s) if own_timeout_s else client.post(url, body=b"{}"))
        return await r.bytes()

    async def close() -> None:
        return None

    return call, close


CLIENTS = {"aiohttp": aiohttp_client, "pyreqwest": pyreqwest_client, "pyqwest": pyqwest_client, "rnet": rnet_client}


async def outcome(up: Upstream, run: Callable[[], Awaitable[Any]]) -> str:
    up.outcomes.clear()
    task = asyncio.ensure_future(run())
    await asyncio.sleep(CANCEL_AFTER_S)
    task.cancel()
    try:
        await task
    except BaseException:  # cancelled, or the client's own timeout: either way the call is over here
        pass
    await asyncio.sleep(HOLD_S + 0.5)
    return up.outcomes[0] if up.outcomes else "never arrived"


async def main() -> int:
    up = Upstream()
    app = web.Application()
    app.router.add_post("/", up.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT).start()
    print("| client | version | cancelled before the head | cancelled mid-body | its own timeout |")
    print("|---|---|---|---|---|")
    try:
        for name, make in CLIENTS.items():
            if importlib.util.find_spec(name) is None:
                print(f"| {name} | not installed | | | |")
                continue
            call, close = make()
            before = await outcome(up, lambda c=call: c(URL, None))  # type: ignore[misc]
            mid = await outcome(up, lambda c=call: c(URL + "?head=1", None))  # type: ignore[misc]
            own = await outcome(up, lambda c=call: c(URL, CANCEL_AFTER_S / 2))  # type: ignore[misc]
            await close()
            from importlib.metadata import version

            print(f"| {name} | {version(name)} | {before} | {mid} | {own} |", flush=True)
    finally:
        await runner.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
