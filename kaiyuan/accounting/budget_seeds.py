"""Budget counters that survive Redis losing its data: seeded from the authoritative ledger, and
this replica's reservations in flight counted again in a counter that was re-made.

Why: a budget counter lives in Redis (or in memory). When it is missing (a new period, or Redis
restarted empty) the admit script answers "need seed" instead of guessing, and the counter is
seeded from the spend ledger read *then* (uncached, one read per counter however many requests
wait for it) plus this replica's ledger rows not written yet. A cached read (up to 60 s old) once
let a restarted Redis start from stale spend: 65% overspend.

A restart also loses the reservations of requests in flight. Each counter carries a generation
(when it was seeded); a ticket remembers the generation its reservation was made in. The first
time this replica sees a new generation of a counter, it re-reserves its own requests still in
flight there (``RedisCounters.adopt``), and their settles release the re-made reservation, not a
stranger's. A counter Redis lost is seeded one ledger flush interval after it was found missing,
so the rows other replicas had queued are written by then. What stays open: between the restart
and each replica's next admit on that counter, that replica's in-flight requests are not reserved
(docs/persistence.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from kaiyuan.accounting.keystore import Budget
from kaiyuan.accounting.ledger import SpendLedger
from kaiyuan.limits.counters import NANO, BudgetCheck, RedisCounters, Ticket

log = logging.getLogger("kaiyuan.guard")
MAX_LOST_WAIT_S = 1.5  # a longer flush interval is not waited out in full
LOST_MARGIN_S = 0.1  # beyond one ledger flush interval, for the other replicas' writes to land
MAX_TRACKED = 100_000  # counters whose generation is remembered (cleared beyond: re-learned on the next admit)


class BudgetSeeds:
    def __init__(self, ledger: SpendLedger) -> None:
        self.ledger = ledger
        self._loads: dict[str, asyncio.Future[float]] = {}
        self._held: dict[str, dict[int, BudgetCheck]] = {}  # counter -> this replica's reservations in flight
        self._gen: dict[str, str] = {}  # counter -> the latest generation seen here

    # -- seeding -------------------------------------------------------------------------------
    async def seed(self, budgets: list[tuple[BudgetCheck, Budget]]) -> None:
        """Set every check's seed to its budget's spend this period, read from the ledger now. A
        counter this replica knew (so Redis lost it) is read one ledger flush interval later: the
        rows other replicas had queued when Redis lost it, whose cost went with it, are written by
        then (a new period's counter is read at once)."""
        if any(check.counter in self._gen for check, _ in budgets):
            await self._single("lost", self._wait)
        for check, b in budgets:
            start = float(check.counter.rsplit(":", 1)[1])
            spent = await self._single(check.counter, partial(self._spent, b, start))
            check.seed = round(spent * NANO)

    async def _wait(self) -> float:
        await asyncio.sleep(min(self.ledger.writer.spec.flush_interval_s, MAX_LOST_WAIT_S) + LOST_MARGIN_S)
        return 0.0

    async def _spent(self, b: Budget, start: float) -> float:
        if self.ledger.engine is None:
            return 0.0
        return await self.ledger.spent_since(b.scope, b.scope_id, start)

    async def _single(self, key: str, load: Callable[[], Awaitable[float]]) -> float:
        fut = self._loads.get(key)
        if fut is None:
            fut = self._loads[key] = asyncio.ensure_future(load())
            fut.add_done_callback(lambda _f: self._loads.pop(key, None))
        # shield: one caller going away must not cancel the read the others are waiting for
        return await asyncio.shield(fut)

    # -- reservations in flight ------------------------------------------------------------------
    async def hold(self, ticket: Ticket, counters: RedisCounters) -> None:
        """Track an admitted ticket; if a counter's generation changed since this replica last saw
        it, re-reserve this replica's older reservations on it in the new generation."""
        for b in ticket.budgets:
            if self._gen.get(b.counter) != b.gen:
                if len(self._gen) > MAX_TRACKED:
                    self._gen.clear()
                self._gen[b.counter] = b.gen
                stale = [h for h in self._held.get(b.counter, {}).values() if h.gen != b.gen]
                if stale:
                    await self._adopt(counters, b.counter, b.gen, stale)
            self._held.setdefault(b.counter, {})[id(b)] = b

    async def _adopt(self, counters: RedisCounters, counter: str, gen: str, stale: list[BudgetCheck]) -> None:
        try:
            if await counters.adopt(counter, gen, sum(h.reserve for h in stale)):
                for h in stale:
                    h.gen = gen
                log.warning("budget counter %s was re-made (Redis lost its data): %d reservations in flight re-counted",
                            counter, len(stale))
        except Exception as e:  # Redis failing again: the next admit that sees the generation retries
            self._gen.pop(counter, None)
            log.error("could not re-count %d reservations in flight on %s: %s", len(stale), counter, e)

    def release(self, ticket: Ticket) -> None:
        for b in ticket.budgets:
            held = self._held.get(b.counter)
            if held is not None:
                held.pop(id(b), None)
                if not held:
                    del self._held[b.counter]
