"""What the floors share: the command line, the hop-by-hop headers, and how each server is run."""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable

from aiohttp import web

HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}  # not forwarded


def add_routes(app: web.Application, forward: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    """``/readyz`` (for bench/run.py's wait) and every POST path to ``forward``."""

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/readyz", ready)
    app.router.add_post("/{tail:.*}", forward)
    return app


def args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    return p.parse_args()


def run_aiohttp(build_app: Callable[[str], web.Application]) -> None:
    """Serve ``build_app(upstream)`` on aiohttp with uvloop (when installed), as Kaiyuan runs."""
    a = args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(build_app(a.upstream.rstrip("/")), host="127.0.0.1", port=a.port, access_log=None, print=None)


def run_granian(target: str) -> None:
    """Serve the RSGI app ``target`` ("module:attr") on granian: one worker, one runtime thread, uvloop.
    The upstream reaches the worker through FLOOR_UPSTREAM."""
    a = args()
    os.environ["FLOOR_UPSTREAM"] = a.upstream
    from granian import Granian
    from granian.constants import Interfaces, Loops

    Granian(target, address="127.0.0.1", port=a.port, interface=Interfaces.RSGI,
            workers=1, runtime_threads=1, loop=Loops.uvloop, log_enabled=False).serve()
