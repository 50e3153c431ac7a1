"""Static routes found by one lookup (kaiyuan.server.fast_routes) behave as aiohttp's router does:
the middlewares run, ``request.app`` and ``request.match_info`` are right, and everything the
lookup does not take (dynamic paths, 404, 405, ``Expect: 100-continue``, an encoded slash) still
gets aiohttp's own answer. Real servers on 127.0.0.1; the gateway's own routes are covered by the
rest of the suite, which runs with the lookup installed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kaiyuan.server import fast_routes
from kaiyuan.testing.server_thread import ServerThread

NAME: web.AppKey[str] = web.AppKey("name", str)


def _app(calls: list[str], infos: list[Any] | None = None) -> web.Application:
    infos = [] if infos is None else infos

    @web.middleware
    async def outer(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        calls.append("outer")
        try:
            return await handler(request)
        except web.HTTPException as e:  # as kaiyuan's error middleware turns these into its own bodies
            return web.json_response({"caught": e.status}, status=e.status)

    @web.middleware
    async def inner(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        calls.append("inner")
        return await handler(request)

    async def plain(request: web.Request) -> web.Response:
        infos.append(request.match_info)  # kept alive: two requests' match infos are compared by identity
        body = await request.read()
        return web.json_response({"app": request.app[NAME], "route": request.match_info.route.resource.canonical,
                                  "len": len(body), "method": request.method})

    async def too_large(_request: web.Request) -> web.Response:
        raise web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2)

    async def dynamic(request: web.Request) -> web.Response:
        return web.json_response({"model": request.match_info["model"]})

    app = web.Application(middlewares=[outer, inner])
    app[NAME] = "test-app"
    app.router.add_post("/v1/thing", plain)
    app.router.add_get("/v1/thing", plain)
    app.router.add_post("/v1/raise", too_large)
    app.router.add_post("/v1/models/{model}", dynamic)
    app.router.add_post("/a/b", plain)
    return app


@pytest.fixture
def served(servers: ServerThread) -> Iterator[tuple[str, list[str], list[Any]]]:
    calls: list[str] = []
    infos: list[Any] = []
    app = _app(calls, infos)
    url = servers.serve(app)
    try:
        yield url, calls, infos
    finally:
        servers.stop(app)


def _ask(method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.request(method, url, **kw) as r:
            return r.status, await r.json(content_type=None)
    return asyncio.run(go())


def test_the_table_holds_the_static_routes_only() -> None:
    table = fast_routes.static_routes(_app([]))
    assert set(table) == {("POST", "/v1/thing"), ("GET", "/v1/thing"), ("HEAD", "/v1/thing"), ("POST", "/v1/raise"),
                          ("POST", "/a/b")}


def test_a_static_route_runs_its_middlewares_in_order_and_sees_its_app(served: Any) -> None:
    url, calls, infos = served
    status, body = _ask("POST", url + "/v1/thing", data=b"12345")
    assert status == 200
    assert body == {"app": "test-app", "route": "/v1/thing", "len": 5, "method": "POST"}
    assert calls == ["outer", "inner"]
    assert _ask("POST", url + "/v1/thing", data=b"1")[0] == 200
    assert infos[0] is infos[1]  # one shared match info: the lookup served both (the router makes one a request)
    status, body = _ask("GET", url + "/v1/thing")
    assert status == 200 and body["method"] == "GET"


def test_an_http_exception_reaches_the_middleware(served: Any) -> None:
    url, _calls, _infos = served
    assert _ask("POST", url + "/v1/raise") == (413, {"caught": 413})


def test_what_the_table_does_not_hold_goes_to_the_router(served: Any) -> None:
    url, calls, _infos = served
    assert _ask("POST", url + "/v1/models/m1") == (200, {"model": "m1"})
    assert _ask("DELETE", url + "/v1/thing") == (405, {"caught": 405})
    assert _ask("POST", url + "/v1/nothing") == (404, {"caught": 404})
    assert _ask("POST", url + "/a%2Fb") == (404, {"caught": 404})  # an encoded slash is not a path separator
    assert calls.count("outer") == 4


def test_expect_100_continue_is_answered_before_the_body(served: Any) -> None:
    url, _calls, _infos = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/thing HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"abc")
        rest = b""
        while b'"len": 3' not in rest and b'"len":3' not in rest:
            chunk = s.recv(4096)
            assert chunk, rest
            rest += chunk
        assert b"HTTP/1.1 200" in first + rest


def test_an_old_style_middleware_leaves_the_routing_to_aiohttp() -> None:
    async def old(app: web.Application, handler: Any) -> Any:
        return handler

    async def handler(_request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application(middlewares=[old])  # type: ignore[list-item]
    app.router.add_post("/x", handler)
    assert fast_routes.static_routes(app) == {}
