"""Auto-pipelining: the Redis scripts of many concurrent requests share one write and one read.

Why: through redis-py's ``execute_command`` every command pays for the blocking pool, packing each
argument through its encoder, a write under a timer task, a timer per reply and the observability
hooks. At c=64 that made a Redis-backed key cost ~95% more instructions per request than the
pass-through, against ~25% for counters in process (bench/RESULTS.md, "Issue 13, keys and Redis").
Here the commands issued in one event-loop turn (the admits of every request that reached its
reservation in that turn, and the settle batches) are packed by one small function (their
arguments are ``str`` and ``int``), written together on one connection, and their replies read in
order under one timer. Each command is still its own EVALSHA, atomic on its own in Redis; a batch
only shares the socket. Nothing waits to fill a batch: a command goes out at the end of the turn
it was issued in, or, while a batch is out, in the next batch as soon as that one is answered.

Order: one batch is out at a time, on one connection, so Redis runs the commands in the order they
were issued. The settle batcher relies on it: an admit that counted a queued (not yet sent) parallel
release as free runs before the settle batch that applies it.

Errors keep redis-py's rules (its connection class and parser are used): an error reply (NOSCRIPT,
a script error) fails its own command only; a connection error (a connection a restarted Redis
dropped) disconnects and resends the commands not answered yet, twice at most, after the same
short backoff as the client's ``Retry``; a timeout (``timeout_s`` for the whole round trip) is not
retried, since the commands may have run, and fails every command not answered yet. A command whose
caller went away before it was sent is not sent; one whose caller went away after it was sent
hands its reply to the ``orphan`` callback given with it (RedisCounters gives such an admit's
reservation back). A batch is at most ``MAX_BATCH`` commands and the
queue ``MAX_QUEUE`` (beyond: :class:`PipelineFull`, and the caller sends its command the ordinary way).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

MAX_BATCH = 512  # commands per write
MAX_QUEUE = 10_000  # commands waiting for a batch
BACKOFF_S = (0.02, 0.04)  # before each resend after a connection error (so: two resends at most)

log = logging.getLogger("kaiyuan.limits")

Orphan = Callable[[Any], None]  # gets the reply of a command whose caller went away after it was sent
Pending = deque[tuple[bytes, "asyncio.Future[Any]", "Orphan | None"]]


class PipelineFull(Exception):
    """The queue is at MAX_QUEUE: send this command on its own."""


def pack_py(args: list[Any]) -> bytes:
    """One command in RESP: ``args`` are ``str`` (any text) or ``int``."""
    strs = [a if type(a) is str else str(a) if type(a) is int else str(int(a)) for a in args]
    body = "".join([f"${len(s)}\r\n{s}\r\n" for s in strs])
    if not body.isascii():  # lengths are in bytes: count each argument's UTF-8
        body = "".join([f"${len(s.encode())}\r\n{s}\r\n" for s in strs])
    return f"*{len(strs)}\r\n{body}".encode()


def _pack_hiredis(args: list[Any]) -> bytes:
    return _hiredis_pack(tuple(args))


try:  # hiredis (a dependency) packs in C, 3-5x faster than pack_py; the same bytes
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - an install without it
    pack = pack_py
else:
    pack = _pack_hiredis


class AutoPipeline:
    """Sends packed commands in batches on one connection of its own, made with ``redis``'s pool
    settings (``socket_timeout`` aside: ``timeout_s`` bounds each round trip); ``call`` returns
    one command's reply."""

    def __init__(self, redis: Redis, timeout_s: float) -> None:
        pool = redis.connection_pool
        self._conn: AbstractConnection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        self.timeout_s = timeout_s
        self._queue: Pending = deque()
        self._busy = False  # a task is sending (or about to send) batches
        self.batches = 0  # writes that carried commands (for tests and the bench)
        self.commands = 0

    async def call(self, packed: bytes, orphan: Orphan | None = None) -> Any:
        """Send ``packed`` with this turn's batch and return its reply. ``orphan``, if given, gets
        the reply instead when the caller went away after the command was written (it ran, or may
        have: an admit's reservation must then be given back)."""
        if len(self._queue) >= MAX_QUEUE:
            raise PipelineFull
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((packed, fut, orphan))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._start, loop)  # after this turn: the commands the turn issues join
        return await fut

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.create_task(self._run(), name="kaiyuan-redis-pipeline")

    async def _run(self) -> None:
        try:
            while self._queue:
                batch: Pending = deque()
                while self._queue and len(batch) < MAX_BATCH:
                    item = self._queue.popleft()
                    if not item[1].done():  # its caller went away before it was sent: not sent
                        batch.append(item)
                if batch:
                    await self._send(batch)
        finally:
            self._busy = False

    async def _send(self, batch: Pending) -> None:
        """Write ``batch`` and give each command its reply, resending after connection errors."""
        for delay in (*BACKOFF_S, None):
            try:
                await self._round_trip(batch)
                return
            except RedisConnectionError as e:
                if delay is None:
                    _fail(batch, e)
                    return
                await asyncio.sleep(delay)
            except Exception as e:
                _fail(batch, e)
                return
            except BaseException:  # cancelled (the loop is closing): the callers hear of it
                _fail(batch, RedisConnectionError("the Redis pipeline was stopped"))
                raise

    async def _round_trip(self, batch: Pending) -> None:
        conn = self._conn
        try:
            async with asyncio.timeout(self.timeout_s):  # one timer for the write and every reply
                await conn.send_packed_command(b"".join(item[0] for item in batch))  # connects first if needed
                self.batches += 1
                self.commands += len(batch)
                while batch:
                    await _read_one(conn, batch)
        except TimeoutError:  # redis-py disconnected on the cancellation: the next batch reconnects
            raise RedisTimeoutError("Timeout talking to Redis (a pipelined batch)") from None

    async def close(self) -> None:
        await self._conn.disconnect()


async def _read_one(conn: AbstractConnection, batch: Pending) -> None:
    try:
        reply: Any = await conn.read_response()
    except ResponseError as e:  # this command's error reply; the connection stays in step
        reply = e
    _p, fut, orphan = batch.popleft()
    if fut.done():  # its caller went away after the write
        if orphan is not None and not isinstance(reply, Exception):
            try:
                orphan(reply)
            except Exception:  # a bug there must not stop the batch
                log.exception("handling the reply of a Redis command whose caller went away failed")
        return
    if isinstance(reply, Exception):
        fut.set_exception(reply)
    else:
        fut.set_result(reply)


def _fail(batch: Pending, err: BaseException) -> None:
    for _p, fut, _o in batch:
        if not fut.done():
            fut.set_exception(err)
    batch.clear()
