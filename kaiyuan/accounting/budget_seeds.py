"""Budget counters that survive Redis losing its data: seeded from the authoritative ledger, and
what each replica had counted that the ledger may lack counted again in the re-made counter.

Why: a budget counter lives in Redis. When it is missing (a new period, or Redis restarted empty)
the admit script answers "need seed" instead of guessing, and the counter is seeded from the spend
ledger read *then* (uncached, one read per counter however many requests wait for it). A cached
read (up to 60 s old) once let a restarted Redis start from stale spend: 65% overspend. A seed
that waited one ledger flush interval for the other replicas' queued rows to land still lost
whatever a loaded machine had not written in time (up to 8 requests of a $1.50 budget).

The rule, with no timer: the ledger read misses only what no replica had written before Redis
lost the counter, and each replica knows its part of that. A replica keeps, per budget counter it
uses, a **book**: its reservations in flight, and the settled requests whose ledger row was not yet
known to be written. Ledger rows are numbered in the order they are queued and written in that
order (:attr:`BatchWriter.done` counts the rows written), so "written" is one number per replica,
no clocks. Every admit reads that number just before it is sent (``done``); when the admit answers
with the counter's generation the book knew, the counter was not lost before the admit ran, so
every row written before ``done`` was in the database before any later loss, and so in any later
seed: those entries are dropped. An admit carries the generation the replica knows; when the
counter is in another one (it was re-made), the script answers "adopt first" before deciding, and
the replica adds to the new counter, in one script guarded by the generation
(``RedisCounters.adopt``), its reservations in flight (reserved again) and its entries not dropped
(spent again), then admits again. The periodic :meth:`BudgetSeeds.sweep` does the same for a
counter the replica has no new request on. So, for every request the upstream was sent, its cost
is in the new counter through at least one of: the seed (its row was written before the read), its
settle (applied after the loss: to the counter, or to ``o`` while missing), or its replica's adopt
(its row was not known written before the loss); and no replica's admit is decided in a re-made
counter before that replica's own part is in it. Some costs are counted twice
(a row written between a replica's last admit and the loss; a settle applied after the loss whose
row is also adopted): the counter then holds slightly more than was spent and refuses a little
early, never late. A seed of a counter this replica knew reads the database only: its own unwritten
rows come in through its adopt.

The floor: between the loss and another replica's adopt (its next admit on that counter, or the
sweep within ``SWEEP_S``), that replica's part would be missing from the counter, and the other
replicas' admits could use it meanwhile (measured: up to 2.8 requests per replica past a budget
that was nearly spent when Redis restarted, with one replica's ledger 3 s behind). So every admit
also answers the counter's spent + reserved (every replica's), each replica remembers the highest
it saw (:meth:`note`; refusals count too), and a counter this replica knew is seeded with at least
that, less this replica's own book (its adopt adds that back): all spend and reservations up to
this replica's last look, whoever made them and whether written or not. What the floor cannot hold is what happened after that last look (a busy replica
looks at a counter on every request); what it holds twice (another replica's unwritten rows and
reservations, which that replica still adopts) makes the counter refuse early, never late. A dead
replica's book dies with it: its reservations in Redis become spend when it is found dead
(``limits/expiry.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from kaiyuan.accounting.keystore import Budget
from kaiyuan.accounting.ledger import SpendLedger
from kaiyuan.limits.counters import (
    DECIDED,
    NANO,
    Admitted,
    AdoptFirst,
    BudgetCheck,
    Counters,
    Denial,
    NeedSeed,
    RedisCounters,
    Ticket,
)
from kaiyuan.store.boundary import unavailable_error

log = logging.getLogger("kaiyuan.guard")
SWEEP_S = 30.0  # how often idle books are checked against Redis (their entries dropped or adopted)
SWEEP_BATCH = 500  # counters read per round trip by the sweep
ADMIT_TRIES = 4  # admits of one request: need seed, adopt first, admitted (one spare for a counter re-made again)
MAX_FLOORS = 100_000  # counters whose last seen total is remembered (cleared beyond: re-learned on the next admit)


@dataclass(slots=True)
class Unwritten:
    """A settled request whose ledger row was not known written when its counter was last seen."""

    seq: int  # its ledger row's number (SpendLedger.seq_of)
    nano: int  # its cost, nano-USD
    gen: str  # the counter generation its cost is counted in


@dataclass(slots=True)
class Book:
    """What this replica has counted in one budget counter that the counter would lose with Redis."""

    gen: str  # the generation everything here is counted in (entries of another one wait to be adopted)
    held: dict[int, BudgetCheck] = field(default_factory=dict)  # reservations in flight, by id()
    unwritten: deque[Unwritten] = field(default_factory=deque)  # in ledger order
    lock: asyncio.Lock | None = None  # one adopt at a time (made on the first)

    def drop_written(self, gen: str, done: int) -> None:
        """``gen`` was seen alive by an admit sent when ``done`` rows were written: those rows will
        be in any later seed."""
        q = self.unwritten
        while q and q[0].seq < done and q[0].gen == gen:
            q.popleft()
        if q and q[0].seq < done:  # an entry of another generation in front (waiting to be adopted): filter
            self.unwritten = deque(u for u in q if u.seq >= done or u.gen != gen)

    @property
    def empty(self) -> bool:
        return not self.held and not self.unwritten


class BudgetSeeds:
    def __init__(self, ledger: SpendLedger) -> None:
        self.ledger = ledger
        self._loads: dict[str, asyncio.Future[float]] = {}
        self.books: dict[str, Book] = {}  # counter -> this replica's book (bounded: see release)
        # counter -> the highest spent + reserved this replica saw in it (Redis, every replica's part)
        self.floors: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # -- seeding -------------------------------------------------------------------------------
    async def seed(self, budgets: list[tuple[BudgetCheck, Budget]]) -> None:
        """Set every check's seed to its budget's spend this period, read from the ledger now (no
        wait). A counter this replica knew (Redis lost it) reads the database only: this replica's
        unwritten rows are added by its adopt. A new one adds them to the read."""
        for check, b in budgets:
            start = float(check.counter.rsplit(":", 1)[1])
            queued = check.counter not in self.books
            spent = await self._single(f"{check.counter}:{int(queued)}", partial(self._spent, b, start, queued))
            # a counter Redis lost starts at no less than what this replica last saw in it (every
            # replica's spend and reservations then, written or not), less this replica's own part,
            # which its adopt adds back (see the docstring)
            check.seed = max(round(spent * NANO), self.floor(check.counter))

    def floor(self, counter: str) -> int:
        """The least a re-made ``counter`` can hold: the highest total this replica saw in it, less
        what this replica's adopt adds back (its book now; a part of it that the total did not hold
        only lowers the floor)."""
        seen = self.floors.get(counter, 0)
        book = self.books.get(counter)
        if not seen or book is None:
            return seen
        own = sum(h.reserve for h in book.held.values()) + sum(u.nano for u in book.unwritten)
        return max(seen - own, 0)

    def note(self, counter: str, total: int) -> None:
        """Redis said ``counter`` holds ``total`` (spent + reserved, every replica's)."""
        floors = self.floors
        if total > floors.get(counter, -1):
            if len(floors) >= MAX_FLOORS and counter not in floors:
                floors.clear()
            floors[counter] = total

    async def _spent(self, b: Budget, start: float, queued: bool) -> float:
        if self.ledger.engine is None:
            return 0.0
        return await self.ledger.spent_since(b.scope, b.scope_id, start, queued=queued)

    async def _single(self, key: str, load: Callable[[], Awaitable[float]]) -> float:
        fut = self._loads.get(key)
        if fut is None:
            fut = self._loads[key] = asyncio.ensure_future(load())
            fut.add_done_callback(lambda _f: self._loads.pop(key, None))
        # shield: one caller going away must not cancel the read the others are waiting for
        return await asyncio.shield(fut)

    # -- the request path ------------------------------------------------------------------------
    async def admit(self, admit: Callable[[], Awaitable[Admitted]], budgets: list[tuple[BudgetCheck, Budget]],
                    counters: Counters) -> Ticket | Denial:
        """Run ``admit`` (the counters' one atomic step) with the generation this replica knows of
        each counter. A counter that is missing is seeded from the ledger, one re-made since this
        replica saw it gets this replica's part first (AdoptFirst), and the admit runs again. An
        admitted Redis ticket is booked (:meth:`hold`)."""
        books = self.books
        if books:
            for check, _b in budgets:
                book = books.get(check.counter)
                if book is not None:
                    check.known = book.gen
        done = self.ledger.writer.done  # ledger rows written before the admit is sent
        result = await admit()
        if isinstance(result, DECIDED):
            return await self._answered(result, budgets, counters, done)
        return await self._admit_again(result, admit, budgets, counters)

    async def _admit_again(self, result: NeedSeed | AdoptFirst, admit: Callable[[], Awaitable[Admitted]],
                           budgets: list[tuple[BudgetCheck, Budget]], counters: Counters) -> Ticket | Denial:
        """A counter is missing (seed it) or was re-made (adopt first); then admit again."""
        for _ in range(ADMIT_TRIES):
            if isinstance(result, NeedSeed):  # a budget counter is missing: seed it from the ledger, now
                await self.seed(budgets)
            elif isinstance(counters, RedisCounters):  # AdoptFirst
                check = budgets[result.index][0]
                book = self.books.get(check.counter)
                if book is not None:
                    await self.saw(book, check.counter, result.gen, self.ledger.writer.done, counters)
                check.known = book.gen if book is not None else ""  # still the old one: adopt failed, ask again
            done = self.ledger.writer.done
            again = await admit()
            if isinstance(again, DECIDED):
                return await self._answered(again, budgets, counters, done)
            result = again
        raise unavailable_error()  # the counter kept moving (Redis restarting again and again)

    async def _answered(self, result: Ticket | Denial, budgets: list[tuple[BudgetCheck, Budget]],
                        counters: Counters, done: int) -> Ticket | Denial:
        """An admit's final answer: a Redis ticket is booked (:meth:`hold`), a budget refusal's
        total noted (:meth:`note`)."""
        if isinstance(result, Denial):
            if result.kind == "budget" and isinstance(counters, RedisCounters):
                self.note(budgets[result.index][0].counter, result.current + result.reserved)
            return result
        if budgets and result.backend == "redis" and isinstance(counters, RedisCounters):
            await self.hold(result, counters, done)
        return result

    async def hold(self, ticket: Ticket, counters: RedisCounters, done: int) -> None:
        """Book an admitted ticket. ``done``: the ledger rows written when its admit was sent. A
        generation seen for the first time: adopt this replica's older part of the counter first."""
        if self._sweeper is None and self.ledger.engine is not None:
            self._sweeper = asyncio.create_task(self._sweep_forever(counters), name="kaiyuan-budget-books")
        for b in ticket.budgets:
            self.note(b.counter, b.seen)
            book = self.books.get(b.counter)
            if book is None:
                book = self.books[b.counter] = Book(b.gen)
            await self.saw(book, b.counter, b.gen, done, counters)
            book.held[id(b)] = b

    def release(self, ticket: Ticket, nano: int, seq: int | None) -> None:
        """The ticket's request ended with cost ``nano``; ``seq``: its ledger row (None: no row)."""
        for b in ticket.budgets:
            book = self.books.get(b.counter)
            if book is None:
                continue
            book.held.pop(id(b), None)
            if seq is not None and nano:
                book.unwritten.append(Unwritten(seq, nano, b.gen))
            elif book.empty:
                del self.books[b.counter]

    async def saw(self, book: Book, counter: str, gen: str, done: int, counters: RedisCounters) -> None:
        """Redis answered, for an admit sent when ``done`` rows were written, that ``counter`` is in
        generation ``gen``. A new one: adopt (one at a time per book; the others wait for it)."""
        if gen == book.gen:
            book.drop_written(gen, done)
            return
        if book.lock is None:
            book.lock = asyncio.Lock()
        async with book.lock:
            if gen == book.gen:  # adopted while this one waited
                book.drop_written(gen, done)
                return
            await self._adopt(book, counter, gen, done, counters)

    async def _adopt(self, book: Book, counter: str, gen: str, done: int, counters: RedisCounters) -> None:
        held = [h for h in book.held.values() if h.gen != gen]
        rows = [u for u in book.unwritten if u.gen != gen]
        reserve, spent = sum(h.reserve for h in held), sum(u.nano for u in rows)
        try:
            ok = await counters.adopt(counter, gen, reserve, spent)
        except Exception as e:  # Redis failing again: the next look at the counter retries
            log.error("could not re-count %d reservations and $%.6f of unwritten spend on %s: %s",
                      len(held), spent / NANO, counter, e)
            return
        if not ok:  # the counter moved on (or is missing) again: the next look adopts into that one
            return
        for h in held:
            h.gen = gen
        for u in rows:
            u.gen = gen
        book.gen = gen
        book.drop_written(gen, done)
        log.warning("budget counter %s was re-made (Redis lost its data): %d reservations in flight and "
                    "$%.6f of spend not yet in the ledger counted again", counter, len(held), spent / NANO)

    # -- idle books --------------------------------------------------------------------------------
    async def sweep(self, counters: RedisCounters) -> None:
        """Look at every book in Redis (``SWEEP_BATCH`` counters a round trip): drop what is
        written, or adopt. So a book empties without new requests, and a replica with no new
        request on a counter still adds its part soon after Redis lost it."""
        names = list(self.books)
        for i in range(0, len(names), SWEEP_BATCH):
            chunk = names[i:i + SWEEP_BATCH]
            done = self.ledger.writer.done
            for counter, gen in zip(chunk, await counters.generations(chunk), strict=True):
                book = self.books.get(counter)
                if gen is None or book is None:
                    continue  # missing: its next admit seeds it, and the book is adopted then
                await self.saw(book, counter, gen, done, counters)
                if book.empty and self.books.get(counter) is book:
                    del self.books[counter]

    async def _sweep_forever(self, counters: RedisCounters) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                await self.sweep(counters)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down: the next round tries again
                log.warning("budget book sweep failed (%s); retrying in %.0f s", e, SWEEP_S)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
