"""A cap on open client connections, so that slow or idle ones cannot lock everyone out.

Slowloris: 1,100 half-sent requests used to hold every file descriptor the process had, and no
one else got in. Two rules now:

- **a request head must arrive in time**: aiohttp's keep-alive timer, set to
  ``server.header_timeout_s``, closes a connection that has not sent a whole request head within
  that time of opening (or of its previous response);
- **connections are capped below the open-file limit** (``server.max_connections``, default
  ``(RLIMIT_NOFILE - 64) // 2``: each busy client connection may hold one upstream connection
  too). At the cap, a new connection closes the *oldest idle* one: a connection that has waited
  for (or been receiving) a request head for at least :data:`GRACE_S`, with no request in
  progress. A real client sends its head at once and is never idle that long; an attacker's slow
  heads are what gets closed, and a fresh connection cannot be pushed out before its head had a
  chance to arrive. When no connection can be closed, the new one is refused with a plain 503 and
  ``Retry-After: 1`` (the SDKs retry it).

:class:`ConnectionLimiter` is the protocol factory given to ``loop.create_server`` in place of
aiohttp's ``web.Server`` (which it wraps). It reads two aiohttp internals of ``RequestHandler``
(``_waiter``, ``_messages``) to tell an idle connection from a busy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import resource
import struct
import termios
from collections import deque
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("kaiyuan.server")

FD_HEADROOM = 64  # descriptors kept for the database, log files, DNS and the listening socket
MIN_CONNECTIONS = 16
_FRESH_S = 1.0  # a handler whose connection is not made yet counts as open for this long
GRACE_S = 0.2  # an idle connection younger than this is not closed to make room
LINGER_S = 0.25  # a refused connection is closed after this at the latest
MAX_LINGERING = 64  # refused connections waiting to be closed; beyond, new ones are dropped at once
SWEEP_FLOOR = 1024  # handlers remembered before closed ones are first swept out (then: at twice the survivors)

_BUSY_BODY = (b'{"error": {"message": "the gateway has too many open connections; retry shortly", '
              b'"type": "service_unavailable", "code": "busy"}}')
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(_BUSY_BODY)) + _BUSY_BODY


def default_max_connections() -> int:
    """Half of what the open-file limit leaves after some headroom, and at least MIN_CONNECTIONS."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(MIN_CONNECTIONS, (soft - FD_HEADROOM) // 2)


class _Refused(asyncio.Protocol):
    """Answers 503 and closes once the client has sent its request head, or after LINGER_S (closing
    with the request unread would reset the connection before the client read the answer). At
    most MAX_LINGERING wait at once; beyond that the oldest is dropped."""

    lingering: deque[_Refused] = deque()  # process-wide, oldest first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(_Refused.lingering) >= MAX_LINGERING:
            _Refused.lingering.popleft().transport.abort()
        _Refused.lingering.append(self)
        transport.write(_BUSY)
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:  # the head is in; a body, if any, is dropped with the connection
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        with contextlib.suppress(ValueError):
            _Refused.lingering.remove(self)


def unread(h: RequestHandler) -> int:
    """Bytes the kernel holds for this connection that the loop has not read yet (FIONREAD)."""
    sock = h.transport.get_extra_info("socket") if h.transport is not None else None
    if sock is None:
        return 0
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", buf)[0])


def idle(h: RequestHandler) -> bool:
    """Waiting for a request head (none begun, or one half-sent), no request in progress."""
    waiter = h._waiter
    return h.transport is not None and waiter is not None and not waiter.done() and not h._messages


class ConnectionLimiter:
    """The protocol factory that enforces the cap (see the module docstring)."""

    def __init__(self, server: web.Server, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.limit = limit
        self.loop = loop
        self.open: dict[RequestHandler, float] = {}  # handler -> when it was made, oldest first
        self.grace = GRACE_S
        self.evicted = 0
        self.refused = 0
        self.sweep_at = SWEEP_FLOOR
        server.connection_lost = self._forget_then(server.connection_lost)  # type: ignore[method-assign]

    def _forget_then(self, lost: Callable[[RequestHandler, BaseException | None], None]) -> Callable[..., None]:
        """aiohttp's ``Server.connection_lost`` (every handler calls it when its connection closes),
        forgetting the handler first: a closed connection is not kept until the next sweep (the
        soak saw each one hold ~2 KiB for as long as the process ran below ``SWEEP_FLOOR``)."""
        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            self.open.pop(handler, None)
            lost(handler, exc)

        return connection_lost

    def __call__(self) -> asyncio.Protocol:
        # A closed connection forgets its handler (_forget_then); handlers that never got a
        # connection are swept out whenever the count doubles, not only at the cap: the cap is up
        # to half the open-file limit (500,000 with a high ulimit).
        if len(self.open) >= min(self.limit, self.sweep_at):
            self._prune()
            if len(self.open) >= self.limit and not self._evict_one():
                self.refused += 1
                if self.refused in (1, 100) or self.refused % 10_000 == 0:
                    log.warning("connection cap %d reached with every connection busy: refused %d so far "
                                "(server.max_connections)", self.limit, self.refused)
                return _Refused()
        h = self.server()
        self.open[h] = self.loop.time()
        return h

    def _prune(self) -> None:
        """Forget handlers whose connection is closed (a closed connection forgets itself; this
        catches a handler whose connection was never made). This walks them all, so it runs at
        the cap or when the count has doubled since the last sweep: O(1) per connection, amortized."""
        stale = self.loop.time() - _FRESH_S
        gone = [h for h, t in self.open.items() if h.transport is None and t < stale]
        for h in gone:
            del self.open[h]
        self.sweep_at = max(SWEEP_FLOOR, 2 * len(self.open))

    def _evict_one(self) -> bool:
        old_enough = self.loop.time() - self.grace
        for h, made in self.open.items():
            if made > old_enough:  # oldest first: the rest are younger still
                return False
            if idle(h) and not unread(h):  # unread bytes: its head is arriving, not idle
                del self.open[h]
                h.force_close()
                self.evicted += 1
                return True
        return False
