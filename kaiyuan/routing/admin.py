"""``GET /admin/deployments``: every deployment's routing state (breaker, cooldown, load) and why.

Protected by the one admin rule (:func:`kaiyuan.console.access.authorize`); closed without a master key.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from kaiyuan.console.access import authorize
from kaiyuan.dialects import openai as oai
from kaiyuan.errors import GatewayError
from kaiyuan.pipeline import GATEWAY_KEY
from kaiyuan.server.common import JSON_CT, error_response


async def deployments(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    try:
        await authorize(request)  # closed in open mode: no master key, no admin API
    except GatewayError as e:
        return error_response(e, oai.error_body)
    data = gw.router.describe()
    model = request.query.get("model")
    if model:
        data = [d for d in data if d["model"] == model]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=JSON_CT)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/deployments", deployments)
