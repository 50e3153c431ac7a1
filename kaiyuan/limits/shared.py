"""Counters shared by the worker processes of one machine, with no Redis.

``kaiyuan serve --workers N`` runs N gateway processes on one listening socket. Limits and budgets
must hold across all of them, not per process, so the supervisor process keeps the one
:class:`~kaiyuan.limits.counters.MemoryCounters` and serves it on a private Unix socket
(:class:`CounterServer`); each worker talks to it through :class:`SharedCounters`, which has the
same interface as the in-process and Redis counters. An admit is one round trip on a local socket
and stays atomic (the server applies one message at a time, and ``MemoryCounters.admit_sync`` never
awaits). The frames a worker buffers in one event-loop tick (at high concurrency many requests
reach their admit in the same tick) go out in one write at its end, and the supervisor answers all
it read in one write. A settle is sent without waiting for an answer, with the next tick's admits
(or after ``SETTLE_DELAY_S`` at the latest); messages on one connection are applied in order, so the
reservation a settle releases is never counted twice, and until it is applied it is still held
(late, never short).

Most keyed admits make no round trip: with an admit the supervisor grants the worker slices of the
key's limits and budgets, which the worker then admits from on its own (:mod:`kaiyuan.limits.lease`
has the rules that keep them exact); keys with a parallel-request limit always take the round trip.

The server also relays key invalidations (the admin API on one worker revokes a key; the others drop
it from their caches) and, when a worker dies, settles the tickets it still held at their full
reservation, so a crashed worker can leave a budget under-used but never overspent, and frees its
parallel slots.

Frames are a 4-byte big-endian length and an orjson body: a short list whose first item says what
it is (see "the messages" below). The checks travel as lists of their fields in a fixed order and
an admit is answered with the ticket's number and minute only (the worker keeps its own checks):
each side is an asyncio ``Protocol`` that splits frames as bytes arrive, with no stream reader and
no task switch per message. The socket lives in a 0700 directory of the supervisor's own; a frame
that does not parse, or is not one of the messages, closes its connection; nothing on it is ever
executed or unpickled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kaiyuan.limits import lease
from kaiyuan.limits.counters import BudgetCheck, Denial, MemoryCounters, NeedSeed, RateCheck, Ticket
from kaiyuan.limits.frames import Frames, frame
from kaiyuan.limits.lease import Held, Returns, Slices

log = logging.getLogger("kaiyuan.limits")

SETTLE_DELAY_S = 0.002  # a settle waits at most this long for the next admit's write to ride with
RECALL_WAIT_S = 0.5  # an admit waits at most this long for recalled slices (a stalled worker), then is decided
REPORT_DELAY_S = 0.02  # leased settles are reported within this (their cost is held as reserved until then)
MAX_HELD_SETTLES = 256  # settles buffered at most; then they are written at once
ENV_SOCKET = "KAIYUAN_SHARED_COUNTERS"  # set by the supervisor for its workers

# -- the messages -----------------------------------------------------------------------------------
# worker -> supervisor:
#   ["a", rid, [[scope, rpm, tpm, max_parallel], ...], [[counter, limit, seed, reserve, ttl_s], ...], prompt_tokens, now, want]
#       (want: 1 = grant slices with the admit, see limits/lease.py; absent = 0)
#   ["s", ticket number, actual (nano-USD per budget), total tokens]           (no answer)
#   ["u", [[counter, cost, taken], ...], [[scope, minute, tokens], ...]]       leased requests settled (no answer)
#   ["r", recall id or 0, [[counter, nano]], [[scope, minute, requests]], [[scope, minute, tokens]]]  slices returned
#   ["g", rid, rates, budgets, prompt_tokens, now]                             more slices, no admit (answered as admitted, ticket 0)
#   ["p", rid, counter]                                                        (peek at a budget)
#   ["i", key hash or null]                                                    (relay an invalidation)
# supervisor -> worker: answers start with their rid (> 0), pushes with 0:
#   [rid, 0, ticket number, minute(, [[rpm slice per rate], [tpm slice per rate], [nano per budget]])]  admitted
#   [rid, 1, kind, index, current, reserved]  refused      [rid, 2, index]  seed needed
#   [rid, spent, reserved] / [rid, null]  peek             [0, key hash or null]  drop a cached key
#   [0, null, recall id]  return every slice now (another worker's admit waits for them)
ADMITTED, REFUSED, NEED_SEED = 0, 1, 2


class SharedCountersUnavailable(RuntimeError):
    """The supervisor's counter server cannot be reached: the worker fails closed."""


# -- the server (in the supervisor) ----------------------------------------------------------------
class CounterServer:
    """Serves one MemoryCounters to the workers on a Unix socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.counters = MemoryCounters()
        self._server: asyncio.base_events.Server | None = None
        self.conns: set[_WorkerConn] = set()
        self.ids = itertools.count(1)
        self.reads = 0  # reads from the workers, and the messages they carried (what one write carries)
        self.messages = 0
        self.recalls = itertools.count(1)
        self.deferred: dict[int, _Deferred] = {}  # admits waiting for other workers' slices to come back

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _WorkerConn(self), path=self.path)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for c in list(self.conns):
                if c.transport is not None:
                    c.transport.close()
            await self._server.wait_closed()

    def admit(self, conn: _WorkerConn, msg: list[Any], recall: bool = True) -> bytes | None:
        """Answer an admit (with slices when asked); None when it waits for a recall (see _defer)."""
        rid, rates_l, budgets_l, prompt_tokens, now = msg[1:6]
        rates = [RateCheck(*r) for r in rates_l]
        budgets = [BudgetCheck(*b) for b in budgets_l]
        c = self.counters
        out = c.admit_sync(rates, budgets, prompt_tokens, now)
        if isinstance(out, Ticket):
            tid = next(self.ids)
            conn.held[tid] = out
            if recall and len(msg) > 6 and msg[6]:  # a decision after a recall grants nothing (near a limit)
                g = lease.grant(c, conn.leases, rates, budgets, prompt_tokens, out.minute, len(self.conns))
                return frame([rid, ADMITTED, tid, out.minute, g])
            return frame([rid, ADMITTED, tid, out.minute])
        if isinstance(out, Denial):
            if recall and self._defer(conn, msg, out, rates, budgets):
                return None
            return frame([rid, REFUSED, out.kind, out.index, out.current, out.reserved])
        return frame([rid, NEED_SEED, out.index])

    def _defer(self, conn: _WorkerConn, msg: list[Any], d: Denial, rates: list[RateCheck],
               budgets: list[BudgetCheck]) -> bool:
        """The limit that refused ``msg`` may be parked in workers' slices (the asking worker's too:
        admits it sent before its slices came): recall them, and decide once they are back (True).
        False: no one holds any, the refusal stands."""
        if d.kind == "budget":
            mark = "b:" + budgets[d.index].counter
        elif d.kind in ("rpm", "tpm"):
            mark = ("r:" if d.kind == "rpm" else "t:") + rates[d.index].scope
        else:
            return False
        holders = [h for h in self.conns if mark in h.leases.marks and h.writable()]
        if not holders:
            return False
        rid = next(self.recalls)
        self.deferred[rid] = _Deferred(conn, msg, {h: h.leases.serial for h in holders})
        asyncio.get_running_loop().call_later(RECALL_WAIT_S, self.decide, rid)
        push = frame([0, None, rid])
        for h in holders:
            if h is conn:  # after the answers to this read, which may carry the slices it recalls
                conn.out.append(push)
            else:  # another worker's answers are all written (one read at a time)
                h.transport.write(push)  # type: ignore[union-attr]  # writable() checked it
        return True

    def recalled(self, rid: int, conn: _WorkerConn) -> None:
        """``conn`` returned its slices for recall ``rid`` (or went away): decide the admit that
        waited, once every worker asked has answered."""
        d = self.deferred.get(rid)
        if d is None:
            return
        upto = d.waiting.pop(conn, None)
        if upto is not None:
            conn.leases.recalled(upto)
        if not d.waiting:
            self.decide(rid)

    def decide(self, rid: int) -> None:
        """Answer the admit that waited for recall ``rid``, with what has come back by now."""
        d = self.deferred.pop(rid, None)
        if d is not None and d.conn.writable():
            answer = self.admit(d.conn, d.msg, recall=False)
            assert answer is not None
            d.conn.transport.write(answer)  # type: ignore[union-attr]

    def gone(self, conn: _WorkerConn) -> None:
        """``conn`` closed: admits it waited on no longer wait for it; its own are dropped."""
        for rid, d in list(self.deferred.items()):
            if d.conn is conn:
                del self.deferred[rid]
            elif conn in d.waiting:
                self.recalled(rid, conn)

    def release(self, held: dict[int, Ticket]) -> None:
        """A worker went away: its open tickets count as spent in full (never an overspend), and
        their parallel slots are freed."""
        for ticket in held.values():
            self.counters.settle_sync(ticket, [b.reserve for b in ticket.budgets], ticket.prompt_tokens)
        if held:
            log.warning("shared counters: a worker left with %d requests in flight; their reservations are "
                        "counted as spent", len(held))


@dataclass(slots=True)
class _Deferred:
    conn: _WorkerConn  # the worker whose admit waits
    msg: list[Any]  # its "a" message
    waiting: dict[_WorkerConn, int]  # the workers asked to return their slices, not answered yet (and
    # their last grant when asked: a grant after it is not part of what they return)


class _WorkerConn(Frames):
    """One worker's connection to the counter server, the tickets it holds and its slices."""

    def __init__(self, server: CounterServer) -> None:
        super().__init__()
        self.server = server
        self.held: dict[int, Ticket] = {}  # this worker's admitted, unsettled tickets
        self.leases = Held({}, {})  # what it holds in slices (limits/lease.py)
        self.out: list[bytes] = []

    def writable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        held, self.held = self.held, {}
        self.server.release(held)
        lease.lost(self.server.counters, self.leases)
        self.server.gone(self)

    def data_received(self, data: bytes) -> None:
        self.server.reads += 1
        super().data_received(data)
        if self.out and self.writable():  # every answer to this read in one write
            self.transport.write(b"".join(self.out))  # type: ignore[union-attr]  # writable() checked it
        self.out.clear()

    def bad(self, e: Exception) -> None:
        log.error("shared counters: a worker sent a bad message (%s); closing its connection", e)
        if self.transport is not None:
            self.transport.close()

    def on_message(self, msg: list[Any]) -> None:
        op = msg[0]
        self.server.messages += 1
        c = self.server.counters
        if op == "a":
            answer = self.server.admit(self, msg)
            if answer is not None:
                self.out.append(answer)
        elif op == "s":
            _op, tid, actual, total = msg
            ticket = self.held.pop(tid, None)
            if ticket is not None:
                c.settle_sync(ticket, actual, total)
        elif op == "g":  # slices asked for ahead of need: answered like an admit with ticket number 0
            _op, rid, rates, budgets, prompt_tokens, now = msg
            minute = int(now // 60)
            g = lease.grant(c, self.leases, [RateCheck(*r) for r in rates], [BudgetCheck(*b) for b in budgets],
                            prompt_tokens, minute, len(self.server.conns))
            self.out.append(frame([rid, ADMITTED, 0, minute, g]))
        elif op == "u":
            lease.used(c, self.leases, msg[1], msg[2])
        elif op == "r":
            _op, rid, budgets, rpm, tpm = msg
            lease.give_back(c, self.leases, budgets, rpm, tpm)
            if rid:  # a recall's answer
                self.server.recalled(rid, self)
        elif op == "p":
            sr = c.budgets.get(msg[2])
            self.out.append(frame([msg[1], sr[0], sr[1]] if sr else [msg[1], None]))
        elif op == "i":
            push = frame([0, msg[1]])
            for other in self.server.conns:
                if other is not self and other.writable():
                    other.transport.write(push)  # type: ignore[union-attr]  # writable() checked it
        else:
            raise ValueError(f"unknown operation {op!r}")


# -- the client (in each worker) -------------------------------------------------------------------
class _ServerConn(Frames):
    """A worker's end: answers resolve their futures, pushes go to ``on_invalidate``."""

    def __init__(self, client: SharedCounters) -> None:
        super().__init__()
        self.client = client

    def on_message(self, msg: list[Any]) -> None:
        rid = msg[0]
        if rid == 0:
            self.client.pushed(msg)
            return
        self.client.answered(rid, msg)

    def bad(self, e: Exception) -> None:
        log.error("shared counters: a bad message from the counter server (%s); reconnecting", e)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self, exc)


class SharedCounters:
    """The Counters interface, backed by the supervisor's CounterServer."""

    name = "shared"

    def __init__(self, path: str, on_invalidate: Callable[[str | None], None] | None = None) -> None:
        self.path = path
        self.on_invalidate = on_invalidate
        self.pending: dict[int, asyncio.Future[list[Any]]] = {}
        self._conn: _ServerConn | None = None
        self._ids = itertools.count(1)
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        self._out: list[bytes] = []  # frames not written yet, in order (see _send and settle_later)
        self._tick: asyncio.Handle | None = None  # the flush at the end of this loop tick (an admit is buffered)
        self._settle_timer: asyncio.TimerHandle | None = None  # the flush of settles alone (SETTLE_DELAY_S)
        self.slices = Slices()  # what this worker may admit on its own (limits/lease.py)
        self._asks: dict[int, tuple[list[RateCheck], list[BudgetCheck]]] = {}  # admits awaiting an answer with slices
        self._wanting: set[str] = set()  # keys (first scope or counter) with such an admit in flight
        self._sweep: asyncio.TimerHandle | None = None  # returns idle slices every lease.IDLE_S

    def _open(self) -> asyncio.Transport | None:
        c = self._conn
        t = c.transport if c is not None else None
        return t if t is not None and not t.is_closing() else None

    async def _transport(self) -> asyncio.Transport:
        t = self._open()
        if t is not None:
            return t
        if self._closed:
            raise SharedCountersUnavailable("the worker is shutting down")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            t = self._open()
            if t is None:
                try:
                    _t, conn = await asyncio.get_running_loop().create_unix_connection(lambda: _ServerConn(self), self.path)
                except OSError as e:
                    raise SharedCountersUnavailable(f"the counter server at {self.path} is unreachable: {e}") from e
                self._conn = conn
                t = self._open()
                if t is None:
                    raise SharedCountersUnavailable(f"the counter server at {self.path} closed the connection at once")
            return t

    async def connect(self) -> None:
        """Connect now (the worker starts), so key invalidations reach it before its first limited request."""
        try:
            await self._transport()
        except SharedCountersUnavailable as e:
            log.error("%s", e)

    def lost(self, conn: _ServerConn, exc: Exception | None) -> None:
        """The connection closed: every answer still awaited fails (the requests fail closed)."""
        if conn is self._conn:
            self._conn = None
            self._drop_buffered()
            self.slices.lost()
            self._asks.clear()
        err = SharedCountersUnavailable(f"lost the counter server: {exc or 'connection closed'}")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(err)
        self.pending.clear()

    async def _call(self, msg: list[Any], ask: tuple[list[RateCheck], list[BudgetCheck]] | None = None) -> list[Any]:
        await self._transport()
        rid = next(self._ids)
        msg[1] = rid
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        if ask is not None:
            self._asks[rid] = ask
        self._send(frame(msg))
        try:
            return await fut
        finally:
            self.pending.pop(rid, None)
            self._asks.pop(rid, None)

    def answered(self, rid: int, msg: list[Any]) -> None:
        """An answer arrived: the slices an admit brings are taken at once, before any message
        after it (a recall of them) is read."""
        ask = self._asks.pop(rid, None)
        if ask is not None and msg[1] == ADMITTED and len(msg) > 4:
            back = Returns([], [], [])
            self.slices.take_grants(ask[0], ask[1], msg[3], msg[4], time.monotonic(), back)
            self._give(back, 0)
            if self.slices and self._sweep is None:
                self._sweep = asyncio.get_running_loop().call_later(lease.IDLE_S, self._return_idle)
        fut = self.pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def admit_leased(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int,
                     now: float) -> Ticket | None:
        """A ticket from this worker's slices, decided now with no round trip; None: call :meth:`admit`."""
        slices = self.slices
        if not slices:
            return None
        t = slices.admit(rates, budgets, prompt_tokens, now, time.monotonic())
        if slices.refill:  # a slice is below half its last grant: ask for more before it runs out
            slices.refill = False
            self._refill(rates, budgets, prompt_tokens, now)
        return t

    def _refill(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> None:
        """Ask for more slices of these checks without an admit (one such ask per key at a time)."""
        ask = _ask_key(rates, budgets)
        if ask in self._wanting or self._open() is None:
            return
        self._wanting.add(ask)
        call = self._call(["g", 0, *_on_wire(rates, budgets), prompt_tokens, now], (rates, budgets))
        task = asyncio.get_running_loop().create_task(call)
        def done(t: asyncio.Task[list[Any]]) -> None:
            self._wanting.discard(ask)
            if not t.cancelled():
                t.exception()  # retrieved: a lost connection fails it, and nothing waits for it

        task.add_done_callback(done)

    async def admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> Ticket | Denial | NeedSeed:
        """The round trip: what is left of this request's own slices goes back first (so parked
        headroom never refuses it), and an admit brings new slices with it, one such admit per key
        at a time (so a burst that found the slices empty does not park one slice per request)."""
        await self._transport()
        if self.slices:
            back = Returns([], [], [])
            self.slices.give_back(rates, budgets, back)
            self._give(back, 0)
        ask = _ask_key(rates, budgets)
        want = ask not in self._wanting
        if want:
            self._wanting.add(ask)
        try:
            out = await self._call(["a", 0, *_on_wire(rates, budgets), prompt_tokens, now, int(want)],
                                   (rates, budgets) if want else None)
        finally:
            if want:
                self._wanting.discard(ask)
        kind = out[1]
        if kind == ADMITTED:  # with its slices, taken already (answered)
            return Ticket(rates, budgets, out[3], prompt_tokens, self.name, out[2])
        if kind == REFUSED:
            return Denial(out[2], out[3], out[4], out[5])
        if kind == NEED_SEED:
            return NeedSeed(out[2])
        raise SharedCountersUnavailable(f"the counter server answered an admit with {out!r}")

    def settle_later(self, ticket: Ticket, actual: list[int], total_tokens: int) -> bool:
        """Send the settle without awaiting anything (the request's last steps must not be a point
        where its cancellation could skip the ledger row); False when not connected."""
        tid = ticket.shared_id
        if tid is None:
            if ticket.lease is not None and self.slices.settle(ticket, actual, total_tokens):
                self._later(REPORT_DELAY_S)  # reported (summed per counter) with the next write
            return True
        if self._open() is None:
            return False
        self._queue(frame(["s", tid, actual, total_tokens]))
        return True

    def _queue(self, data: bytes) -> None:
        """Buffer a frame that has no answer: it goes with the next tick's admits, or alone after
        SETTLE_DELAY_S."""
        out = self._out
        out.append(data)
        if len(out) >= MAX_HELD_SETTLES:
            self.flush()
        else:
            self._later(SETTLE_DELAY_S)

    def _later(self, delay: float) -> None:
        """Make sure a write comes within ``delay``."""
        if self._tick is not None:
            return
        loop = asyncio.get_running_loop()
        timer = self._settle_timer
        if timer is not None:
            if timer.when() <= loop.time() + delay:
                return
            timer.cancel()
        self._settle_timer = loop.call_later(delay, self.flush)

    def _give(self, back: Returns, recall: int) -> None:
        """Send slices back (``recall``: the recall this answers, written at once)."""
        if (back or recall) and self._open() is not None:
            self._out.append(frame(["r", recall, back.bud, back.rpm, back.tpm]))
            if recall:
                self.flush()
            else:
                self._later(SETTLE_DELAY_S)

    def _return_slices(self, recall: int = 0, idle_before: float | None = None) -> None:
        """Send back every slice (``idle_before``: only those unused since; ``recall``: see _give)."""
        back = Returns([], [], [])
        self.slices.give_back_all(back, idle_before)
        self._give(back, recall)

    def pushed(self, msg: list[Any]) -> None:
        """A push from the supervisor: a recall (every slice goes back now), or a key invalidation
        (every slice goes back too: the key's limits or budgets may have changed), then the cache."""
        if len(msg) > 2:
            self._return_slices(int(msg[2]))
            return
        self._return_slices()
        self.flush()
        if self.on_invalidate is not None:
            self.on_invalidate(msg[1])

    def _return_idle(self) -> None:
        """Every IDLE_S while there are slices: return those no request used since the last look."""
        self._sweep = None
        self._return_slices(idle_before=time.monotonic() - lease.IDLE_S)
        if self.slices:
            self._sweep = asyncio.get_running_loop().call_later(lease.IDLE_S, self._return_idle)

    def _send(self, data: bytes) -> None:
        """Buffer a frame that is answered, to be written at the end of this loop tick with every
        other frame buffered by then: at high concurrency many requests reach their admit in the
        same tick, and N admits (and the settles before them) then cost one write, and the
        supervisor one read and one write for all. Messages on one connection are applied in order,
        so a slot a settle frees is free for the admit after it."""
        self._out.append(data)
        if self._tick is None:
            self._tick = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write every buffered frame in one write (the tick ended, or no admit came within
        SETTLE_DELAY_S to carry the settles)."""
        t = self._open()
        used = self.slices.report()  # leased settles go first: the admits after them see them
        if t is not None and used is not None:
            self._out.insert(0, frame(used))
        if t is not None and self._out:
            t.write(b"".join(self._out))
        self._drop_buffered()

    def _drop_buffered(self) -> None:
        """Forget what is buffered (written, or the connection is gone: the supervisor then counts
        the worker's open tickets as spent in full, never an overspend, and every answer awaited
        fails)."""
        self._out.clear()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None

    async def settle(self, ticket: Ticket, actual: list[int], total_tokens: int) -> None:
        if not self.settle_later(ticket, actual, total_tokens):
            await self._transport()
            self._send(frame(["s", ticket.shared_id, actual, total_tokens]))

    async def peek_budget(self, counter: str) -> tuple[int, int] | None:
        out = await self._call(["p", 0, counter])
        return (int(out[1]), int(out[2])) if out[1] is not None else None

    async def publish_invalidation(self, key_hash: str | None) -> None:
        await self._transport()
        self._return_slices()  # this worker changed the key: its slices go back as the others' do
        self._send(frame(["i", key_hash]))

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._return_slices()
        self.flush()
        t = self._open()
        if t is not None:
            t.close()  # what is buffered in the transport is written first


def _on_wire(rates: list[RateCheck], budgets: list[BudgetCheck]) -> tuple[list[Any], list[Any]]:
    """The checks as an "a" or "g" message carries them: lists of their fields in a fixed order."""
    return ([(r.scope, r.rpm, r.tpm, r.max_parallel) for r in rates],
            [(b.counter, b.limit, b.seed, b.reserve, b.ttl_s) for b in budgets])


def _ask_key(rates: list[RateCheck], budgets: list[BudgetCheck]) -> str:
    """The key an ask for slices is made for (its first scope or counter): one ask per key at a time."""
    return rates[0].scope if rates else budgets[0].counter if budgets else ""
