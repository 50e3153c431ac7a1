"""/healthz (the process is alive), /readyz (it can serve: started, some model usable), /metrics."""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from kaiyuan.context import Principal
from kaiyuan.pipeline import GATEWAY_KEY


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    models = gw.public_models(Principal())  # every model: readiness is about the gateway, not a key
    usable = [m["id"] for m in models if m["available"]]
    unavailable = {m["id"]: m.get("unavailable_reason") for m in models if not m["available"]}
    ok = gw.ready and bool(usable)
    body = {"status": "ready" if ok else "not_ready", "models_available": usable, "models_unavailable": unavailable}
    if not gw.ready:
        body["reason"] = "starting up"
    elif not usable:
        body["reason"] = "no configured model has a usable deployment"
    return web.Response(status=200 if ok else 503, body=orjson.dumps(body), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    resp = web.Response(body=gw.metrics.render())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
