"""A mixed floor: aiohttp's server with pyqwest as the upstream client (issue 13, sixth round).

    python bench/floors/aiohttp_pyqwest_floor.py --port 8005 --upstream http://127.0.0.1:9000

Like aiohttp_pyreqwest_floor.py, with pyqwest (reqwest too, MIT), the Rust client that stops the
upstream call when the awaiting task is cancelled (bench/client_cancel.py). Not in the default run:
`bench/run.py --mixed-floors`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bench.floors.common import HOP, add_routes, run_aiohttp

CLIENT: web.AppKey[Any] = web.AppKey("client", object)


def build_app(upstream: str) -> web.Application:
    app = web.Application()

    async def start(app: web.Application) -> None:
        import pyqwest

        transport = pyqwest.HTTPTransport(enable_gzip=False, enable_brotli=False, enable_zstd=False,
                                          follow_redirects=False, pool_max_idle_per_host=1024)
        app[CLIENT] = pyqwest.Client(transport)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with app[CLIENT].stream("POST", upstream + request.path, headers, body) as up:
            ctype = up.headers.get("content-type") or "application/json"
            if not ctype.startswith("text/event-stream"):
                data = b"".join([bytes(c) async for c in up.content])
                return web.Response(body=data, status=up.status, headers={"Content-Type": ctype})
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
            await resp.prepare(request)
            async for chunk in up.content:
                await resp.write(bytes(chunk))
            await resp.write_eof()
            return resp

    app.on_startup.append(start)
    return add_routes(app, forward)


def main() -> None:
    run_aiohttp(build_app)


if __name__ == "__main__":
    main()
