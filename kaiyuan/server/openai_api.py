"""The OpenAI API family: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Same-dialect traffic is a pass-through: the body is parsed once, the model name (and for streams
``stream_options.include_usage``) rewritten, and the upstream's bytes go back as they arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from kaiyuan.context import RequestContext
from kaiyuan.dialects import openai as oai
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.providers.base import Provider, UpstreamCall, UpstreamReply
from kaiyuan.server import common, translate
from kaiyuan.server.common import JSON_CT, error_response, kaiyuan_headers, new_request_id, read_json
from kaiyuan.server.sse import relay_openai_stream

Validator = Callable[[dict[str, Any]], None]
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


def _build_call(endpoint: str, body: dict[str, Any], stream: bool) -> Callable[[Provider], UpstreamCall]:
    canon: list[Any] = []

    def build(provider: Provider) -> UpstreamCall:
        if provider.protocol != "openai":  # Anthropic / Gemini upstream: through the canonical form
            return translate.openai_call(provider, endpoint, body, canon)
        b = dict(body)
        b["model"] = provider.deployment.model
        return UpstreamCall(endpoint, b, stream)

    return build


async def _handle(request: web.Request, endpoint: str, validate: Validator) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    ctx = RequestContext(new_request_id(), "openai", endpoint, headers=request.headers)
    reply: UpstreamReply | None = None
    gw.metrics.in_flight.inc()
    try:
        ctx.raw_body, body = await read_json(request, gw.config.server.max_body_bytes)
        if isinstance(body.get("model"), str):
            ctx.model = body["model"]
        ctx.body = body  # the guard counts the prompt from it
        await gw.guard.admit(ctx)
        validate(body)
        ctx.body = body
        ctx.model = body["model"]
        gw.model_config(ctx)
        stream = ctx.stream = body.get("stream") is True and endpoint != "embeddings"
        strip_usage = False
        if stream:
            so = body.get("stream_options")
            if not (isinstance(so, dict) and so.get("include_usage") is True):
                body["stream_options"] = {**(so or {}), "include_usage": True}
                strip_usage = True
        _provider, reply = await gw.execute(ctx, _build_call(endpoint, body, stream))
        if _provider.protocol != "openai":
            return await translate.openai_reply(request, ctx, _provider, reply, not strip_usage)
        if reply.stream is not None:
            ctx.status = 200
            return await relay_openai_stream(request, ctx, reply.stream, strip_usage)
        data = reply.body or b""
        ctx.status = reply.status
        ctx.mark_first_byte()
        _read_usage(data, ctx)
        if ctx.log_bodies or "capture_response" in ctx.extra:  # trials: shadow-sampled requests
            ctx.response_body = data
        return web.Response(body=data, status=reply.status, content_type=JSON_CT, headers=kaiyuan_headers(ctx))
    except GatewayError as e:
        ctx.status, ctx.error = e.status, e.message
        return error_response(e, oai.error_body, ctx)
    except (asyncio.CancelledError, ConnectionResetError):
        common.client_gone(ctx)
        raise
    except Exception as e:  # a bug must still answer in the caller's dialect, never a stack trace
        request.app.logger.exception("internal error on %s", ctx.request_id)
        err = GatewayError(ErrorKind.INTERNAL, f"internal gateway error ({type(e).__name__}); request id {ctx.request_id}")
        ctx.status, ctx.error = 500, err.message
        return error_response(err, oai.error_body, ctx)
    finally:
        if reply is not None:
            await reply.aclose()
        gw.metrics.in_flight.dec()
        await gw.guard.settle(ctx)
        gw.finish(ctx)


def _read_usage(data: bytes, ctx: RequestContext) -> None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(obj, dict):
        oai.usage_into(obj.get("usage"), ctx.usage)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "chat", oai.validate_chat)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "completions", oai.validate_completions)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "embeddings", oai.validate_embeddings)


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    ctx = RequestContext(new_request_id(), "openai", "models", headers=request.headers)
    try:
        await gw.guard.admit(ctx)
    except GatewayError as e:
        return error_response(e, oai.error_body, ctx)
    models = gw.public_models()
    allowed = ctx.principal.allowed_models
    if allowed is not None:
        models = [m for m in models if m["id"] in allowed]
    return web.Response(body=orjson.dumps({"object": "list", "data": models}), content_type=JSON_CT)


async def retrieve_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    name = request.match_info["model"]
    for m in gw.public_models():
        if m["id"] == name:
            return web.Response(body=orjson.dumps(m), content_type=JSON_CT)
    err = GatewayError(ErrorKind.NOT_FOUND, f"model {name!r} does not exist on this gateway", param="model", code="model_not_found")
    return error_response(err, oai.error_body)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
    # Clients configured with a base URL without /v1 still work.
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_post("/completions", completions)
    app.router.add_post("/embeddings", embeddings)
    app.router.add_get("/models", list_models)
