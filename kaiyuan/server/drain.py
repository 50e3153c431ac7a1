"""Draining client connections on SIGTERM or a SIGHUP reload, so that no client request is dropped.

aiohttp's own shutdown (``AppRunner.cleanup``: ``Server.pre_shutdown``, then ``Server.shutdown``
with ``shutdown_timeout``) lets in-flight requests and streams finish, but it closes every idle
keep-alive connection at once, and the responses it lets finish still say keep-alive. A client that
sends its next request on such a connection as it is closed (or whose request is in the socket,
not yet read) sees a dropped connection: the HTTP/1.1 keep-alive race. A worker of
``kaiyuan serve --workers`` that drains has replacements accepting on the same listening socket,
so the race can be made as rare as HTTP allows:

1. the caller stops accepting first (closes its listening server): new connections go to the
   other workers, which share the socket;
2. :func:`begin`: from now on every response on this process's connections says
   ``Connection: close`` and its connection closes after it (a client such as httpx then opens a
   new connection, to a worker that is not draining). Requests not yet parsed get a request
   message marked ``should_close`` (each connection's request factory is swapped); a request in
   progress whose response has not begun is marked too. A response already under way (a whole
   body being written, a stream) said keep-alive: its connection stays open, and the client's
   next request on it is answered with ``Connection: close``;
3. :func:`connections`: for a short grace (``server.drain_idle_grace_s``, 2 s by default, at most
   ``server.shutdown_grace_s``) idle connections stay open, so a client that sends on one gets its
   answer, with ``Connection: close``; the grace ends early once every connection has closed;
4. then idle connections with nothing unread are closed (one that has bytes arriving is left to
   be answered), and aiohttp's shutdown waits for what is still in flight, up to
   ``server.shutdown_grace_s``.

What is left: a client that kept a connection idle through the whole grace and sends on it just as
it is closed (any server's idle timeout has the same race; the SDKs retry it). Nothing of this runs
on the request path: the swap happens once, at the drain. It reads aiohttp internals of
``RequestHandler`` (``_request_factory``, ``_request_in_progress``, ``_current_request``), as
:mod:`kaiyuan.server.connections` does; tests/test_drain.py fails if they change.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.web_protocol import RequestHandler

from kaiyuan.server.connections import ConnectionLimiter, idle, unread

POLL_S = 0.05
ARRIVING_TRIES = 20  # idle connections with a request arriving: looked at this many times, POLL_S apart


def _closing(factory: Any) -> Any:
    """aiohttp's request factory, making requests whose responses close their connection."""
    def make(message: Any, *args: Any) -> Any:
        return factory(message._replace(should_close=True), *args)

    return make


def begin(limiter: ConnectionLimiter) -> None:
    """Every response from now on says ``Connection: close`` and closes its connection after it."""
    server = limiter.server
    closing = _closing(server.request_factory)
    server.request_factory = closing
    for h in list(limiter.open):
        _close_after_response(h, closing)


def _close_after_response(h: RequestHandler, closing: Any) -> None:
    if h._request_factory is not None:
        h._request_factory = closing
    request = h._current_request
    if h._request_in_progress and request is not None:  # if its response has not begun, it says Connection: close
        request._message = request._message._replace(should_close=True)
    # A response already begun said keep-alive: closing its connection when it ends would race the
    # client's next request on it. The connection stays open; that next request is answered with
    # Connection: close (the swapped factory), or the connection is closed idle after the grace.


def _open(limiter: ConnectionLimiter) -> bool:
    return any(h.transport is not None for h in limiter.open)


def close_idle(limiter: ConnectionLimiter) -> int:
    """Close the idle connections with nothing unread; the number of idle ones with a request
    arriving (left open, to be answered)."""
    arriving = 0
    for h in list(limiter.open):
        if idle(h):
            if unread(h):
                arriving += 1
            else:
                h.force_close()
    return arriving


async def connections(limiter: ConnectionLimiter, grace_s: float) -> None:
    """Steps 2-4 of the module docstring (the caller has stopped accepting; aiohttp's shutdown
    follows)."""
    loop = asyncio.get_running_loop()
    begin(limiter)
    deadline = loop.time() + grace_s
    while _open(limiter) and loop.time() < deadline:  # noqa: ASYNC110 (no event says the last one closed)
        await asyncio.sleep(POLL_S)
    for _ in range(ARRIVING_TRIES):
        if not close_idle(limiter):
            return
        await asyncio.sleep(POLL_S)
