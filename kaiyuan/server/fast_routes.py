"""Static routes found with one dict lookup, not by aiohttp's router and its middleware wrappers.

For every request aiohttp's ``Application._handle`` walks the router's index, builds and freezes a
match info, looks up the cached middleware chain and runs it inside ``_fix_request_current_app``
(a context manager per request). For the gateway's routes, which are static paths with one
handler per method, all of that has one answer per (method, path), worked out once here: the
handler wrapped in the application's middlewares and a frozen, shared match info (a static route
has no match groups). callgrind: a pass-through request through aiohttp's router costs ~40,000
instructions more than through a bare ``web.Server``.

What still goes through aiohttp's own path, unchanged: any route with a dynamic part (the Gemini
paths), a method a path does not have (405), an unknown path (404), sub-applications, and a
request with an ``Expect`` header (``100-continue`` is answered by the route's expect handler).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from inspect import iscoroutinefunction
from typing import Any

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Table = dict[tuple[str, str], tuple[UrlMappingMatchInfo, Handler]]


def static_routes(app: web.Application) -> Table:
    """(method, path) -> (match info, handler wrapped in the app's middlewares) for every route on
    a plain path with a function handler; empty when a middleware is old-style (its wrapping is
    aiohttp's to do)."""
    middlewares = list(app.middlewares)
    if any(getattr(m, "__middleware_version__", None) != 1 for m in middlewares):
        return {}
    table: Table = {}
    for route in app.router.routes():
        resource = route.resource
        if not isinstance(resource, web.PlainResource) or route.method == hdrs.METH_ANY:
            continue
        if not iscoroutinefunction(route.handler):  # a class-based view or a wrapped callable
            continue
        handler: Any = route.handler
        for m in reversed(middlewares):  # the first middleware outermost, as aiohttp builds it
            handler = partial(m, handler=handler)
        info = UrlMappingMatchInfo({}, route)
        info.add_app(app)
        info.freeze()
        table.setdefault((route.method, resource.canonical), (info, handler))
    return table


def install(runner: web.AppRunner) -> int:
    """After ``runner.setup()``: the server looks a request's (method, path) up in
    :func:`static_routes` before it hands the request to aiohttp's router. Returns the number of
    routes so served."""
    server = runner.server
    assert server is not None, "call after runner.setup()"
    table = static_routes(runner.app)
    if not table:
        return 0
    routed = server.request_handler

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        found = table.get((request.method, request.rel_url.path_safe))  # what the router matches on
        if found is None or request.headers.get(hdrs.EXPECT):
            return await routed(request)
        request._match_info = found[0]  # type: ignore[attr-defined]  # as Application._handle sets it
        return await found[1](request)

    server.request_handler = dispatch
    return len(table)
