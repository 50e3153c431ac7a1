"""A mixed floor: aiohttp's server with pyreqwest as the upstream client (issue 13, sixth round).

    python bench/floors/aiohttp_pyreqwest_floor.py --port 8003 --upstream http://127.0.0.1:9000

It answers "what would swapping only the client leg save?": Kaiyuan's server side (aiohttp) stays,
the upstream call goes through pyreqwest's Rust client. Streams are relayed a chunk at a time as
they arrive. Not in the default run: `bench/run.py --mixed-floors`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bench.floors.common import HOP, add_routes, run_aiohttp

CLIENT: web.AppKey[Any] = web.AppKey("client", object)


def build_app(upstream: str) -> web.Application:
    app = web.Application()

    async def start(app: web.Application) -> None:
        from pyreqwest.client import ClientBuilder

        app[CLIENT] = ClientBuilder().max_connections(None).gzip(False).build()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        req = app[CLIENT].post(upstream + request.path).headers(headers).body_bytes(body).build_streamed()
        async with req as up:
            ctype = up.get_header("content-type") or "application/json"
            if not ctype.startswith("text/event-stream"):
                data = await up.body_reader.bytes()
                return web.Response(body=bytes(data), status=up.status, headers={"Content-Type": ctype})
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
            await resp.prepare(request)
            reader = up.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                await resp.write(bytes(chunk))
            await resp.write_eof()
            return resp

    app.on_startup.append(start)
    return add_routes(app, forward)


def main() -> None:
    run_aiohttp(build_app)


if __name__ == "__main__":
    main()
