"""The Gemini API family, inbound: ``POST /v1beta/models/{model}:generateContent``,
``:streamGenerateContent?alt=sse`` and ``:countTokens``, so Gemini-dialect callers (Gemini CLI, the
google-genai SDKs) reach any configured model.

The key comes in ``x-goog-api-key`` or ``?key=``. Every upstream, a Gemini one included, is reached
through the canonical form (:mod:`kaiyuan.dialects.gemini_in`); errors are Google-shaped.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from kaiyuan.accounting.output_cap import asked
from kaiyuan.accounting.tokens import count_prompt
from kaiyuan.context import RequestContext
from kaiyuan.dialects import gemini_in
from kaiyuan.errors import ErrorKind, GatewayError, invalid
from kaiyuan.gateway import Gateway
from kaiyuan.offload import maybe_off_loop, off_loop
from kaiyuan.pipeline import api_handler, record_unknown_route
from kaiyuan.providers.base import Provider, UpstreamCall
from kaiyuan.server import translate
from kaiyuan.server.common import JSON_CT, error_response, kaiyuan_headers
from kaiyuan.server.overrun import output_limit

PREFIXES = ("/v1beta", "/v1")
GENERATE, STREAM, COUNT = "generateContent", "streamGenerateContent", "countTokens"


def _target(request: web.Request) -> tuple[str, str]:
    """(model, method) from ``{model}:{method}``; a 404 in Google's shape for any other method."""
    model, sep, method = request.match_info["target"].rpartition(":")
    if not sep or not model or method not in (GENERATE, STREAM, COUNT):
        raise GatewayError(ErrorKind.NOT_FOUND, f"no such method {request.match_info['target']!r}; this gateway serves "
                                                f"models/{{model}}:{GENERATE}, :{STREAM} (alt=sse) and :{COUNT}")
    return model, method


def _prepare(request: web.Request, body: dict[str, Any]) -> None:
    body["model"] = _target(request)[0]


async def _generate(request: web.Request, gw: Gateway, ctx: RequestContext, body: dict[str, Any],
                    _arg: Any) -> web.StreamResponse:
    stream = ctx.stream = _target(request)[1] == STREAM
    if stream and request.query.get("alt") != "sse":
        raise invalid("streamGenerateContent is served as server-sent events only: add ?alt=sse to the URL", "alt")
    canon: list[Any] = []
    ask = asked(body, "generate_content")
    caps = gw.caps

    size = len(ctx.raw_body)

    def build(provider: Provider) -> UpstreamCall | Awaitable[UpstreamCall]:
        cap = ctx.output_cap = caps.sent(provider.id, ask)  # reserved for it, sent, and enforced
        return maybe_off_loop(size, translate.translated_call, provider,
                              lambda b: gemini_in.request_to_canonical(b, stream), body, canon, cap, caps)

    provider, reply = await gw.execute(ctx, build)
    public = ctx.model or ""
    lim = output_limit(ctx, gw.router.flag_overrun, provider.deployment.model)
    if reply.stream is not None:
        ctx.status = 200
        return await translate.relay_to_gemini(request, ctx, provider.protocol, reply.stream, public, lim)
    translated = translate.whole_reply(ctx, provider.protocol, reply, lim, gemini_in.response_from_canonical, public)
    data = translated if isinstance(translated, bytes) else await translated
    ctx.status = reply.status
    ctx.mark_first_byte()
    if ctx.log_bodies or ctx.capture_response:
        ctx.response_body = data
    return web.Response(body=data, status=reply.status, content_type=JSON_CT, headers=kaiyuan_headers(ctx))


def _validate_count(body: dict[str, Any]) -> None:
    inner = body.get("generateContentRequest")
    if inner is not None:
        if not isinstance(inner, dict):
            raise invalid("generateContentRequest: must be an object", "generateContentRequest")
        gemini_in.validate(inner)
    else:
        gemini_in.validate(body)


async def _count(request: web.Request, gw: Gateway, ctx: RequestContext, body: dict[str, Any],
                 _arg: Any) -> web.StreamResponse:
    """A local count (the gateway's tokenizer for the first deployment's model): upstreams other
    than Gemini have no counting call of this shape."""
    inner = body.get("generateContentRequest")
    target = inner if isinstance(inner, dict) else body
    providers = gw.providers.get(ctx.model or "") or []
    model = providers[0].deployment.model if providers else ctx.model or ""
    tokens = await off_loop(len(ctx.raw_body), count_prompt, model, target)  # a long prompt: off the loop
    ctx.status = 200
    ctx.usage.prompt_tokens = tokens
    return web.Response(body=orjson.dumps({"totalTokens": tokens}), content_type=JSON_CT, headers=kaiyuan_headers(ctx))


generate = api_handler("gemini", "generate_content", gemini_in.error_body, gemini_in.validate, _generate,
                       prepare=_prepare)
count_tokens = api_handler("gemini", "count_tokens", gemini_in.error_body, _validate_count, _count, prepare=_prepare)


async def dispatch(request: web.Request) -> web.StreamResponse:
    """One route for ``models/{model}:{method}``; a ``?key=`` query parameter becomes ``x-goog-api-key``."""
    try:
        _model, method = _target(request)
    except GatewayError as e:
        record_unknown_route(request, e.status)
        return error_response(e, gemini_in.error_body)
    key = request.query.get("key")
    if key and "x-goog-api-key" not in request.headers:
        headers = CIMultiDict(request.headers)
        headers["x-goog-api-key"] = key
        request = request.clone(headers=headers)
    return await (count_tokens if method == COUNT else generate)(request)


def add_routes(app: web.Application) -> None:
    for prefix in PREFIXES:
        app.router.add_post(prefix + "/models/{target}", dispatch)
