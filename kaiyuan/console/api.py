"""The console's data as admin API routes: the numbers every page shows, as JSON.

``/admin/console/overview``, ``/admin/console/traffic``, ``/admin/console/keys``, ``/admin/requests``
and ``/admin/requests/{id}`` follow the one admin rule; a team's key or session reads them too,
limited to its own team (a team viewer's filters cannot widen that).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy import Engine

from kaiyuan.console import data
from kaiyuan.console.access import VIEWER, Viewer
from kaiyuan.console.rollup import RollupTask
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.server.admin_api import team_readable
from kaiyuan.server.common import JSON_CT


@dataclass
class ConsoleState:
    engine: Engine
    catalogue: data.Catalogue
    rollup: RollupTask


STATE_KEY: web.AppKey[ConsoleState] = web.AppKey("console_state", ConsoleState)


def state(request: web.Request) -> ConsoleState:
    st = request.app.get(STATE_KEY)
    if st is None:
        raise GatewayError(ErrorKind.NO_DEPLOYMENT, "the console needs a database (store.url)", code="no_store")
    return st


def scope_for(viewer: Viewer, query: Any = None) -> data.Scope:
    """An admin may narrow to a team or key; a team viewer is always held to its own."""
    if viewer.is_admin:
        q = query or {}
        return data.Scope(q.get("team_id") or None, q.get("key_id") or None)
    return data.Scope(viewer.team_id, viewer.key_id if viewer.team_id is None else None)


def _bad(e: ValueError) -> GatewayError:
    return GatewayError(ErrorKind.INVALID_REQUEST, str(e), code="invalid_query")


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS), content_type=JSON_CT)


async def _rolled_up_period(request: web.Request, st: ConsoleState) -> str:
    """The ``period`` query parameter, checked (a 400), once the rollup tables are current."""
    period = request.query.get("period", "24h")
    try:
        data.period_hours(period)
    except ValueError as e:
        raise _bad(e) from None
    await st.rollup.refresh()
    return period


async def overview_for(request: web.Request, viewer: Viewer) -> dict[str, Any]:
    st = state(request)
    period = await _rolled_up_period(request, st)
    return await asyncio.to_thread(data.overview, st.engine, st.catalogue, scope_for(viewer, request.query), period)


async def traffic_for(request: web.Request, viewer: Viewer) -> dict[str, Any]:
    st = state(request)
    period = await _rolled_up_period(request, st)
    return await asyncio.to_thread(data.traffic, st.engine, scope_for(viewer, request.query), period)


async def requests_for(request: web.Request, viewer: Viewer) -> dict[str, Any]:
    st = state(request)
    try:
        f = data.LogFilter.from_query(request.query)
    except ValueError as e:
        raise _bad(e) from None
    return await asyncio.to_thread(data.search_requests, st.engine, scope_for(viewer), f)


async def request_for(request: web.Request, viewer: Viewer) -> dict[str, Any]:
    st = state(request)
    rid = request.match_info["id"]
    row = await asyncio.to_thread(data.request_detail, st.engine, scope_for(viewer), rid)
    if row is None:  # another team's request is "not found" too: its existence is not disclosed
        raise GatewayError(ErrorKind.NOT_FOUND, f"no request {rid!r}", code="request_not_found")
    return row


async def keys_for(request: web.Request, viewer: Viewer) -> dict[str, Any]:
    st = state(request)
    return await asyncio.to_thread(data.keys_and_budgets, st.engine, scope_for(viewer))


Fetch = Callable[[web.Request, Viewer], Awaitable[dict[str, Any]]]


def json_route(fetch: Fetch) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The admin JSON route over ``fetch`` (the console pages call the same ``*_for`` functions)."""

    @team_readable
    async def handle(request: web.Request) -> web.StreamResponse:
        return _json(await fetch(request, request[VIEWER]))

    handle.__name__ = handle.__qualname__ = fetch.__name__.removesuffix("_for")
    return handle


overview = json_route(overview_for)
traffic = json_route(traffic_for)
requests = json_route(requests_for)
request_detail = json_route(request_for)
keys = json_route(keys_for)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/console/overview", overview)
    r.add_get("/admin/console/traffic", traffic)
    r.add_get("/admin/console/keys", keys)
    r.add_get("/admin/requests", requests)
    r.add_get("/admin/requests/{id}", request_detail)
