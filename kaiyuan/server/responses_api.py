"""The Responses API: ``POST /v1/responses`` (stream and not), ``GET`` / ``DELETE /v1/responses/{id}``
and ``GET /v1/responses/{id}/input_items``.

``POST`` runs on the shared skeleton (:func:`kaiyuan.pipeline.api_handler`), so keys, limits,
budgets, routing, data policy, cost, the request log and trials apply as on every endpoint. The
request becomes canonical (:mod:`kaiyuan.dialects.responses`) and goes to any upstream as Chat
Completions, Anthropic Messages or Gemini; a model whose every deployment speaks Responses itself
(``responses_api: true``) is passed through, its state kept by that upstream. Errors have the OpenAI
shape, which the Responses API shares; a broken stream ends with ``error`` and ``response.failed``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import orjson
from aiohttp import web

from kaiyuan.accounting.output_cap import asked
from kaiyuan.context import RequestContext
from kaiyuan.dialects import canonical as c
from kaiyuan.dialects import openai as oai
from kaiyuan.dialects import responses as rq
from kaiyuan.dialects import responses_out as ro
from kaiyuan.dialects.responses_stream import ChatToResponses
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.offload import maybe_off_loop, off_loop
from kaiyuan.pipeline import api_handler
from kaiyuan.providers.base import Provider, UpstreamCall
from kaiyuan.server import responses_pass, translate
from kaiyuan.server import responses_state as state
from kaiyuan.server.common import JSON_CT, kaiyuan_headers
from kaiyuan.server.overrun import OutputLimit, capped_chunks, cut_canonical, output_limit, overran
from kaiyuan.server.sse import MAX_CAPTURE, relay

log = logging.getLogger("kaiyuan.responses")


def _passthrough(gw: Gateway, model: str) -> bool:
    """Every deployment of ``model`` serves /responses itself."""
    provs = gw.providers.get(model) or []
    return bool(provs) and all(getattr(p.deployment, "responses_api", False) for p in provs)


async def _load(request: web.Request, gw: Gateway, ctx: RequestContext, body: dict[str, Any]) -> None:
    """The stored conversation ``previous_response_id`` continues, into ``ctx.carried``: read before
    the reservation, so limits and budgets count the whole prompt, not only the new input. (A
    pass-through model keeps its own state: the id is the upstream's.)"""
    prev_id = body.get("previous_response_id")
    if not prev_id or _passthrough(gw, ctx.model or ""):
        return
    prev = await state.runtime(request.app).store.get(prev_id, ctx.principal.key_id)
    if prev is None:
        raise GatewayError(ErrorKind.NOT_FOUND, f"previous response {prev_id!r} not found (it was never stored, "
                           f"was deleted or expired, or another key made it)", param="previous_response_id",
                           code="previous_response_not_found")
    ctx.carried = prev.history
    ctx.carried_bytes = orjson.dumps(prev.history)


def _mirror(body: dict[str, Any], rt: state.ResponsesRuntime, refuse: bool) -> c.Request | None:
    """A pass-through request's canonical form, for a trial to replay (None: it has no translation)."""
    try:
        return rq.prepare(body, [], rt.sealer.open, refuse).request
    except (GatewayError, KeyError, TypeError, AttributeError, ValueError, IndexError):
        return None


async def _create(request: web.Request, gw: Gateway, ctx: RequestContext, body: dict[str, Any],
                  _arg: Any) -> web.StreamResponse:
    stream = ctx.stream = body.get("stream") is True
    rt = state.runtime(request.app)
    refuse = gw.models[ctx.model or ""].hosted_tools == "refuse"
    if _passthrough(gw, ctx.model or ""):
        if ctx.capture_response and not body.get("previous_response_id"):  # a trial's sample (its state upstream's)
            ctx.mirror_request = _mirror(body, rt, refuse)
        return await responses_pass.passthrough(request, gw, ctx, body, stream)
    history = ctx.carried or []  # read by _load, before the reservation
    size = len(ctx.raw_body)
    prep = await off_loop(size, rq.prepare, body, history, rt.sealer.open, refuse)
    if prep.omitted_tools:
        rt.note_omitted(ctx, prep.omitted_tools)
    if ctx.capture_response:
        ctx.mirror_request = prep.request  # a trial's sample: replayed on the candidate as it is sent here

    ask = asked(body, "responses")
    caps = gw.caps

    def call(provider: Provider, cap: int) -> UpstreamCall:
        try:
            return translate.upstream_call(provider, prep.request, cap, caps)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            raise GatewayError(ErrorKind.INVALID_REQUEST, f"the request cannot be translated for this model's "
                               f"{provider.protocol} upstream ({type(e).__name__}: {e})", code="invalid_request") from None

    def build(provider: Provider) -> UpstreamCall | Awaitable[UpstreamCall]:
        cap = ctx.output_cap = caps.cap(provider.id, ask)  # reserved for it, sent, and enforced
        return maybe_off_loop(size, call, provider, cap)

    provider, reply = await gw.execute(ctx, build)
    lim = output_limit(ctx, gw.router.flag_overrun, provider.deployment.model)
    shape = ro.Shape(prep.names, prep.summary, rt.sealer.seal if prep.encrypted else None)
    skeleton = ro.skeleton(ro.new_id("resp"), ctx.model or "", body)
    store = body.get("store", True) is not False
    if reply.stream is not None:
        ctx.status = 200
        return await _stream(request, ctx, provider, reply.stream, skeleton, shape, prep, history, rt, store, lim)
    r = await off_loop(len(reply.body or b""), translate.reply_to_canonical, provider.protocol, reply.body or b"", ctx,
                       reply.parsed)
    if lim is not None and overran(lim, r.usage.output_tokens, len(reply.body or b"")):
        cut_canonical(r, lim)  # an upstream that ignored the cap: cut to it, status incomplete
    translate.usage_into_ctx(r.usage, ctx)
    final = ro.finished(skeleton, ro.output_items(r.content, shape), r.stop_reason, r.usage)
    if store:
        rt.keep(ctx, final, prep, history, state.history_items(r.content, prep, rt.sealer))
    data = orjson.dumps(final)
    ctx.status = 200
    ctx.mark_first_byte()
    if ctx.log_bodies or ctx.capture_response:
        ctx.response_body = data
    return web.Response(body=data, content_type=JSON_CT, headers=kaiyuan_headers(ctx))


async def _stream(request: web.Request, ctx: RequestContext, provider: Provider, upstream: AsyncIterator[bytes],
                  skeleton: dict[str, Any], shape: ro.Shape, prep: rq.Prepared, history: list[dict[str, Any]],
                  rt: state.ResponsesRuntime, store: bool, lim: OutputLimit | None) -> web.StreamResponse:
    tr = ChatToResponses(skeleton, shape)
    tail = bytearray() if ctx.log_bodies or ctx.capture_response else None

    async def pump(resp: web.StreamResponse) -> None:
        async def write(parts: list[bytes]) -> None:
            if parts:
                ctx.mark_first_byte()
                data = b"".join(parts)
                if tail is not None and len(tail) < MAX_CAPTURE:
                    tail.extend(data)
                await resp.write(data)

        try:
            await write(tr.start())
            chunks = translate.openai_chunks(provider.protocol, upstream, ctx, ctx.model or "", True, lim)
            async for ch in capped_chunks(chunks, ctx, lim, True):
                try:
                    out = tr.feed(ch)
                except (KeyError, TypeError, AttributeError, ValueError) as e:
                    raise GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {ctx.deployment} sent a reply this "
                                       f"gateway cannot read ({type(e).__name__}: {e})") from None
                await write(out)
            last = tr.end()
            translate.usage_into_ctx(tr.usage, ctx)
            if tr.final is not None and store:
                rt.keep(ctx, tr.final, prep, history, state.history_from_output(tr, rt.sealer))
            await write(last)
        finally:
            if tail is not None:
                ctx.response_body = bytes(tail)

    return await relay(request, ctx, pump, tr.failed, lim)


create = api_handler("openai", "responses", oai.error_body, rq.validate, _create, load=_load)


def add_routes(app: web.Application) -> None:
    state.install(app)
    app.router.add_post("/v1/responses", create)
    app.router.add_post("/responses", create)
    app.router.add_get("/v1/responses/{id}", state.retrieve)
    app.router.add_delete("/v1/responses/{id}", state.remove)
    app.router.add_get("/v1/responses/{id}/input_items", state.input_items)

