"""Shared pooled HTTP transport: one keep-alive aiohttp session per upstream, with the four timeouts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from kaiyuan import __version__
from kaiyuan.config import DEFAULT_MAX_RESPONSE_BYTES, Timeouts
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.providers.base import Provider, UpstreamCall, UpstreamReply


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
        connector=connector, timeout=timeout, auto_decompress=True, headers={"User-Agent": USER_AGENT}
    )


async def _iter_stream(
    resp: aiohttp.ClientResponse, deadline: float, idle: float, label: str
) -> AsyncIterator[bytes]:
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayError(
                    ErrorKind.UPSTREAM_TIMEOUT,
                    f"upstream {label} exceeded its total time limit; raise timeouts.total if this is expected",
                )
            try:
                chunk = await resp.content.readany()
            except (TimeoutError, aiohttp.ServerTimeoutError):
                raise GatewayError(
                    ErrorKind.UPSTREAM_TIMEOUT,
                    f"upstream {label} sent nothing for {idle:g}s mid-stream (timeouts.idle)",
                ) from None
            except aiohttp.ClientPayloadError as e:
                raise GatewayError(
                    ErrorKind.UPSTREAM_ERROR, f"upstream {label} broke the stream: {e}"
                ) from None
            except aiohttp.ClientError as e:
                raise GatewayError(
                    ErrorKind.UPSTREAM_ERROR, f"upstream {label} connection failed mid-stream: {e}"
                ) from None
            if not chunk:
                resp.release()
                return
            yield chunk
    except GeneratorExit:  # the consumer stopped: the reply's owner closes (or finishes) it
        raise
    except BaseException:
        resp.close()
        raise


DRAIN_S = 1.0  # how long a finished stream may take to send the end of its body
_DRAINS: set[asyncio.Task[None]] = set()


def finish_stream(resp: aiohttp.ClientResponse) -> None:
    """The consumer has the stream's final event: give the connection back to the pool. What the
    upstream still sends (normally only the end of the chunked body, a moment later) is read in
    the background for up to DRAIN_S, so neither the client's answer nor the handler waits for it;
    a stream that does not end by then is closed."""
    if resp.connection is None:  # read to its end already (aiohttp released it)
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
) -> UpstreamReply:
    """POST ``body``; return the whole body (at most ``max_bytes``), or for 2xx streams an iterator
    of raw chunks."""
    start = time.monotonic()
    deadline = start + timeouts.total
    resp: aiohttp.ClientResponse | None = None
    try:
        async with asyncio.timeout(min(timeouts.first_byte, timeouts.total)):
            resp = await session.post(url, data=body, headers=headers)
            if not stream or resp.status >= 300:
                data = await _read_all(resp, deadline, label, max_bytes)
                resp.release()
                return UpstreamReply(resp.status, resp.headers, body=data, deadline=deadline)
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
    proto = r.connection.protocol if r.connection is not None else None
    if proto is not None:  # from now on, at most `idle` seconds between two reads
        proto.read_timeout = timeouts.idle
        proto.start_timeout()
    return UpstreamReply(
        r.status, r.headers, stream=_iter_stream(r, deadline, timeouts.idle, label), _closer=r.close,
        _finisher=lambda: finish_stream(r), deadline=deadline,
    )


async def _read_all(resp: aiohttp.ClientResponse, deadline: float, label: str, max_bytes: int) -> bytes:
    remaining = deadline - time.monotonic()
    try:
        async with asyncio.timeout(max(remaining, 0.001)):
            length = resp.content_length
            if length is not None and "Content-Encoding" not in resp.headers:
                if length > max_bytes:
                    raise _too_large(label, max_bytes)
                return await resp.read()  # the common case: a known, allowed size
            chunks: list[bytes] = []  # chunked or compressed: count what arrives (decompressed)
            size = 0
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(label, max_bytes)
                chunks.append(chunk)
            return b"".join(chunks)
    except TimeoutError:
        raise GatewayError(
            ErrorKind.UPSTREAM_TIMEOUT, f"upstream {label} exceeded its total time limit (timeouts.total)"
        ) from None


def _too_large(label: str, max_bytes: int) -> GatewayError:
    return GatewayError(
        ErrorKind.UPSTREAM_ERROR,
        f"upstream {label} sent a reply body larger than this deployment's limit of {max_bytes} bytes "
        f"(max_response_bytes); raise max_response_bytes if such replies are expected",
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
                               self.cfg.max_response_bytes)
