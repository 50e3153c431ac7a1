"""``GET /admin/deployments``: every deployment's routing state (breaker, cooldown, load) and why.

Protected by ``server.master_key`` when one is set (``Authorization: Bearer <master key>``).
"""

from __future__ import annotations

import hmac

import orjson
from aiohttp import web

from kaiyuan.dialects import openai as oai
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.guard import bearer_token
from kaiyuan.server.common import JSON_CT, error_response


def _check_admin(request: web.Request, master_key: str | None) -> GatewayError | None:
    if master_key is None:
        return None
    token = bearer_token(request.headers)
    if token is None:
        return GatewayError(
            ErrorKind.AUTHENTICATION, "admin endpoint: send 'Authorization: Bearer <master key>'", code="missing_api_key"
        )
    if not hmac.compare_digest(token.encode(), master_key.encode()):
        return GatewayError(ErrorKind.AUTHENTICATION, "admin endpoint: invalid master key", code="invalid_api_key")
    return None


async def deployments(request: web.Request) -> web.Response:
    from kaiyuan.server.openai_api import GATEWAY_KEY

    gw = request.app[GATEWAY_KEY]
    err = _check_admin(request, gw.config.server.master_key)
    if err is not None:
        return error_response(err, oai.error_body)
    data = gw.router.describe()
    model = request.query.get("model")
    if model:
        data = [d for d in data if d["model"] == model]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=JSON_CT)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/deployments", deployments)
