"""Counters shared by the worker processes of one machine, with no Redis.

``kaiyuan serve --workers N`` runs N gateway processes on one listening socket. Limits and budgets
must hold across all of them, not per process, so the supervisor process keeps the one
:class:`~kaiyuan.limits.counters.MemoryCounters` and serves it on a private Unix socket
(:class:`CounterServer`); each worker talks to it through :class:`SharedCounters`, which has the
same interface as the in-process and Redis counters. An admit is one round trip on a local socket
and stays atomic (the server applies one message at a time, and ``MemoryCounters.admit_sync`` never
awaits). A settle is sent without waiting for an answer; messages on one connection are applied in
order.

The server also relays key invalidations (the admin API on one worker revokes a key; the others drop
it from their caches) and, when a worker dies, settles the tickets it still held at their full
reservation, so a crashed worker can leave a budget under-used but never overspent, and frees its
parallel slots.

Frames are a 4-byte big-endian length and an orjson body. Dataclasses travel as tagged lists of
their fields, and only the classes in ``_TYPES`` are accepted back: the socket lives in a 0700
directory of the supervisor's own, and nothing on it is ever executed or unpickled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import struct
from collections.abc import Callable
from typing import Any

import orjson

from kaiyuan.limits.counters import BudgetCheck, Denial, MemoryCounters, NeedSeed, RateCheck, Ticket

log = logging.getLogger("kaiyuan.limits")

_LEN = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
_TYPES: dict[str, type] = {"R": RateCheck, "B": BudgetCheck, "T": Ticket, "D": Denial, "N": NeedSeed}
_TAGS = {cls: tag for tag, cls in _TYPES.items()}
ENV_SOCKET = "KAIYUAN_SHARED_COUNTERS"  # set by the supervisor for its workers


class SharedCountersUnavailable(RuntimeError):
    """The supervisor's counter server cannot be reached: the worker fails closed."""


# -- encoding -------------------------------------------------------------------------------------
def _enc(v: Any) -> Any:
    tag = _TAGS.get(type(v))
    if tag is not None:
        return {"$": tag, "v": [_enc(getattr(v, f.name)) for f in dataclasses.fields(v)]}
    if isinstance(v, list | tuple):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {k: _enc(x) for k, x in v.items()}
    return v


def _dec(v: Any) -> Any:
    if isinstance(v, dict):
        tag = v.get("$")
        if isinstance(tag, str) and tag in _TYPES and isinstance(v.get("v"), list):
            return _TYPES[tag](*[_dec(x) for x in v["v"]])
        return {k: _dec(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def _frame(msg: Any) -> bytes:
    body = orjson.dumps(_enc(msg))
    return _LEN.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(_LEN.size)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is over the limit")
    return _dec(orjson.loads(await reader.readexactly(n)))


# -- the server (in the supervisor) ----------------------------------------------------------------
class CounterServer:
    """Serves one MemoryCounters to the workers on a Unix socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.counters = MemoryCounters()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ids = itertools.count(1)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: dict[int, Ticket] = {}  # this worker's admitted, unsettled tickets
        self._writers.add(writer)
        try:
            while True:
                msg = await _read(reader)
                reply = self._apply(msg, held, writer)
                if reply is not None:
                    writer.write(_frame(reply))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("shared counters: a worker sent a bad message; closing its connection")
        finally:
            self._writers.discard(writer)
            writer.close()
            self._release(held)

    def _apply(self, msg: list[Any], held: dict[int, Ticket], writer: asyncio.StreamWriter) -> list[Any] | None:
        op, rid, args = msg[0], msg[1], msg[2]
        c = self.counters
        if op == "admit":
            out = c.admit_sync(*args)
            if isinstance(out, Ticket):
                tid = next(self._ids)
                held[tid] = out
                out.shared_id = tid
            return [rid, out]
        if op == "settle":
            tid, actual, total = args
            ticket = held.pop(tid, None)
            if ticket is not None:
                c.settle_sync(ticket, actual, total)
            return None
        if op == "peek":
            sr = c.budgets.get(args[0])
            return [rid, [sr[0], sr[1]] if sr else None]
        if op == "invalidate":
            push = _frame(["invalidate", 0, args])
            for w in self._writers:
                if w is not writer:
                    w.write(push)
            return None
        raise ValueError(f"unknown operation {op!r}")

    def _release(self, held: dict[int, Ticket]) -> None:
        """A worker went away: its open tickets count as spent in full (never an overspend), and
        their parallel slots are freed."""
        for ticket in held.values():
            self.counters.settle_sync(ticket, [b.reserve for b in ticket.budgets], ticket.prompt_tokens)
        if held:
            log.warning("shared counters: a worker left with %d requests in flight; their reservations are "
                        "counted as spent", len(held))


# -- the client (in each worker) -------------------------------------------------------------------
class SharedCounters:
    """The Counters interface, backed by the supervisor's CounterServer."""

    name = "shared"

    def __init__(self, path: str, on_invalidate: Callable[[str | None], None] | None = None) -> None:
        self.path = path
        self.on_invalidate = on_invalidate
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    async def _conn(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._closed:
            raise SharedCountersUnavailable("the worker is shutting down")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    self._reader, self._writer = await asyncio.open_unix_connection(self.path)
                except OSError as e:
                    raise SharedCountersUnavailable(f"the counter server at {self.path} is unreachable: {e}") from e
                self._task = asyncio.create_task(self._listen(self._reader), name="kaiyuan-shared-counters")
            assert self._writer is not None
            return self._writer

    async def connect(self) -> None:
        """Connect now (the worker starts), so key invalidations reach it before its first limited request."""
        try:
            await self._conn()
        except SharedCountersUnavailable as e:
            log.error("%s", e)

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await _read(reader)
                if msg[0] == "invalidate":
                    if self.on_invalidate is not None:
                        self.on_invalidate(msg[2][0])
                    continue
                fut = self._pending.pop(msg[0], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg[1])
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
            self._fail(SharedCountersUnavailable(f"lost the counter server: {e or type(e).__name__}"))
        finally:
            if self._writer is not None:
                self._writer.close()
            self._writer = None

    def _fail(self, err: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()

    async def _call(self, op: str, args: list[Any]) -> Any:
        w = await self._conn()
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        w.write(_frame([op, rid, args]))
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> Ticket | Denial | NeedSeed:
        out = await self._call("admit", [rates, budgets, prompt_tokens, now])
        if isinstance(out, Ticket):
            out.backend = self.name
        return out

    def settle_later(self, ticket: Ticket, actual: list[int], total_tokens: int) -> bool:
        """Send the settle without awaiting anything (the request's last steps must not be a point
        where its cancellation could skip the ledger row); False when not connected."""
        tid = ticket.shared_id
        w = self._writer
        if tid is None:
            return True
        if w is None or w.is_closing():
            return False
        w.write(_frame(["settle", 0, [tid, actual, total_tokens]]))
        return True

    async def settle(self, ticket: Ticket, actual: list[int], total_tokens: int) -> None:
        if not self.settle_later(ticket, actual, total_tokens):
            w = await self._conn()
            w.write(_frame(["settle", 0, [ticket.shared_id, actual, total_tokens]]))

    async def peek_budget(self, counter: str) -> tuple[int, int] | None:
        out = await self._call("peek", [counter])
        return (int(out[0]), int(out[1])) if out else None

    async def publish_invalidation(self, key_hash: str | None) -> None:
        w = await self._conn()
        w.write(_frame(["invalidate", 0, [key_hash]]))

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            try:
                await self._writer.drain()
            except ConnectionError:
                pass
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
