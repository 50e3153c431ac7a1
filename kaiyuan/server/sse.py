"""Relaying an upstream OpenAI-format SSE stream to the client, event by event, as it arrives.

Usage, finish and error events are read on the side for accounting. A stream that breaks (the
upstream drops, stalls past the idle timeout, or ends without ``data: [DONE]``) ends the client's
stream with an error event, never a silent truncation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from kaiyuan.context import RequestContext
from kaiyuan.dialects.openai import stream_error_event, usage_into
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.server.common import kaiyuan_headers

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]"


async def sse_events(stream: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """Group raw chunks into complete SSE events (without their blank-line terminator)."""
    buf = b""
    async for chunk in stream:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        buf += chunk
        if b"\n\n" not in buf:
            continue
        *events, buf = buf.split(b"\n\n")
        ready = [e for e in events if e]
        if ready:
            yield ready
    if buf.strip():
        yield [buf]


async def open_stream(request: web.Request, ctx: RequestContext) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **kaiyuan_headers(ctx)})
    await resp.prepare(request)
    return resp


async def relay_openai_stream(
    request: web.Request, ctx: RequestContext, stream: AsyncIterator[bytes], strip_usage: bool
) -> web.StreamResponse:
    """Forward an OpenAI-protocol stream. ``strip_usage`` drops the usage-only final chunk that the
    gateway asked for on the caller's behalf (the caller did not set ``include_usage``)."""
    resp = await open_stream(request, ctx)
    saw_done = False
    tail = bytearray() if ctx.log_bodies or "capture_response" in ctx.extra else None
    try:
        async for events in sse_events(stream):
            out: list[bytes] = []
            for ev in events:
                if ev.startswith(DONE):
                    saw_done = True
                elif b'"usage":{' in ev or b'"usage": {' in ev or b'"error"' in ev:
                    if _inspect(ev, ctx) and strip_usage:
                        continue
                out.append(ev)
                out.append(b"\n\n")
            if out:
                data = b"".join(out)
                if tail is not None and len(tail) < 1_000_000:
                    tail += data
                ctx.mark_first_byte()
                await resp.write(data)
        if not saw_done and ctx.error is None:
            raise GatewayError(
                ErrorKind.UPSTREAM_ERROR,
                f"upstream {ctx.deployment} ended the stream early (no 'data: [DONE]'); the answer is incomplete",
            )
        ctx.status = ctx.status or 200
    except GatewayError as e:
        ctx.status, ctx.error = e.status, e.message
        await resp.write(stream_error_event(e))
    if tail is not None:
        ctx.response_body = bytes(tail)
    await resp.write_eof()
    return resp


def _inspect(ev: bytes, ctx: RequestContext) -> bool:
    """Read usage / errors out of one event. True when the event is a usage-only chunk."""
    payload = ev[5:] if ev.startswith(b"data:") else ev.split(b"data:", 1)[-1]
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(obj, dict):
        return False
    err = obj.get("error")
    if err:
        msg = err.get("message") if isinstance(err, dict) else str(err)
        ctx.status = 502
        ctx.error = f"upstream {ctx.deployment} sent an error mid-stream: {msg}"
        return False
    usage = obj.get("usage")
    if isinstance(usage, dict):
        usage_into(usage, ctx.usage)
        return not obj.get("choices")
    return False
