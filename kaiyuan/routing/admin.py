"""``GET /admin/deployments``: every deployment's routing state (breaker, cooldown, load) and why.

Needs the master key, like every admin route (:mod:`kaiyuan.server.admin_auth`).
"""

from __future__ import annotations

import orjson
from aiohttp import web

from kaiyuan.dialects import openai as oai
from kaiyuan.errors import GatewayError
from kaiyuan.pipeline import GATEWAY_KEY
from kaiyuan.server.admin_auth import require_admin
from kaiyuan.server.common import JSON_CT, error_response


async def deployments(request: web.Request) -> web.Response:
    try:
        require_admin(request)
    except GatewayError as e:
        return error_response(e, oai.error_body)
    data = request.app[GATEWAY_KEY].router.describe()
    model = request.query.get("model")
    if model:
        data = [d for d in data if d["model"] == model]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=JSON_CT)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/deployments", deployments)
