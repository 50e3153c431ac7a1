"""The deadline covers writing to the client too.

A client that stops reading used to hold its upstream connection open past ``timeouts.total``
(the relay waited on a full socket buffer, so nothing read the upstream either), and enough such
clients starved everyone else. Now a reply's ``deadline`` (``providers.http.post_json``: the start
of the call plus the deployment's ``timeouts.total``) bounds the whole relay of a stream and the
write of a whole body. Past it the client's connection is dropped (nothing more can be delivered
to it); a stream is logged as a 504 and the handler closes its upstream request (a whole body was
already read from the upstream, and the request recorded as answered, before it is written).
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from kaiyuan.context import RequestContext

MIN_WRITE_S = 1.0  # a whole body always gets at least this long to go out


def remaining(ctx: RequestContext, floor: float = 0.0) -> float | None:
    """Seconds left for this request's upstream call and relay; None when it has no deadline."""
    deadline = ctx.deadline
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), floor)


def abandon(request: web.Request, ctx: RequestContext) -> None:
    """The client did not take its answer in time: drop its connection and record why."""
    ctx.dropped = True  # the disconnect that follows is the gateway's doing, not a cancellation
    ctx.status = 504
    ctx.error = "the client did not read its answer within the deployment's timeouts.total; connection dropped"
    if request.transport is not None:
        request.transport.abort()


async def send_unblocked(request: web.Request, resp: web.StreamResponse) -> None:
    """Write a whole response now if the transport takes it without waiting on the client (else
    leave it to :func:`send_whole`). The pipeline calls this before settling and recording the
    request: the caller gets its answer without waiting for that bookkeeping (at concurrency 1
    it was on every request's critical path). Nothing in it can block, so no deadline is needed;
    the outcome recorded is the same, as a write that fails raises here like in ``send_whole``."""
    if not resp.prepared and _cannot_block(request, resp):
        await resp.prepare(request)
        await resp.write_eof()


async def send_whole(request: web.Request, resp: web.StreamResponse, ctx: RequestContext) -> web.StreamResponse:
    """Write a whole (non-streamed) response now, under the deadline (at least MIN_WRITE_S).

    The deadline is a plain timer that abandons the client (its write then fails), not an
    ``asyncio.timeout``: a small body is written without waiting, and the cancellation machinery
    cost more than the write itself on every request."""
    if ctx.deadline is None or resp.prepared:  # no deadline: aiohttp sends it; prepared: sent already
        return resp
    guard = asyncio.get_running_loop().call_later(remaining(ctx, MIN_WRITE_S) or MIN_WRITE_S, abandon, request, ctx)
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionResetError:
        if not ctx.dropped:
            raise
    finally:
        guard.cancel()
    return resp


HEAD_ROOM = 8192  # bytes allowed for the status line and headers


def _cannot_block(request: web.Request, resp: web.StreamResponse) -> bool:
    """True when writing ``resp`` whole cannot wait on the client: the transport buffers writes up
    to its high-water mark without pausing, and the body (a ``web.Response`` of known size) and its
    headers fit below it with what is buffered already. Then no timer is needed (on uvloop a timer
    costs about as much as the rest of the write)."""
    t = request.transport
    body = getattr(resp, "body", None)
    if t is None or not isinstance(body, bytes | bytearray):
        return False
    return t.get_write_buffer_size() + len(body) + HEAD_ROOM < t.get_write_buffer_limits()[1]
