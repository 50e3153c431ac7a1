"""Relaying an upstream OpenAI-format SSE stream to the client, event by event, as it arrives.

Usage, finish and error events are read on the side for accounting. A stream that breaks (the
upstream drops, stalls past the idle timeout, or ends without ``data: [DONE]``) ends the client's
stream with an error event, never a silent truncation.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import repeat

import orjson
from aiohttp import web

from kaiyuan.context import RequestContext
from kaiyuan.dialects.openai import stream_error_event, usage_into
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.providers.reply_body import STREAM_TOO_LARGE_CODE
from kaiyuan.redact import scrub, scrub_bytes
from kaiyuan.server.common import ModelRenamer, kaiyuan_headers
from kaiyuan.server.deadline import MIN_WRITE_S, abandon, remaining
from kaiyuan.server.overrun import (
    OutputLimit,
    close_upstream,
    openai_cut_events,
    openai_event_tokens,
    record_counted,
    record_cut,
)
from kaiyuan.server.sse_framer import SSEFramer

log = logging.getLogger("kaiyuan.server")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]"
DONE_FORMS = (DONE, b"data:[DONE]")
_NOTABLE_RE = re.compile(rb'"usage": ?\{|"error"')
SSE_FIELDS = (b"data:", b"event:", b":", b"id:", b"retry:")  # how every SSE line begins
MAX_CAPTURE = 1_000_000  # bytes of a relayed stream kept for the request log / trials


class HeadWithFirstEvents(web.StreamResponse):
    """An SSE response whose head goes out with its first events, in one write: aiohttp's
    StreamResponse otherwise writes the head alone (one more system call per stream, ~3% of a
    pass-through stream's CPU). Only for a relay whose first events follow at once (the OpenAI
    pass-through forwards the upstream's first chunk as it is); a translated stream may turn its
    first upstream events into nothing yet, and the client should not wait for the head meanwhile.
    (``web.Response`` buffers its head the same way; should aiohttp drop the flag, the head is
    simply written alone again.)"""

    _send_headers_immediately = False


async def open_stream(request: web.Request, ctx: RequestContext, head_with_first_events: bool = False) -> web.StreamResponse:
    kind = HeadWithFirstEvents if head_with_first_events else web.StreamResponse
    resp = kind(status=200, headers={**SSE_HEADERS, **kaiyuan_headers(ctx)})
    await resp.prepare(request)
    return resp


Pump = Callable[[web.StreamResponse], Awaitable[None]]
ErrorEvent = Callable[[GatewayError], bytes]


async def relay(request: web.Request, ctx: RequestContext, pump: Pump, error_event: ErrorEvent,
                lim: OutputLimit | None = None, head_with_first_events: bool = False) -> web.StreamResponse:
    """Open the client's SSE response, let ``pump`` write to it, and end it. A failure once the
    response has started becomes a last error event in the caller's dialect: a GatewayError with
    its own status, anything else (a bug) as a 500; never a second response in the stream. A
    stream cut at ``max_stream_bytes`` is billed what ``lim`` counted (:func:`overrun.record_counted`).
    ``head_with_first_events``: see :class:`HeadWithFirstEvents`. (The pump is awaited here, not
    in a helper coroutine: every level of the await chain is passed twice on each read's wake-up.)"""
    resp = await open_stream(request, ctx, head_with_first_events)
    try:  # the deadline covers writing to the client too (server.deadline)
        async with asyncio.timeout(remaining(ctx)):
            try:
                await pump(resp)
                last: bytes | None = b""
            except GatewayError as e:
                last = _failed(ctx, e, lim, error_event)
            except (ConnectionResetError, TimeoutError):  # the client went away / the deadline: the caller records it
                raise
            except Exception as e:
                log.exception("internal error mid-stream on %s", ctx.request_id)
                err = GatewayError(ErrorKind.INTERNAL, f"internal gateway error ({type(e).__name__}); request id "
                                                       f"{ctx.request_id}")
                last = _failed(ctx, err, None, error_event)
            if last is not None:
                await resp.write_eof(last)
    except TimeoutError:
        await _end_late(request, resp, ctx, error_event)
    return resp


def _failed(ctx: RequestContext, e: GatewayError, lim: OutputLimit | None, error_event: ErrorEvent) -> bytes | None:
    """The last event of a stream that failed mid-way (None: the client already has its whole answer)."""
    if ctx.answered:  # the client has its whole answer and its response is ended
        return None
    if e.code == STREAM_TOO_LARGE_CODE and lim is not None:
        record_counted(ctx, lim, ctx.prompt_body())
    ctx.status, ctx.error = e.status, e.message
    return error_event(e)


async def _end_late(request: web.Request, resp: web.StreamResponse, ctx: RequestContext, error_event: ErrorEvent) -> None:
    """The deadline passed (a slow upstream, or a client that does not read): end the stream with
    an error event if the client takes it within MIN_WRITE_S, else drop the client."""
    err = GatewayError(ErrorKind.UPSTREAM_TIMEOUT, f"the request to {ctx.deployment} exceeded its total time limit "
                                                   f"(timeouts.total); the answer is incomplete")
    ctx.status, ctx.error = err.status, err.message
    ctx.dropped = True  # however this write ends, the deadline ended the request (no 499)
    try:
        async with asyncio.timeout(MIN_WRITE_S):
            await resp.write(error_event(err))
            await resp.write_eof()
    except (TimeoutError, ConnectionResetError):
        abandon(request, ctx)


async def answered(resp: web.StreamResponse, ctx: RequestContext, last: bytes) -> None:
    """Send the last bytes of the answer and end the client's response in one write (a client that
    closes as soon as it sees the final event still finds its connection complete and reusable).
    The relay stops there: the upstream's own end is read in the background when the reply is
    closed (``providers.http.finish_stream``), and a client that hangs up now is no cancellation
    (see ``common.client_gone``)."""
    ctx.answered = True
    await resp.write_eof(last)


def relay_openai_stream(
    request: web.Request, ctx: RequestContext, stream: AsyncIterator[bytes], strip_usage: bool,
    lim: OutputLimit | None = None, rename: ModelRenamer | None = None,
) -> Awaitable[web.StreamResponse]:
    """Forward an OpenAI-protocol stream. ``strip_usage`` drops the usage-only final chunk that the
    gateway asked for on the caller's behalf (the caller did not set ``include_usage``), and the
    ``"usage": null`` that upstreams put on every other chunk once usage is asked for (the spec: the
    field is absent unless asked). An answer that runs past ``lim`` is cut there (see
    :mod:`kaiyuan.server.overrun`). ``rename`` rewrites each event's model name. Returns the relay
    to await (this function is no level of the await chain itself)."""
    tail = bytearray() if ctx.log_bodies or ctx.capture_response else None

    def edit(events: list[bytes]) -> bytes:
        """Events as the client gets them, each with its terminator. The events before the first
        usage or error event (nearly all of them) are edited together: null usages dropped and
        model names rewritten in one pass over their joined bytes (inside a JSON string a quote is
        escaped, so these byte patterns only match the events' own fields). From that event on,
        each is read and edited alone."""
        if len(events) == 1:
            data = events[0] + b"\n\n"
        elif events:
            data = b"\n\n".join(events) + b"\n\n"
        else:
            return b""
        u = data.find(b'"usage":')  # one search for both: a usage object (notable), a null usage (plain)
        at = notable(data, u)
        if at < 0:
            return plain(data, u >= 0)
        i, end = len(events), len(data)
        while end > at:  # back from the end (usage comes last) to the event that holds it
            i -= 1
            end -= len(events[i]) + 2
        out = [plain(data[:end], 0 <= u < end)] if end else []
        for ev in events[i:]:
            if _NOTABLE_RE.search(ev) is not None:  # usage or an error: read it
                if _inspect(ev, ctx) and strip_usage:
                    continue
                if ctx.error is not None:  # an upstream error event may echo its key
                    ev = scrub_bytes(ev)
            out.append(plain(ev + b"\n\n", ev.find(b'"usage":') >= 0))
        return b"".join(out)

    def plain(data: bytes, has_usage: bool) -> bytes:
        """Whole events without usage or errors (``has_usage``: a ``"usage":`` field among them):
        null usages dropped, model names rewritten."""
        if strip_usage and has_usage:
            data = drop_null_usage(data)
        return rename(data, -1) if rename is not None else data

    async def pump(resp: web.StreamResponse) -> None:
        # One await per read of the upstream (its reader does the timeouts and the byte cap) and a
        # plain call to frame it: no generator layer between the socket and the client's write.
        saw_done = ended = pending = False  # pending: the framer holds part of an event from a read
        framer = SSEFramer()
        feed = framer.feed
        read = stream.__aiter__().__anext__
        try:
            while not ended:
                try:
                    chunk = await read()
                except StopAsyncIteration:
                    events, ended = framer.end(), True
                else:
                    if not pending and one_plain_event(chunk) and (lim is None or lim.seen < lim.limit):
                        # The usual read of a stream that arrives as it is generated: forwarded as it
                        # came, renamed; the same bytes as the general path below, a few calls fewer.
                        if lim is not None:
                            lim.seen += openai_event_tokens(chunk)
                        data = rename(chunk, -1) if rename is not None else chunk
                        if tail is not None and len(tail) < MAX_CAPTURE:
                            tail.extend(data)
                        ctx.mark_first_byte()
                        await resp.write(data)
                        continue
                    events = feed(chunk)
                    pending = framer.pending()
                if not events:
                    continue
                i = first_stop(events, lim)
                if i < len(events):
                    ev = events[i]
                    if ev.startswith(DONE_FORMS):  # the space is optional in SSE
                        saw_done = True
                        events = events[:i]
                    elif not ev.startswith(SSE_FIELDS):
                        raise _not_sse(ev, ctx)
                    else:  # past the output limit (lim counted this event)
                        assert lim is not None
                        head = edit(events[:i])
                        await close_upstream(ctx)
                        usage = record_cut(ctx, lim, ctx.body)
                        cut = openai_cut_events(ev, lim, None if strip_usage else usage)
                        ctx.mark_first_byte()
                        await answered(resp, ctx, head + (rename(cut, -1) if rename is not None else cut))
                        return
                data = edit(events)
                if saw_done:
                    data += DONE + b"\n\n"
                if data:
                    if tail is not None and len(tail) < MAX_CAPTURE:
                        tail.extend(data)
                    ctx.mark_first_byte()
                    if saw_done:  # the answer is complete: finish now, not when the upstream closes
                        await answered(resp, ctx, data)
                        break
                    await resp.write(data)
        finally:
            if tail is not None:
                ctx.response_body = bytes(tail)
        if not saw_done and ctx.error is None:
            raise GatewayError(
                ErrorKind.UPSTREAM_ERROR,
                f"upstream {ctx.deployment} ended the stream early (no 'data: [DONE]'); the answer is incomplete",
            )
        ctx.status = ctx.status or 200

    return relay(request, ctx, pump, stream_error_event, lim, head_with_first_events=True)


_NULL_USAGE = (b',"usage":null', b', "usage": null', b'"usage":null,', b'"usage": null, ')
# any other spacing: the field and one comma beside it (a quote inside a JSON string is escaped,
# so only the event's own field matches)
_NULL_USAGE_ANY = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')


def drop_null_usage(events: bytes) -> bytes:
    """Whole events, each without its ``"usage": null``. The usual spellings are dropped with plain
    byte replaces, any other by a regex."""
    for pattern in _NULL_USAGE:  # an event has one usage field: once one form took it, the next finds none
        if events.find(pattern) >= 0:
            events = events.replace(pattern, b"")
    if events.find(b'"usage"') >= 0:
        events = _NULL_USAGE_ANY.sub(b"", events)
    return events


def upstream_error(ctx: RequestContext, message: object) -> None:
    """An upstream's error event mid-stream: the request's error (a 502), scrubbed of secrets (the
    message may echo the vendor key)."""
    ctx.status = 502
    ctx.error = scrub(f"upstream {ctx.deployment} sent an error mid-stream: {message}")


def notable(data: bytes, u: int | None = None) -> int:
    """Where ``data`` (one event or several) first shows a usage object or an error (the index), or
    -1. Two byte searches in the usual case: with no literal to start from, ``_NOTABLE_RE`` tries a
    match at every quote, which cost more than the searches on long data (bench/RESULTS.md "Issue
    13, fourth round") and, measured one event a read, on one event too ("streams round 6").
    ``u``: where ``data`` first has ``"usage":``, when the caller has searched already (-1: nowhere)."""
    e = data.find(b'"error"')
    end = len(data) if e < 0 else e
    if u is None:
        u = data.find(b'"usage":', 0, end)
    elif u >= end:  # only after the error: as if not there
        u = -1
    if u < 0:
        return e
    if data[u + 8:u + 9] == b"{" or data[u + 8:u + 10] == b" {":
        return u
    # a "usage": null first (some upstreams put one on every chunk): an object, if any, comes later
    found = [i for i in (data.find(b'"usage":{', u, end), data.find(b'"usage": {', u, end)) if i >= 0]
    return min(found) if found else e


_JSON_EVENT = b"data: {"  # how nearly every event of an OpenAI-protocol stream begins


def one_plain_event(chunk: bytes) -> bool:
    """``chunk`` is one whole JSON event, LF-framed, with no usage field or error in it: what the
    relay forwards as it is (renamed), with nothing to frame, check or edit."""
    return (chunk.startswith(_JSON_EVENT) and chunk.find(b"\n\n") == len(chunk) - 2 and chunk.find(b"\r") < 0
            and chunk.find(b'"usage":') < 0 and chunk.find(b'"error"') < 0)


def first_stop(events: list[bytes], lim: OutputLimit | None) -> int:
    """The index of the first event the relay must stop at: ``[DONE]``, a line that is not SSE, or
    the event that takes the answer past ``lim`` (counted into it, as every event before it is);
    ``len(events)`` when there is none. Each event counts at most one token, so a group with no
    more events than the limit has room for is counted in one pass with no per-event test; so is
    a group of plain JSON events (with a ``[DONE]`` last, the usual end)."""
    n = len(events)
    body = events[:-1] if events[-1].startswith(DONE_FORMS) else events
    k = len(body)
    if sum(map(bytes.startswith, body, repeat(_JSON_EVENT))) == k:  # no [DONE] nor a non-SSE line among them
        if lim is None:
            return k
        if k <= lim.limit - lim.seen:
            lim.seen += sum(map(openai_event_tokens, body))
            return k
    for i, ev in enumerate(events):  # the exact walk
        if ev.startswith(DONE_FORMS) or not ev.startswith(SSE_FIELDS):
            return i
        if lim is not None and lim.over(openai_event_tokens(ev)):
            return i
    return n


def _not_sse(ev: bytes, ctx: RequestContext) -> GatewayError:
    text = ev[:200].decode("utf-8", "replace").strip()
    return GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {ctx.deployment} answered the stream request with "
                                                  f"something that is not an SSE stream: {text!r}")


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
        upstream_error(ctx, err.get("message") if isinstance(err, dict) else err)
        return False
    usage = obj.get("usage")
    if isinstance(usage, dict):
        usage_into(usage, ctx.usage)
        return not obj.get("choices")
    return False
