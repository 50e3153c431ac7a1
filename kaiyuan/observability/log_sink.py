"""With ``--workers N``, the request log is written by the supervisor, not by every worker.

Why: a request-log row cost each worker ~180,000 instructions per request (a sixth of a
pass-through's whole cost, bench/RESULTS.md), most of it SQLite inserting into the table and its
indexes in a thread that shares the worker's core and GIL with the event loop: the writer's
bursts showed in the p99 of requests at low load. And N workers appending to one SQLite file
took turns on its one write lock. Now each worker only builds its rows and ships them in batches
over a Unix socket (one ``orjson.dumps`` and one ``write`` per batch); the supervisor, which
serves no requests, is the one writer, with the same bounded :class:`~kaiyuan.store.batch_writer.BatchWriter`
(drops counted in ``kaiyuan_store_rows_dropped{writer="request_log"}``).

What a worker can lose: rows not yet shipped when it is SIGKILLed (at most ``SEND_INTERVAL_S`` of
them) and, when the supervisor does not keep up, rows beyond ``MAX_UNSENT_BYTES`` waiting in the
socket's buffer (dropped and counted, like a full queue). A worker that cannot reach the sink at
start writes its rows itself, as a single process does. The spend ledger is not shipped: money
stays with the process that reserved it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections import deque
from typing import Any

import orjson
from sqlalchemy import Engine

from kaiyuan.config import RequestLogSettings
from kaiyuan.context import RequestContext
from kaiyuan.observability.request_log import RequestLogWriter, row_for
from kaiyuan.store.batch_writer import WriterMetrics

log = logging.getLogger("kaiyuan.request_log")
ENV_LOG_SOCKET = "KAIYUAN_LOG_SOCKET"  # set by the supervisor for its workers
SEND_ROWS = 256  # a batch goes out when it has this many rows...
SEND_INTERVAL_S = 0.05  # ...or this long after its first row, whichever comes first
MAX_UNSENT_BYTES = 64 * 1024 * 1024  # a worker's bytes waiting for the supervisor to read; beyond: rows dropped
MAX_FRAME = 1024 * 1024 * 1024  # a frame with logged bodies can be large; this only refuses garbage
FLUSH_TIMEOUT_S = 60.0
_LEN = struct.Struct(">I")


def _frame(msg: list[Any]) -> bytes:
    body = orjson.dumps(msg)
    return _LEN.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader) -> list[Any]:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is over the limit")
    msg = orjson.loads(await reader.readexactly(n))
    if not (isinstance(msg, list) and msg and isinstance(msg[0], str)):
        raise ValueError("a frame is [op, ...]")
    return msg


# -- the supervisor's side ---------------------------------------------------------------------------
class LogSink:
    """The one request-log writer of a supervisor's workers, on a Unix socket.

    Frames: ``["rows", [row, ...]]`` (queued for the writer) and ``["flush"]`` (answered with
    ``["flushed", rows_written]`` once everything queued is written)."""

    def __init__(self, path: str, engine: Engine, settings: RequestLogSettings, metrics: WriterMetrics) -> None:
        self.path = path
        self.engine = engine
        self.log = RequestLogWriter(engine, settings, metrics)
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.log.start()
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop listening, read what the workers already sent (they have exited or are exiting), and
        write every queued row."""
        if self._server is not None:
            self._server.close()
            if self._handlers:
                await asyncio.wait(set(self._handlers), timeout=grace_s)
            for t in list(self._handlers):
                t.cancel()
        await self.log.close()
        self.engine.dispose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                msg = await _read(reader)
                if msg[0] == "rows" and len(msg) == 2 and isinstance(msg[1], list):
                    self.log.put_rows(msg[1])
                elif msg[0] == "flush":
                    writer.write(_frame(["flushed", await self.log.flush()]))
                else:
                    raise ValueError(f"unknown frame {msg[0]!r}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker is gone; everything it sent before is queued
        except Exception:
            log.exception("request-log sink: a worker sent a bad frame; closing its connection")
        finally:
            self._handlers.discard(task)
            writer.close()


# -- a worker's side -------------------------------------------------------------------------------
class RemoteRequestLog:
    """A worker's request log: rows are built here and written by the supervisor's :class:`LogSink`.
    Same interface as :class:`RequestLogWriter`; falls back to ``local`` when the sink cannot be
    reached at start."""

    def __init__(self, path: str, settings: RequestLogSettings, local: RequestLogWriter, metrics: WriterMetrics) -> None:
        self.path = path
        self.settings = settings
        self.local = local
        self._rows: list[dict[str, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._acks: deque[asyncio.Future[int]] = deque()
        self._lost = False
        self._last_log = 0.0
        self.m_dropped = metrics.dropped.labels("request_log")

    # -- the request path: no I/O but a non-blocking write per batch ---------------------------------
    def submit(self, ctx: RequestContext) -> None:
        if self._writer is None:
            self.local.submit(ctx)
            return
        if not self.settings.enabled:
            return
        row = row_for(ctx)
        self._rows.append(row)
        if len(self._rows) >= SEND_ROWS or row["request_body"] is not None or row["response_body"] is not None:
            self._send()  # a full batch, or a row with bodies (large): out now, frames stay small
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(SEND_INTERVAL_S, self._send)

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self._rows = self._rows, []
        w = self._writer
        if not rows or w is None:
            return
        if self._lost or w.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self.m_dropped.inc(len(rows))
            self._say("request-log sink %s; %d rows dropped",
                      "is gone" if self._lost else "is not keeping up", len(rows))
            return
        w.write(_frame(["rows", rows]))

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(self.path)
        except OSError as e:
            log.warning("request-log sink %s unreachable (%s); this worker writes its own rows", self.path, e)
            await self.local.start()
            return
        self._reader_task = asyncio.create_task(self._read_acks(reader), name="kaiyuan-log-sink-acks")

    async def flush(self) -> int:
        """Ship what is queued and wait until the supervisor has written everything it holds;
        returns the rows it wrote."""
        if self._writer is None:
            return await self.local.flush()
        self._send()
        if self._lost:
            return 0
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks.append(fut)
        self._writer.write(_frame(["flush"]))
        return await asyncio.wait_for(fut, FLUSH_TIMEOUT_S)

    async def close(self) -> None:
        w = self._writer
        if w is None:
            await self.local.close()
            return
        self._send()
        with contextlib.suppress(Exception):
            await w.drain()
        w.close()
        with contextlib.suppress(Exception):
            await w.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
        await self.local.close()

    @property
    def pending(self) -> int:
        return len(self._rows) + self.local.pending

    async def _read_acks(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await _read(reader)
                if msg[0] == "flushed" and self._acks:
                    fut = self._acks.popleft()
                    if not fut.done():
                        fut.set_result(int(msg[1]))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        self._lost = True
        while self._acks:
            fut = self._acks.popleft()
            if not fut.done():
                fut.set_result(0)

    def _say(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log >= 10.0:
            self._last_log = now
            log.error(msg, *args)


def shipped() -> bool:
    """In a supervisor's worker: its rows go to the supervisor, which also runs what reads the
    whole log (the console's hourly rollup), off the serving core."""
    return bool(os.environ.get(ENV_LOG_SOCKET))


def open_request_log(engine: Engine | None, settings: RequestLogSettings,
                     metrics: WriterMetrics) -> RequestLogWriter | RemoteRequestLog:
    """The process's request log: shipped to the supervisor's sink when it runs one (workers of
    ``kaiyuan serve --workers N``), else written here."""
    local = RequestLogWriter(engine, settings, metrics)
    path = os.environ.get(ENV_LOG_SOCKET)
    if path and engine is not None:
        return RemoteRequestLog(path, settings, local, metrics)
    return local
