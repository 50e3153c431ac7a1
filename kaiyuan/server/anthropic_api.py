"""The Anthropic API family: POST /v1/messages (stream and not) and POST /v1/messages/count_tokens.

To an Anthropic deployment the request is a pass-through (model name rewritten, bytes relayed).
To any other protocol it goes through the canonical form (kaiyuan.dialects) and back. Errors are
Anthropic-shaped: ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web

from kaiyuan.accounting.output_cap import ask_of
from kaiyuan.context import RequestContext
from kaiyuan.dialects import anthropic as anth
from kaiyuan.dialects import canonical as c
from kaiyuan.gateway import Gateway
from kaiyuan.offload import maybe_off_loop
from kaiyuan.pipeline import api_handler
from kaiyuan.providers.base import Provider, UpstreamCall
from kaiyuan.server import translate
from kaiyuan.server.common import JSON_CT, kaiyuan_headers, with_public_model
from kaiyuan.server.overrun import cut_anthropic_body, output_limit, overran, reported_output

FORWARDED_HEADERS = ("anthropic-beta",)


def _forward_headers(request: web.Request) -> dict[str, str]:
    return {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}


def _validate_count(body: dict[str, Any]) -> None:
    body.setdefault("max_tokens", 1)
    anth.validate(body)


def passthrough_body(provider: Provider, body: dict[str, Any], cap: int | None) -> dict[str, Any]:
    """The body for an Anthropic upstream: the model renamed, ``max_tokens`` the output cap (the
    caller's, clamped to the model's limit: :mod:`kaiyuan.accounting.output_cap`) with a thinking
    budget kept below it, and mid-conversation system messages folded into user turns where the
    deployment says its model does not take them."""
    b = dict(body)
    b["model"] = provider.deployment.model
    if cap is not None and cap != body["max_tokens"]:
        b["max_tokens"] = cap
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and isinstance(thinking.get("budget_tokens"), int) and thinking["budget_tokens"] >= cap:
            b["thinking"] = {**thinking, "budget_tokens": max(1, cap - 1)}
    if not getattr(provider.deployment, "mid_conversation_system", True) and any(
            isinstance(m, dict) and m.get("role") == "system" for m in body["messages"]):
        b["messages"] = anth.fold_system_messages(body["messages"])
    return b


async def _messages(request: web.Request, gw: Gateway, ctx: RequestContext, body: dict[str, Any],
                    _arg: Any) -> web.StreamResponse:
    stream = ctx.stream = body.get("stream") is True
    canon: list[c.Request] = []
    extra_headers = _forward_headers(request)
    ask = ask_of(ctx)  # body is ctx.body, the endpoint "messages"
    caps = gw.caps
    size = len(ctx.raw_body)

    def build(provider: Provider) -> UpstreamCall | Awaitable[UpstreamCall]:
        cap = ctx.output_cap = caps.sent(provider.id, ask)  # reserved for it, sent, and enforced
        if provider.protocol == "anthropic":
            return UpstreamCall("messages", passthrough_body(provider, body, cap), stream, headers=extra_headers)
        return maybe_off_loop(size, translate.translated_call, provider, anth.request_to_canonical, body, canon, cap, caps)

    provider, reply = await gw.execute(ctx, build)
    public = ctx.model or ""
    lim = output_limit(ctx, gw.router.flag_overrun, provider.deployment.model)
    if reply.stream is not None:
        ctx.status = 200
        if provider.protocol == "anthropic":
            return await translate.relay_anthropic_passthrough(request, ctx, reply.stream, lim)
        return await translate.relay_to_anthropic(request, ctx, provider.protocol, reply.stream, public, lim)
    data = reply.body or b""
    ctx.status = reply.status
    if provider.protocol == "anthropic":  # pass-through: only read the usage
        obj = translate.parsed_body(reply)
        if obj is not None:
            translate.usage_into_ctx(anth.usage_to_canonical(obj.get("usage")), ctx)
            reported = reported_output(obj.get("usage"), "output_tokens")
            if lim is not None and overran(lim, reported, len(data)):
                data = cut_anthropic_body({**obj, "model": public}, lim, reported)
            else:
                data = with_public_model(obj, data, public)
    else:
        translated = translate.whole_reply(ctx, provider.protocol, reply, lim, anth.response_from_canonical, public)
        data = translated if isinstance(translated, bytes) else await translated
    ctx.mark_first_byte()
    if ctx.log_bodies or ctx.capture_response:  # trials: sampled requests
        ctx.response_body = data
    return web.Response(body=data, status=reply.status, content_type=JSON_CT, headers=kaiyuan_headers(ctx))


_ENCODING: list[Any] = []


def _load_encoding() -> None:
    if _ENCODING:
        return
    try:
        import bpe_openai

        enc: Any = bpe_openai.get_encoding("o200k_base")
    except Exception:  # pragma: no cover - fall back to a rough estimate
        enc = None
    if not _ENCODING:
        _ENCODING.append(enc)


_PIECE = 40_000  # characters per encode call: the tokenizer refuses inputs of 1M chars / 200k tokens


def _count(text: str) -> int:
    _load_encoding()
    enc = _ENCODING[0]
    if enc is None:
        return max(1, len(text) // 4)
    # encode_ordinary: text such as "<|endoftext|>" in a prompt is text, not a special token (encode raises)
    return sum(len(enc.encode_ordinary(text[i:i + _PIECE])) for i in range(0, len(text), _PIECE))


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """Tokens of the prompt with the o200k tokenizer, plus a few per message/tool (an estimate for
    non-Anthropic models; Anthropic deployments ask the upstream)."""
    parts: list[str] = []
    sys = body.get("system")
    if isinstance(sys, str):
        parts.append(sys)
    elif isinstance(sys, list):
        parts += [b.get("text", "") for b in sys if isinstance(b, dict)]
    n = 0
    for m in body["messages"]:
        n += 4
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
            continue
        for b in content:
            kind = b.get("type")
            if kind == "text":
                parts.append(b.get("text", ""))
            elif kind == "tool_use":
                parts.append(b.get("name", "") + orjson.dumps(b.get("input") or {}).decode())
            elif kind == "tool_result":
                rc = b.get("content")
                parts.append(rc if isinstance(rc, str) else orjson.dumps(rc or "").decode())
            elif kind == "thinking":
                parts.append(b.get("thinking", ""))
            elif kind == "image":
                n += 1000
    for t in body.get("tools") or []:
        parts.append(orjson.dumps(t).decode())
        n += 8
    return n + _count("\n".join(parts))


async def _count_tokens(request: web.Request, gw: Gateway, ctx: RequestContext, body: dict[str, Any],
                       _arg: Any) -> web.StreamResponse:
    providers = [p for p in gw.providers.get(ctx.model or "", []) if p.unavailable is None]
    if providers and all(p.protocol == "anthropic" for p in providers):  # the upstream's own count
        b = {k: v for k, v in body.items() if k not in ("max_tokens", "stream")}
        b["model"] = providers[0].deployment.model
        _prov, reply = await gw.execute(ctx, lambda p: UpstreamCall("count_tokens", {**b, "model": p.deployment.model},
                                                                        False, headers=_forward_headers(request)))
        ctx.status = reply.status
        return web.Response(body=reply.body or b"", status=reply.status, content_type=JSON_CT, headers=kaiyuan_headers(ctx))
    ctx.status = 200
    if not _ENCODING:  # the first call loads the tokenizer (~0.3 s) off the event loop
        await asyncio.to_thread(_load_encoding)
    if len(ctx.raw_body) > 256 * 1024:  # a long prompt is tokenized off the event loop
        tokens = await asyncio.to_thread(estimate_input_tokens, body)
    else:
        tokens = estimate_input_tokens(body)
    ctx.usage.prompt_tokens = tokens
    return web.Response(body=orjson.dumps({"input_tokens": tokens}), content_type=JSON_CT, headers=kaiyuan_headers(ctx))


messages = api_handler("anthropic", "messages", anth.error_body, anth.validate, _messages)
count_tokens = api_handler("anthropic", "count_tokens", anth.error_body, _validate_count, _count_tokens)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
