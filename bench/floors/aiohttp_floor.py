"""The aiohttp floor: an aiohttp server that forwards each request to one upstream with one pooled
aiohttp client, and nothing else (no parsing, no auth, no log, no metrics).

    python bench/floors/aiohttp_floor.py --port 8001 --upstream http://127.0.0.1:9000

It is the cheapest a gateway built on Kaiyuan's own stack (aiohttp + uvloop) can be: bench/run.py
reports Kaiyuan's cost as a ratio to it. Streams are relayed chunk by chunk as they arrive.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from bench.floors.common import HOP, add_routes, run_aiohttp

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str) -> web.Application:
    app = web.Application()

    async def start(app: web.Application) -> None:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def stop(app: web.Application) -> None:
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with app[SESSION].post(upstream + request.path, data=body, headers=headers) as up:
            ctype = up.headers.get("Content-Type", "application/json")
            if not ctype.startswith("text/event-stream"):
                return web.Response(body=await up.read(), status=up.status, headers={"Content-Type": ctype})
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return add_routes(app, forward)


def main() -> None:
    run_aiohttp(build_app)


if __name__ == "__main__":
    main()
