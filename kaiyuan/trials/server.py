"""Wires trials into the gateway (hooks, background loop) and serves the admin API under /admin/trials.

The admin API follows the one admin rule (:func:`kaiyuan.console.access.authorize`): with no
master key configured it is closed, since trials can be promoted and their rows hold users' prompts.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from kaiyuan.console.access import VIEWER, authorize
from kaiyuan.dialects import openai as oai
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.server.app import EXTRA_ROUTES
from kaiyuan.server.common import JSON_CT, error_response, read_body
from kaiyuan.server.openai_api import GATEWAY_KEY
from kaiyuan.trials.models import TrialConfig, check_trial_models
from kaiyuan.trials.runtime import TrialsRuntime

TRIALS_KEY: web.AppKey[TrialsRuntime] = web.AppKey("trials", TrialsRuntime)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=JSON_CT)


def _err(kind: ErrorKind, msg: str, **kw: Any) -> web.Response:
    return error_response(GatewayError(kind, msg, **kw), oai.error_body)


def _actor(request: web.Request) -> str:
    v = request.get(VIEWER)
    return f"{v.via}:{v.name}"[:200] if v is not None else "admin-api"


def _rt(request: web.Request) -> TrialsRuntime:
    return request.app[TRIALS_KEY]


def _trial(request: web.Request) -> TrialConfig:
    name = request.match_info["name"]
    t = _rt(request).trials.get(name)
    if t is None:
        raise GatewayError(ErrorKind.NOT_FOUND, f"no trial named {name!r}", code="trial_not_found")
    return t


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request)
    if not raw:
        return {}
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise GatewayError(ErrorKind.INVALID_REQUEST, "the body must be a JSON object", code="invalid_json")
    return obj


def admin(handler: Any) -> Any:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            await authorize(request)  # closed in open mode: no master key, no admin API
            return await handler(request)
        except GatewayError as e:
            return error_response(e, oai.error_body)

    return wrapped


@admin
async def list_trials(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": _rt(request).status()})


@admin
async def create_trial(request: web.Request) -> web.Response:
    rt = _rt(request)
    body = await _body(request)
    try:
        t = TrialConfig.model_validate(body)
        if t.name in {c.name for c in rt.gw.config.trials}:
            raise ValueError(f"trial {t.name!r} is defined in the config file; change it there")
        check_trial_models([t], set(rt.gw.models))
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'trial'}: {err['msg']}" for err in e.errors())
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"invalid trial: {msg}", code="invalid_trial") from None
    except ValueError as e:
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"invalid trial: {e}", code="invalid_trial") from None
    if rt.store is not None:  # saved first, so a concurrent refresh does not drop it again
        await asyncio.to_thread(rt.store.save_def, t.name, t.model_dump(mode="json", by_alias=True))
    rt.add_trial(t)
    return _json(t.model_dump(mode="json", by_alias=True), status=201)


@admin
async def delete_trial(request: web.Request) -> web.Response:
    rt = _rt(request)
    t = _trial(request)
    if t.name in {c.name for c in rt.gw.config.trials}:
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"trial {t.name!r} is defined in the config file; remove it there")
    if rt.store is not None:
        await asyncio.to_thread(rt.store.delete_def, t.name)
    rt.remove_trial(t.name)
    return _json({"deleted": t.name})


async def _report(request: web.Request) -> dict[str, Any]:
    from kaiyuan.trials.report import build_report

    rt = _rt(request)
    t = _trial(request)
    if rt.store is None:
        raise GatewayError(ErrorKind.NO_DEPLOYMENT, "trials need a database (store.url)")
    await rt.flush()
    store = rt.store
    return await asyncio.to_thread(build_report, t, store, resamples=_resamples(request))


MAX_RESAMPLES = 20_000


def _resamples(request: web.Request) -> int:
    """``?resamples=N`` (bootstrap resamples, default 500): a whole number in 1..MAX_RESAMPLES, or a 400."""
    raw = request.query.get("resamples", "500")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_RESAMPLES:
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"'resamples' must be a whole number from 1 to {MAX_RESAMPLES}, "
                                                      f"got {raw[:40]!r}", param="resamples", code="invalid_query")
    return n


@admin
async def get_trial(request: web.Request) -> web.Response:
    rep = await _report(request)
    rep["live"] = next((s for s in _rt(request).status() if s["name"] == rep["trial"]), None)
    return _json(rep)


@admin
async def get_html(request: web.Request) -> web.Response:
    from kaiyuan.trials.html import render_html

    return web.Response(text=render_html(await _report(request)), content_type="text/html")


@admin
async def promote(request: web.Request) -> web.Response:
    rt = _rt(request)
    t = _trial(request)
    body = await _body(request)
    cand = body.get("candidate") or t.candidates[0]
    if cand not in t.candidates:
        raise GatewayError(ErrorKind.INVALID_REQUEST, f"{cand!r} is not a candidate of trial {t.name}", param="candidate")
    steps = body.get("steps", [1.0])
    step_s = body.get("step_s", 0)
    if (not isinstance(steps, list) or not steps or not all(isinstance(x, int | float) and 0 <= x <= 1 for x in steps)
            or not isinstance(step_s, int | float) or step_s < 0):
        raise GatewayError(ErrorKind.INVALID_REQUEST, "'steps' must be a list of shares in [0, 1] and 'step_s' seconds >= 0",
                           param="steps")
    if rt.store is None:
        raise GatewayError(ErrorKind.NO_DEPLOYMENT, "promote needs a database (store.url)")
    store = rt.store
    await asyncio.to_thread(store.record_routing, t.name, "promote", t.incumbent, cand, [float(x) for x in steps],
                            float(step_s), _actor(request), body.get("note"))
    rt.apply_routing(await asyncio.to_thread(store.routing_states))
    return _json({"trial": t.name, "action": "promote", "candidate": cand, "share_now": rt.overrides[t.incumbent].share()})


@admin
async def rollback(request: web.Request) -> web.Response:
    rt = _rt(request)
    t = _trial(request)
    if rt.store is None:
        raise GatewayError(ErrorKind.NO_DEPLOYMENT, "rollback needs a database (store.url)")
    store = rt.store
    await asyncio.to_thread(store.record_routing, t.name, "rollback", t.incumbent, t.candidates[0], [0.0], 0.0, _actor(request), None)
    rt.apply_routing(await asyncio.to_thread(store.routing_states))
    return _json({"trial": t.name, "action": "rollback"})


def install(app: web.Application) -> None:
    gw = app[GATEWAY_KEY]
    rt = TrialsRuntime(gw)
    app[TRIALS_KEY] = rt
    gw.pre_route.append(rt.pre_route)
    gw.route_targets.append(rt.targets)
    gw.on_complete.append(rt.on_complete)

    async def start(_app: web.Application) -> None:
        await rt.start()

    async def stop(_app: web.Application) -> None:
        await rt.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    r = app.router
    r.add_get("/admin/trials", list_trials)
    r.add_post("/admin/trials", create_trial)
    r.add_get("/admin/trials/{name}", get_trial)
    r.add_delete("/admin/trials/{name}", delete_trial)
    r.add_get("/admin/trials/{name}/report.html", get_html)
    r.add_post("/admin/trials/{name}/promote", promote)
    r.add_post("/admin/trials/{name}/rollback", rollback)


EXTRA_ROUTES.append(install)
