"""Shared pooled HTTP transport: one keep-alive aiohttp session per upstream, with the four timeouts.

Reply bodies are decoded and capped by :mod:`kaiyuan.providers.reply_body` (aiohttp's own
decompression is off: it would inflate a bomb whole before anything could count it)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from kaiyuan import __version__
from kaiyuan.codecs import UPSTREAM_ACCEPT
from kaiyuan.config import (
    DEFAULT_MAX_ERROR_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_STREAM_BYTES,
    Timeouts,
)
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.providers.base import ChunkStream, Provider, UpstreamCall, UpstreamReply
from kaiyuan.providers.reply_body import decoded_stream, read_whole, reply_decoder, stream_too_large

USER_AGENT = f"kaiyuan/{__version__}"


def make_session(max_connections: int, timeouts: Timeouts) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=max_connections, limit_per_host=max_connections, keepalive_timeout=60, ttl_dns_cache=300
    )
    # No sock_read here: aiohttp would apply it to the wait for the response headers too, cutting
    # a slow first byte at `idle`. first_byte is enforced around the request; idle is set on the
    # connection once a stream's headers are in (see post_json).
    timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.connect, sock_read=None)
    # Our own User-Agent, not aiohttp's; set here rather than skipped (skip_auto_headers puts every
    # request through aiohttp's slow header path).
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False,
        # only codings reply_body decodes piece by piece
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": UPSTREAM_ACCEPT},
    )


class IdleWatch:
    """The idle timeout of one stream: one timer, pushed back lazily.

    aiohttp's own ``read_timeout`` cancels and re-creates a loop timer on every chunk received
    (about 5 us each on uvloop, so 100 us or more for a 20-chunk stream). Here a chunk only records
    the time a read began; the one timer, when it fires, re-arms itself for what is left, or fails
    the read (``readany`` raises) when the gateway has waited ``idle`` seconds for the upstream. Time
    the gateway spends not reading (a slow client) is not the upstream's silence."""

    __slots__ = ("content", "handle", "idle", "last", "waiting")

    def __init__(self, content: aiohttp.StreamReader, idle: float) -> None:
        self.content = content
        self.idle = idle
        self.last = time.monotonic()  # when the current (or last) read began
        self.waiting = False
        self.handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(idle, self._check)

    def _check(self) -> None:
        left = self.last + self.idle - time.monotonic()
        if not self.waiting:
            left = self.idle
        if left > 0:
            self.handle = asyncio.get_running_loop().call_later(left, self._check)
            return
        self.handle = None
        self.content.set_exception(aiohttp.SocketTimeoutError("no data from the upstream within the idle timeout"))

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class UpstreamChunks(ChunkStream):
    """One upstream stream's body as it arrives, with every check inline in the one await per read:
    the idle timeout (:class:`IdleWatch`), the total deadline, and ``max_stream_bytes``
    (compressed streams: counted decoded too, by ``reply_body.decoded_stream``). A failed read
    closes the connection; the end of the body gives it back to the pool. A consumer that stops
    early leaves the reply to its owner, who closes or finishes it (``close`` / ``finish``)."""

    __slots__ = ("content", "deadline", "idle", "label", "limit", "pending", "resp", "watch")

    def __init__(self, resp: aiohttp.ClientResponse, deadline: float, idle: float, label: str,
                 limit: int = DEFAULT_MAX_STREAM_BYTES) -> None:
        super().__init__()
        self.resp = resp
        self.content = resp.content
        self.deadline = deadline
        self.idle = idle
        self.label = label
        self.limit = limit  # bytes the stream may send in all (max_stream_bytes)
        self.pending: bytes | None = None  # a chunk given back (unread), returned by the next read
        self.watch = IdleWatch(resp.content, idle)  # from the head on, at most `idle` seconds between two reads

    def unread(self, chunk: bytes) -> None:
        self.pending = chunk

    async def __anext__(self) -> bytes:
        if self.pending is not None:
            chunk, self.pending = self.pending, None
            return chunk
        watch = self.watch
        now = watch.last = time.monotonic()
        if now >= self.deadline:
            self.close()
            raise GatewayError(
                ErrorKind.UPSTREAM_TIMEOUT,
                f"upstream {self.label} exceeded its total time limit; raise timeouts.total if this is expected",
            )
        watch.waiting = True
        try:
            chunk = await self.content.readany()
        except BaseException as e:
            self.close()
            raise self._failure(e) from None
        watch.waiting = False
        if not chunk:
            watch.stop()
            self.resp.release()
            raise StopAsyncIteration
        self.received += len(chunk)
        if self.received > self.limit:
            self.close()
            raise stream_too_large(self.label, self.limit)  # closed: generation stops
        return chunk

    def _failure(self, e: BaseException) -> BaseException:
        if isinstance(e, (TimeoutError, aiohttp.ServerTimeoutError)):
            return GatewayError(ErrorKind.UPSTREAM_TIMEOUT,
                                f"upstream {self.label} sent nothing for {self.idle:g}s mid-stream (timeouts.idle)")
        if isinstance(e, aiohttp.ClientPayloadError):
            return GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {self.label} broke the stream: {e}")
        if isinstance(e, aiohttp.ClientError):
            return GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {self.label} connection failed mid-stream: {e}")
        return e  # cancelled (the client went away), or anything else: as it is

    def close(self) -> None:
        """Cancel the stream: the connection is closed (the upstream stops generating)."""
        self.watch.stop()
        self.resp.close()

    def finish(self) -> None:
        """The consumer has the final event: the connection goes back to the pool (:func:`finish_stream`)."""
        self.watch.stop()
        finish_stream(self.resp)


DRAIN_S = 1.0  # how long a finished stream may take to send the end of its body
_DRAINS: set[asyncio.Task[None]] = set()


def finish_stream(resp: aiohttp.ClientResponse) -> None:
    """The consumer has the stream's final event: give the connection back to the pool. What the
    upstream still sends (normally only the end of the chunked body, a moment later) is read in
    the background for up to DRAIN_S, so neither the client's answer nor the handler waits for it;
    a stream that does not end by then is closed."""
    if resp.connection is None or resp.content.is_eof():  # its end is already here: nothing to wait for
        resp.release()
        return
    task = asyncio.get_running_loop().create_task(_drain(resp))
    _DRAINS.add(task)
    task.add_done_callback(_DRAINS.discard)


async def _drain(resp: aiohttp.ClientResponse) -> None:
    try:
        async with asyncio.timeout(DRAIN_S):
            while await resp.content.readany():
                pass
    except BaseException:  # it did not end in time, broke, or the gateway is shutting down
        resp.close()
        return
    resp.release()


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeouts: Timeouts,
    stream: bool,
    label: str,
    max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    max_error_bytes: int = DEFAULT_MAX_ERROR_BYTES,
    max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
) -> UpstreamReply:
    """POST ``body``; return the whole body (at most ``max_bytes`` decoded; an error body cut at
    ``max_error_bytes``), or for 2xx streams an iterator of decoded chunks (``max_stream_bytes`` in all)."""
    start = time.monotonic()
    deadline = start + timeouts.total
    resp: aiohttp.ClientResponse | None = None
    try:
        async with asyncio.timeout(min(timeouts.first_byte, timeouts.total)):
            resp = await session.post(url, data=body, headers=headers)
            if not stream or resp.status >= 300:
                err = resp.status >= 300
                limit = min(max_bytes, max_error_bytes) if err else max_bytes
                # The body is read under the same timer: min(first_byte, total) from the start.
                data, cut = await read_whole(resp, limit, label, err)
                if cut:  # the rest of the error body is not read: its connection is closed, not drained
                    resp.close()
                else:
                    resp.release()
                return UpstreamReply(resp.status, resp.headers, body=data, deadline=deadline, truncated=cut)
            dec = reply_decoder(resp.headers, label)
    except GatewayError:
        if resp is not None:
            resp.close()
        raise
    except aiohttp.ConnectionTimeoutError:
        raise GatewayError(
            ErrorKind.UPSTREAM_TIMEOUT, f"could not connect to upstream {label} within {timeouts.connect:g}s (timeouts.connect)"
        ) from None
    except TimeoutError:
        if resp is not None:
            resp.close()
        raise GatewayError(
            ErrorKind.UPSTREAM_TIMEOUT,
            f"upstream {label} did not answer within {min(timeouts.first_byte, timeouts.total):g}s "
            f"(timeouts.first_byte)",
        ) from None
    except aiohttp.ClientConnectorError as e:
        raise GatewayError(
            ErrorKind.UPSTREAM_UNREACHABLE, f"cannot connect to upstream {label}: {e.os_error or e}"
        ) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as e:
        if resp is not None:
            resp.close()
        raise GatewayError(ErrorKind.UPSTREAM_UNREACHABLE, f"upstream {label} dropped the connection: {e}") from None
    except aiohttp.ClientError as e:
        if resp is not None:
            resp.close()
        raise GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream {label} request failed: {e}") from None
    except BaseException:
        if resp is not None:
            resp.close()
        raise
    r = resp
    chunks = UpstreamChunks(r, deadline, timeouts.idle, label, max_stream_bytes)
    return UpstreamReply(
        r.status, r.headers, stream=chunks if dec is None else decoded_stream(chunks, dec, max_stream_bytes, label),
        _closer=chunks.close, _finisher=chunks.finish, deadline=deadline,
    )


class PooledHTTPProvider(Provider):
    """A provider with one pooled keep-alive session, for the native vendor protocols."""

    def __init__(self, deployment: Any) -> None:
        super().__init__(deployment)
        self.cfg = deployment
        self._session: aiohttp.ClientSession | None = None
        self.label = f"{self.id} ({deployment.public_url})"

    async def start(self) -> None:
        if self._session is None:
            self._session = make_session(self.cfg.max_connections, self.cfg.timeouts)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def target(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        """URL and headers for ``call``."""
        raise NotImplementedError

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        if self._session is None:
            await self.start()
        assert self._session is not None
        url, headers = self.target(call)
        if call.headers:
            headers = {**headers, **call.headers}
        body = call.body_bytes if call.body_bytes is not None else orjson.dumps(call.body)
        return await post_json(self._session, url, body, headers, self.cfg.timeouts, call.stream, self.label,
                               self.cfg.max_response_bytes, self.cfg.max_error_bytes, self.cfg.max_stream_bytes)
