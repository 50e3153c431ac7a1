"""Cross-dialect plumbing for the API handlers: build the upstream call for a provider's protocol
from the canonical request, and turn its reply (whole or streamed) into the caller's dialect.

Only used when the caller's dialect differs from the upstream's protocol; same-dialect traffic
stays on the pass-through paths.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from kaiyuan.accounting.output_cap import OutputCaps
from kaiyuan.context import RequestContext
from kaiyuan.dialects import anthropic as anth
from kaiyuan.dialects import canonical as c
from kaiyuan.dialects import gemini as gem
from kaiyuan.dialects import gemini_in
from kaiyuan.dialects import openai_chat as oc
from kaiyuan.dialects.openai import stream_error_event as openai_error_event
from kaiyuan.dialects.openai import token_count as _count
from kaiyuan.dialects.streams import AnthropicToOpenAI, GeminiToOpenAI, OpenAIToAnthropic
from kaiyuan.dialects.streams import OpenAIToGemini as GeminiOut
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.offload import big
from kaiyuan.providers.base import Provider, UpstreamCall, UpstreamReply
from kaiyuan.providers.reply_body import STREAM_TOO_LARGE_CODE
from kaiyuan.redact import scrub_bytes
from kaiyuan.server.common import JSON_CT, ModelRenamer, kaiyuan_headers
from kaiyuan.server.overrun import (
    OutputLimit,
    anthropic_event_tokens,
    capped_chunks,
    close_upstream,
    cut_canonical,
    overran,
    record_cut,
)
from kaiyuan.server.sse import DONE, MAX_CAPTURE, answered, relay
from kaiyuan.server.sse_framer import event_too_large, sse_events

RESPONSE_TO_CANONICAL = {
    "openai": oc.response_to_canonical,
    "anthropic": anth.response_to_canonical,
    "gemini": gem.response_to_canonical,
}


def upstream_call(provider: Provider, req: c.Request, cap: int | None = None, caps: OutputCaps | None = None) -> UpstreamCall:
    """The call for ``provider``'s wire protocol, from the canonical request, carrying the output
    cap ``cap`` (the one reserved for it) in the protocol's own field(s)."""
    proto = provider.protocol
    d: Any = provider.deployment
    if cap is not None and cap != req.max_tokens:  # the output cap (clamped to the model's limit)
        budget = req.thinking_budget
        if budget is not None and budget >= cap:  # Anthropic needs max_tokens > budget_tokens
            budget = max(1, cap - 1)
        req = replace(req, max_tokens=cap, thinking_budget=budget)
    if proto == "anthropic":
        return UpstreamCall("messages", anth.request_from_canonical(req, d.model, d.default_max_tokens), req.stream)
    if proto == "gemini":
        return UpstreamCall("chat", gem.request_from_canonical(req), req.stream)
    body = oc.request_from_canonical(req, d.model)
    if cap is not None and caps is not None:
        caps.set_openai(provider.id, body, "chat", cap)
    return UpstreamCall("chat", body, req.stream)


def translated_call(provider: Provider, parse: Callable[[dict[str, Any]], c.Request], body: dict[str, Any],
                    cache: list[c.Request], cap: int | None = None, caps: OutputCaps | None = None) -> UpstreamCall:
    """The call for ``provider`` from a client body in another dialect (parsed once, into ``cache``).

    The validators are shallow; a field of the wrong shape deeper down that the translation trips
    over is the client's to fix: a 400 naming the problem, never a 500."""
    try:
        if not cache:
            cache.append(parse(body))
        return upstream_call(provider, cache[0], cap, caps)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise GatewayError(ErrorKind.INVALID_REQUEST,
                           f"the request has a field of the wrong type or shape for translation to this model's "
                           f"{provider.protocol} upstream ({type(e).__name__}: {e}); check it against the API "
                           f"reference", code="invalid_request") from None


def usage_into_ctx(u: c.Usage, ctx: RequestContext) -> None:
    if not u.input_tokens and not u.output_tokens:  # the upstream reported none: unknown, never "0 tokens, $0"
        return
    ctx.usage.prompt_tokens = _count(u.input_tokens)
    ctx.usage.completion_tokens = _count(u.output_tokens)
    ctx.usage.cached_tokens = _count(u.cache_read)
    ctx.usage.cache_write_tokens = _count(u.cache_write)
    ctx.usage.reasoning_tokens = _count(u.reasoning)


def reported_at_cut(e: GatewayError, usage: c.Usage, ctx: RequestContext, lim: OutputLimit | None) -> None:
    """A stream cut at ``max_stream_bytes`` (``e``): the usage the upstream reported so far (an
    Anthropic ``message_start``'s prompt, a ``message_delta``'s or Gemini chunk's counts) goes into
    ``ctx.usage``, so the cut bills it and counts only what did not arrive (overrun.record_counted)."""
    if e.code == STREAM_TOO_LARGE_CODE and lim is not None:
        usage_into_ctx(usage, ctx)


def prompt_estimate(ctx: RequestContext) -> int:
    """The prompt's size before the upstream reports it (for Anthropic's ``message_start``): the
    reservation's count when it made one, else ceil(body bytes / 3) (no second tokenizer pass)."""
    known = ctx.prompt_estimate
    return known if isinstance(known, int) and known > 0 else math.ceil(len(ctx.raw_body) / 3)


def parsed_body(reply: UpstreamReply) -> dict[str, Any] | None:
    """A whole reply's body as a JSON object: the one the executor parsed when it checked the body
    (``UpstreamReply.parsed``), else parsed here; None when it is not a JSON object."""
    if reply.parsed is not None:
        return reply.parsed
    try:
        obj = orjson.loads(reply.body or b"")
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def reply_to_canonical(protocol: str, data: bytes, ctx: RequestContext, obj: Any = None) -> c.Response:
    """The canonical response from a whole reply; ``obj`` is its body already parsed, if it was."""
    if obj is None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {ctx.deployment} returned a body that is not JSON") from None
    if not isinstance(obj, dict):
        raise GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {ctx.deployment} returned an unexpected body")
    try:
        r = RESPONSE_TO_CANONICAL[protocol](obj)
    except (KeyError, TypeError, AttributeError, ValueError, GatewayError) as e:  # a 400 from a parser is the upstream's fault here
        raise _malformed(ctx, e) from None
    usage_into_ctx(r.usage, ctx)
    return r


ToDialect = Callable[[c.Response, str], dict[str, Any]]  # a dialect's response_from_canonical(r, public model)


def _whole(protocol: str, data: bytes, ctx: RequestContext, parsed: Any, lim: OutputLimit | None,
           to_dialect: ToDialect, public: str, flag: bool) -> tuple[bytes, int]:
    r = reply_to_canonical(protocol, data, ctx, parsed)
    if lim is not None and overran(lim, r.usage.output_tokens, len(data)):
        cut_canonical(r, lim, flag)
        return orjson.dumps(to_dialect(r, public)), r.usage.output_tokens
    return orjson.dumps(to_dialect(r, public)), 0


def whole_reply(ctx: RequestContext, protocol: str, reply: UpstreamReply, lim: OutputLimit | None,
                to_dialect: ToDialect, public: str) -> bytes | Awaitable[bytes]:
    """A whole upstream reply in the caller's dialect, cut at ``lim`` when the upstream ran past it:
    the bytes, or for a large reply an awaitable that translates it in a worker thread
    (:mod:`kaiyuan.offload`; no coroutine on the plain path)."""
    data = reply.body or b""
    if not big(len(data)):
        return _whole(protocol, data, ctx, reply.parsed, lim, to_dialect, public, True)[0]
    return _whole_off_loop(protocol, data, ctx, reply.parsed, lim, to_dialect, public)


async def _whole_off_loop(protocol: str, data: bytes, ctx: RequestContext, parsed: Any, lim: OutputLimit | None,
                          to_dialect: ToDialect, public: str) -> bytes:
    out, overrun = await asyncio.to_thread(_whole, protocol, data, ctx, parsed, lim, to_dialect, public, False)
    if overrun and lim is not None:
        lim.overrun(overrun)  # the deployment is flagged here, on the loop
    return out


def _malformed(ctx: RequestContext, e: Exception) -> GatewayError:
    return GatewayError(ErrorKind.UPSTREAM_ERROR,
                        f"upstream {ctx.deployment} sent a reply this gateway cannot read ({type(e).__name__}: {e})")


def _payload(ev: bytes) -> bytes | None:
    """The data of one SSE event (``data:`` lines joined), or None for comments / event-only."""
    if ev.startswith(b"data:"):
        if ev.find(b"\n") < 0:  # find, not `in` (docs/architecture.md, hot path)
            return ev[5:].strip()
    lines = [ln[5:].strip() for ln in ev.split(b"\n") if ln.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def _early(ctx: RequestContext, what: str) -> GatewayError:
    return GatewayError(ErrorKind.UPSTREAM_ERROR,
                        f"upstream {ctx.deployment} ended the stream early ({what}); the answer is incomplete")


# One event of a translated stream is parsed, translated and serialised on the event loop in one
# piece (orjson keeps the GIL, so a worker thread would not help): measured on a busy 2-core machine,
# a 5 MiB tool-argument delta held the loop 35-50 ms, 16 MiB 50-160 ms, 64 MiB 0.8-2 s. So a translated
# stream's events are limited to 8 MiB (pass-through events, only scanned, to sse_framer.MAX_EVENT_BYTES).
MAX_TRANSLATED_EVENT_BYTES = 8 * 1024 * 1024
_TRANSLATED_WHY = (": one event of a translated stream (the caller's API differs from the upstream's) is translated "
                   "in one piece on the gateway's event loop, so it may have at most that many bytes; ask for a model "
                   "whose upstream speaks the caller's API, or do not stream")


async def _objects(stream: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    async for events in sse_events(stream, MAX_TRANSLATED_EVENT_BYTES, _TRANSLATED_WHY):
        for ev in events:
            if len(ev) > MAX_TRANSLATED_EVENT_BYTES:  # it came whole, in one chunk
                raise event_too_large(MAX_TRANSLATED_EVENT_BYTES, _TRANSLATED_WHY)
            p = _payload(ev)
            if p is None or not p:
                continue
            if p == b"[DONE]":
                yield None
                continue
            try:
                yield orjson.loads(p)
            except orjson.JSONDecodeError:
                raise GatewayError(ErrorKind.UPSTREAM_ERROR, "upstream sent a stream event that is not JSON") from None


async def openai_chunks(protocol: str, stream: AsyncIterator[bytes], ctx: RequestContext, model: str,
                        include_usage: bool, lim: OutputLimit | None = None) -> AsyncIterator[dict[str, Any]]:
    """Any upstream stream as OpenAI chat chunks (dicts); raises on a broken, truncated or malformed
    stream (``lim``: the output limit, for billing a stream cut at ``max_stream_bytes``)."""
    try:
        async for ch in _openai_chunks(protocol, stream, ctx, model, include_usage, lim):
            yield ch
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise _malformed(ctx, e) from None


async def _openai_chunks(protocol: str, stream: AsyncIterator[bytes], ctx: RequestContext, model: str,
                         include_usage: bool, lim: OutputLimit | None) -> AsyncIterator[dict[str, Any]]:
    if protocol == "openai":
        done = False
        async for obj in _objects(stream):
            if obj is None:
                done = True
            elif isinstance(obj, dict):
                if obj.get("error"):
                    err = obj["error"]
                    msg = err.get("message") if isinstance(err, dict) else err
                    raise GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {ctx.deployment} sent an error mid-stream: {msg}")
                yield obj
        if not done:
            raise _early(ctx, "no 'data: [DONE]'")
        return
    tr = AnthropicToOpenAI(model, include_usage) if protocol == "anthropic" else GeminiToOpenAI(model, include_usage)
    try:
        async for obj in _objects(stream):
            if isinstance(obj, dict):
                for ch in tr.feed(obj):
                    yield ch
    except GatewayError as e:
        reported_at_cut(e, tr.usage, ctx, lim)
        raise
    if isinstance(tr, AnthropicToOpenAI):
        if not tr.done:
            raise _early(ctx, "no message_stop")
        usage_into_ctx(tr.usage, ctx)
        return
    if tr.reason is None:
        raise _early(ctx, "no finishReason")
    usage_into_ctx(tr.usage, ctx)
    for ch in tr.end():
        yield ch


async def relay_to_openai(request: web.Request, ctx: RequestContext, protocol: str, stream: AsyncIterator[bytes],
                          model: str, include_usage: bool, lim: OutputLimit | None = None) -> web.StreamResponse:
    """An Anthropic or Gemini upstream stream, to an OpenAI caller (cut at ``lim``)."""
    tail = bytearray() if ctx.capture_response else None  # trials: sampled requests

    async def pump(resp: web.StreamResponse) -> None:
        try:
            chunks = openai_chunks(protocol, stream, ctx, model, include_usage, lim)
            async for ch in capped_chunks(chunks, ctx, lim, include_usage):
                ctx.mark_first_byte()
                data = oc.chunk_bytes(ch)
                if tail is not None and len(tail) < MAX_CAPTURE:
                    tail.extend(data)
                await resp.write(data)
            await resp.write(DONE + b"\n\n")
        finally:
            if tail is not None:
                ctx.response_body = bytes(tail)

    return await relay(request, ctx, pump, openai_error_event, lim)


async def relay_to_anthropic(request: web.Request, ctx: RequestContext, protocol: str, stream: AsyncIterator[bytes],
                             model: str, lim: OutputLimit | None = None) -> web.StreamResponse:
    """An OpenAI-compatible or Gemini upstream stream, to an Anthropic caller (cut at ``lim``)."""
    return await _relay_translated(request, ctx, protocol, stream, model, lim, OpenAIToAnthropic(model, prompt_estimate(ctx)),
                                   b"".join, anth.stream_error_event)


async def _relay_translated(request: web.Request, ctx: RequestContext, protocol: str, stream: AsyncIterator[bytes],
                            model: str, lim: OutputLimit | None, tr: Any, encode: Callable[[list[Any]], bytes],
                            error_event: Any) -> web.StreamResponse:
    """The relay every translated stream shares: upstream chunks (cut at ``lim``) through the stream
    translator ``tr`` (``feed``/``end``/``usage``), each batch of its events written as ``encode`` makes
    them; a sampled request keeps the first MB of what it sent (trials)."""
    tail = bytearray() if ctx.capture_response else None

    async def pump(resp: web.StreamResponse) -> None:
        try:
            async for ch in capped_chunks(openai_chunks(protocol, stream, ctx, model, True, lim), ctx, lim, True):
                try:
                    out = tr.feed(ch)
                except (KeyError, TypeError, AttributeError, ValueError) as e:
                    raise _malformed(ctx, e) from None
                if out:
                    ctx.mark_first_byte()
                    data = encode(out)
                    if tail is not None and len(tail) < MAX_CAPTURE:
                        tail.extend(data)
                    await resp.write(data)
            await resp.write(encode(tr.end()))
            usage_into_ctx(tr.usage, ctx)
        finally:
            if tail is not None:
                ctx.response_body = bytes(tail)

    return await relay(request, ctx, pump, error_event, lim)


async def relay_anthropic_passthrough(request: web.Request, ctx: RequestContext, stream: AsyncIterator[bytes],
                                      lim: OutputLimit | None = None) -> web.StreamResponse:
    """An Anthropic upstream stream to an Anthropic caller: bytes as they arrive, usage read on the
    side, cut at ``lim`` (one token counted per content delta)."""
    tail = bytearray() if ctx.capture_response else None  # trials: sampled requests
    rename = ModelRenamer(ctx.model or "")

    async def pump(resp: web.StreamResponse) -> None:
        saw_stop = False
        usage = c.Usage()
        try:
            async for events in sse_events(stream):
                out: list[bytes] = []
                for ev in events:
                    if lim is not None and lim.over(anthropic_event_tokens(ev)):
                        await _cut_anthropic(resp, ctx, lim, ev, usage, b"".join(out))
                        return
                    if ev.find(b"message_st") >= 0 or ev.find(b"message_delta") >= 0 or ev.find(b"event: error") >= 0:
                        try:
                            usage, saw_stop = _anthropic_meta(ev, ctx, usage)
                        except (KeyError, TypeError, AttributeError, ValueError) as e:
                            raise _malformed(ctx, e) from None
                        if ev.find(b"event: error") >= 0:  # an upstream error event may echo its key
                            ev = scrub_bytes(ev)
                        elif ev.find(b"message_start") >= 0:
                            ev = rename(ev)
                    out.append(ev)
                    out.append(b"\n\n")
                    if saw_stop:
                        break
                ctx.mark_first_byte()
                data = b"".join(out)
                if tail is not None and len(tail) < MAX_CAPTURE:
                    tail.extend(data)
                if saw_stop:  # the answer is complete: finish now, not when the upstream closes
                    usage_into_ctx(usage, ctx)
                    await answered(resp, ctx, data)
                    break
                await resp.write(data)
        except GatewayError as e:
            reported_at_cut(e, usage, ctx, lim)
            raise
        finally:
            if tail is not None:
                ctx.response_body = bytes(tail)
        if not saw_stop:
            raise _early(ctx, "no message_stop")

    return await relay(request, ctx, pump, anth.stream_error_event, lim)


async def _cut_anthropic(resp: web.StreamResponse, ctx: RequestContext, lim: OutputLimit, ev: bytes,
                         usage: c.Usage, pending: bytes) -> None:
    """End a pass-through Anthropic stream at the cap: close the open block, then message_delta
    (stop_reason max_tokens, the output counted) and message_stop; the upstream is closed."""
    await close_upstream(ctx)
    p = _payload(ev)
    try:
        index = orjson.loads(p or b"{}").get("index", 0)
    except (orjson.JSONDecodeError, AttributeError):
        index = 0
    ctx.usage.prompt_tokens = usage.input_tokens or None
    _prompt, out = record_cut(ctx, lim, ctx.body)
    tail = [anth.sse("content_block_stop", {"type": "content_block_stop", "index": index}),
            anth.sse("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                       "usage": {"output_tokens": out}}),
            anth.sse("message_stop", {"type": "message_stop"})]
    ctx.mark_first_byte()
    await answered(resp, ctx, pending + b"".join(tail))


def _anthropic_meta(ev: bytes, ctx: RequestContext, usage: c.Usage) -> tuple[c.Usage, bool]:
    """Usage and end-of-stream out of one pass-through Anthropic event: (usage so far, stream over)."""
    p = _payload(ev)
    if not p:
        return usage, False
    try:
        obj = orjson.loads(p)
    except orjson.JSONDecodeError:
        raise GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {ctx.deployment} sent a stream event that is not JSON") from None
    kind = obj["type"]
    if kind == "message_start":
        return anth.usage_to_canonical(obj["message"].get("usage")), False
    if kind == "message_delta":
        delta = obj.get("usage") or {}
        merged = {**anth.usage_from_canonical(usage), **{k: v for k, v in delta.items() if v is not None}}
        return anth.usage_to_canonical(merged), False
    if kind == "error":
        ctx.status, ctx.error = 502, f"upstream {ctx.deployment} sent an error mid-stream"
    return usage, kind in ("message_stop", "error")


# -- entry points for the OpenAI handler (OpenAI callers, non-OpenAI upstreams) -------------------
def openai_call(provider: Provider, endpoint: str, body: dict[str, Any], cache: list[c.Request],
                cap: int | None = None, caps: OutputCaps | None = None) -> UpstreamCall:
    if endpoint != "chat":
        raise GatewayError(ErrorKind.INVALID_REQUEST,
                           f"this model's deployment {provider.id} speaks the {provider.protocol} protocol, which has "
                           f"no {endpoint} endpoint; use /v1/chat/completions", code="unsupported_endpoint")
    return translated_call(provider, oc.request_to_canonical, body, cache, cap, caps)


async def openai_reply(request: web.Request, ctx: RequestContext, provider: Provider, reply: UpstreamReply,
                       include_usage: bool, lim: OutputLimit | None = None) -> web.StreamResponse:
    public = ctx.model or ""
    if reply.stream is not None:
        ctx.status = 200
        return await relay_to_openai(request, ctx, provider.protocol, reply.stream, public, include_usage, lim)
    data = whole_reply(ctx, provider.protocol, reply, lim, oc.response_from_canonical, public)
    if not isinstance(data, bytes):
        data = await data
    ctx.status = reply.status
    ctx.mark_first_byte()
    if ctx.log_bodies or ctx.capture_response:  # trials: shadow-sampled requests
        ctx.response_body = data
    return web.Response(body=data, status=reply.status, content_type=JSON_CT, headers=kaiyuan_headers(ctx))


async def relay_to_gemini(request: web.Request, ctx: RequestContext, protocol: str, stream: AsyncIterator[bytes],
                          model: str, lim: OutputLimit | None = None) -> web.StreamResponse:
    """Any upstream stream, to a Gemini-dialect caller (``alt=sse``: ``data: <response>`` events),
    cut at ``lim``."""
    return await _relay_translated(request, ctx, protocol, stream, model, lim, GeminiOut(model),
                                   lambda out: b"".join(oc.chunk_bytes(o) for o in out), gemini_in.stream_error_event)
