"""The OpenAI API family: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Same-dialect traffic is a pass-through: the body is parsed once, the model name (and for streams
``stream_options.include_usage``) rewritten, and the upstream's bytes go back as they arrive.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web

from kaiyuan.accounting.output_cap import ask_of
from kaiyuan.context import RequestContext
from kaiyuan.dialects import openai as oai
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.observability.request_log import shown
from kaiyuan.offload import maybe_off_loop
from kaiyuan.pipeline import GATEWAY_KEY, api_handler
from kaiyuan.providers.base import Provider, UpstreamCall, UpstreamReply
from kaiyuan.routing.executor import Build
from kaiyuan.server import translate
from kaiyuan.server.common import (
    JSON_CT,
    ModelRenamer,
    error_response,
    kaiyuan_headers,
    new_request_id,
    with_public_model,
)
from kaiyuan.server.overrun import cut_openai_body, output_limit, overran, reported_output
from kaiyuan.server.sse import relay_openai_stream

__all__ = ["GATEWAY_KEY", "add_routes", "chat_completions", "completions", "embeddings", "list_models", "retrieve_model"]


def _build_call(gw: Gateway, ctx: RequestContext, endpoint: str, body: dict[str, Any],
                stream: bool) -> Build:
    canon: list[Any] = []
    ask = ask_of(ctx)  # body is ctx.body, endpoint ctx.endpoint
    ctx.choices = ask.n
    caps = gw.caps

    def build(provider: Provider) -> UpstreamCall | Awaitable[UpstreamCall]:
        cap = None if endpoint == "embeddings" else caps.sent(provider.id, ask)
        ctx.output_cap = cap  # the cap the answering deployment was sent: enforced on its answer
        if provider.protocol != "openai":  # Anthropic / Gemini upstream: through the canonical form
            return maybe_off_loop(len(ctx.raw_body), translate.openai_call, provider, endpoint, body, canon, cap, caps)
        b = dict(body)
        b["model"] = provider.deployment.model
        if cap is not None:
            caps.set_openai(provider.id, b, endpoint, cap)
        return UpstreamCall(endpoint, b, stream)

    return build


async def _middle(request: web.Request, gw: Gateway, ctx: RequestContext, body: dict[str, Any],
                  endpoint: str) -> web.StreamResponse:
    stream = ctx.stream = body.get("stream") is True and endpoint != "embeddings"
    strip_usage = False
    if stream:
        so = body.get("stream_options")
        if not (isinstance(so, dict) and so.get("include_usage") is True):
            body["stream_options"] = {**(so or {}), "include_usage": True}
            strip_usage = True
    provider, reply = await gw.execute(ctx, _build_call(gw, ctx, endpoint, body, stream))
    lim = output_limit(ctx, gw.router.flag_overrun, provider.deployment.model)
    if provider.protocol != "openai":
        return await translate.openai_reply(request, ctx, provider, reply, not strip_usage, lim)
    if reply.stream is not None:
        ctx.status = 200
        return await relay_openai_stream(request, ctx, reply.stream, strip_usage, lim, ModelRenamer(ctx.model or ""))
    data = reply.body or b""
    ctx.status = reply.status
    ctx.mark_first_byte()
    obj = _read_usage(reply, ctx)
    if obj is not None and reply.status < 300:
        public = ctx.model or ""
        reported = reported_output(obj.get("usage"), "completion_tokens") if lim is not None else 0
        if lim is not None and overran(lim, reported, len(data)):
            data = cut_openai_body({**obj, "model": public} if "model" in obj else obj, lim, reported)
        else:
            data = with_public_model(obj, data, public)
    if ctx.log_bodies or ctx.capture_response:  # trials: shadow-sampled requests
        ctx.response_body = data
    return web.Response(body=data, status=reply.status, content_type=JSON_CT, headers=kaiyuan_headers(ctx))


def _read_usage(reply: UpstreamReply, ctx: RequestContext) -> dict[str, Any] | None:
    obj = translate.parsed_body(reply)
    if obj is not None:
        oai.usage_into(obj.get("usage"), ctx.usage)
    return obj


chat_completions = api_handler("openai", "chat", oai.error_body, oai.validate_chat, _middle, "chat")
completions = api_handler("openai", "completions", oai.error_body, oai.validate_completions, _middle, "completions")
embeddings = api_handler("openai", "embeddings", oai.error_body, oai.validate_embeddings, _middle, "embeddings")


async def _models_for(request: web.Request, ctx: RequestContext) -> list[dict[str, Any]]:
    """The models the caller may use: /v1/models and /v1/models/{id} authenticate alike."""
    gw = request.app[GATEWAY_KEY]
    await gw.auth.authenticate(ctx)
    return gw.public_models(ctx.principal)


async def list_models(request: web.Request) -> web.Response:
    ctx = RequestContext(new_request_id(), "openai", "models", headers=request.headers)
    try:
        models = await _models_for(request, ctx)
    except GatewayError as e:
        return error_response(e, oai.error_body, ctx)
    return web.Response(body=orjson.dumps({"object": "list", "data": models}), content_type=JSON_CT)


async def retrieve_model(request: web.Request) -> web.Response:
    """One model, as in /v1/models; a model the key may not use is not shown (404, as if absent)."""
    ctx = RequestContext(new_request_id(), "openai", "models", headers=request.headers)
    name = request.match_info["model"]
    try:
        for m in await _models_for(request, ctx):
            if m["id"] == name:
                return web.Response(body=orjson.dumps(m), content_type=JSON_CT)
    except GatewayError as e:
        return error_response(e, oai.error_body, ctx)
    err = GatewayError(ErrorKind.NOT_FOUND, f"model {shown(name)!r} does not exist on this gateway", param="model",
                       code="model_not_found")
    return error_response(err, oai.error_body, ctx)


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
    app.router.add_get("/models/{model}", retrieve_model)
