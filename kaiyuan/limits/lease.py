"""Leases: slices of the supervisor's limits and budgets that a worker admits from on its own.

In the default layout (``kaiyuan serve``: workers under a supervisor, no Redis) every keyed admit
was a round trip to the supervisor's counters (:mod:`kaiyuan.limits.shared`). With leases the
supervisor, when it admits a request, also grants the worker a *slice* of each limit the request
was checked against: N requests of a scope's RPM window for that minute, T tokens of its TPM window,
X nano-USD of a budget's period. It counts the slice as used (windows) or reserved (budgets) at
once, so the slices plus its own counts never pass a limit. The worker then admits later requests
of the same key from its slices, in one synchronous step (no await between the check and the
count), and asks for more (a "g" message, no admit) once a slice is below half of its last grant,
one ask per key at a time.

Exactness rules:

- a slice is at most the headroom left divided among the connected workers (``headroom // (4 x
  workers)``, and at most ``LEASE_REQUESTS`` requests' worth); near a limit it shrinks to nothing
  and admits go to the supervisor one by one, exact as before;
- a key with a parallel-request limit is never leased (a slot must be freed where it was taken):
  it takes the round trip;
- a slice is tagged with the limit it was granted under; a check with another limit (the admin
  changed it) does not use it, and a key invalidation returns every slice at once;
- before a round trip the worker returns what is left of the request's own slices, so its parked
  headroom never makes the supervisor refuse it; when the supervisor would refuse an admit while
  other workers hold slices of the same limit, it recalls them first and decides once they are back
  (so a denial counts only what is really used or reserved, apart from requests in flight);
- a settle of a leased request applies to the slice (the reservation goes back to it, the real cost
  comes out of it) and reports the cost to the supervisor with the next write; what a request spends
  beyond the slice is counted there as spent, as a settle beyond its reservation is;
- a worker that dies: the budget it holds in slices (unused, or reserved by its requests in flight)
  counts as spent in full, and its window slices stay counted (under-use, never overspend);
- slices idle for ``IDLE_S`` are returned, and so is everything at shutdown.

So for a budget the supervisor's ``reserved`` (what the admin API and the console show) includes
the unused part of the workers' slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kaiyuan.limits.counters import BudgetCheck, MemoryCounters, RateCheck, Ticket

LEASE_REQUESTS = 64  # a slice serves at most this many requests like the one it was granted with
SHARE = 4  # a slice is at most the headroom / (SHARE x connected workers)
IDLE_S = 1.0  # a slice not used for this long is returned
MAX_MARKS = 4096  # limits a connection is remembered to hold slices of, at most (then forgotten: see Held.mark)


@dataclass(slots=True)
class Slice:
    limit: int  # the limit it was granted under
    minute: int  # its window (rate slices); -1 for budgets
    left: int  # requests, tokens or nano-USD not used yet
    used_at: float  # when a request last took from it (monotonic clock of the caller's choice)
    low: int = 0  # below this (half the last grant) more is asked for ahead of need (Slices.refill)


# -- the supervisor's side ---------------------------------------------------------------------------
@dataclass(slots=True)
class Held:
    """What one worker's connection holds in slices: budget nano-USD per counter (unused, or reserved
    by its leased requests in flight: counted in the counter's ``reserved``), and which limits it may
    hold a slice of (``"r:scope"``, ``"t:scope"``, ``"b:counter"``, each with the serial number of
    its last grant), so a refusal knows whom to recall."""

    budgets: dict[str, int]
    marks: dict[str, int]
    serial: int = 0  # grants made on this connection

    def mark(self, m: str) -> None:
        """Remember a grant. Bounded: past MAX_MARKS the window marks are forgotten (a refusal may
        then not recall a slice: an early refusal at worst, never an overspend)."""
        self.serial += 1
        if len(self.marks) >= MAX_MARKS:
            self.recalled(self.serial)
        self.marks[m] = self.serial

    def recalled(self, upto: int) -> None:
        """A recall sent after grant ``upto`` was answered: those slices came back (bar budget
        reservations of requests still in flight)."""
        self.marks = {m: n for m, n in self.marks.items() if n > upto or self.budgets.get(m[2:], 0) > 0}


def grant(c: MemoryCounters, held: Held, rates: list[RateCheck], budgets: list[BudgetCheck], prompt: int,
          minute: int, workers: int) -> list[list[int]]:
    """After an admit of these checks, slices for the worker that asked: [rpm per rate, tpm per rate,
    nano-USD per budget] (0: none). Each is counted at once: a window's count, a budget's reserved."""
    if any(r.max_parallel is not None for r in rates):
        return [[0] * len(rates), [0] * len(rates), [0] * len(budgets)]
    share = SHARE * max(1, workers)
    rpm_g, tpm_g, bud_g = [], [], []
    for r in rates:
        rpm_g.append(_window(c.rpm, held, "r:", r.scope, r.rpm, 1, minute, share))
        tpm_g.append(_window(c.tpm, held, "t:", r.scope, r.tpm, max(prompt, 1), minute, share))
    for b in budgets:
        sr = c.budgets.get(b.counter)
        g = 0
        if sr is not None and b.reserve > 0:
            g = min(LEASE_REQUESTS * b.reserve, (b.limit - sr[0] - sr[1]) // share)
            if g < b.reserve:
                g = 0
            else:
                sr[1] += g
                held.budgets[b.counter] = held.budgets.get(b.counter, 0) + g
                held.mark("b:" + b.counter)
        bud_g.append(g)
    return [rpm_g, tpm_g, bud_g]


def _window(table: dict[str, list[int]], held: Held, tag: str, scope: str, limit: int | None, each: int, minute: int,
            share: int) -> int:
    if limit is None:
        return 0
    w = table.get(scope)
    if w is None or w[0] != minute:
        return 0  # the admit just counted this window: it exists
    g = min(LEASE_REQUESTS * each, (limit - w[1]) // share)
    if g < each:
        return 0
    w[1] += g
    held.mark(tag + scope)
    return g


def give_back(c: MemoryCounters, held: Held, budgets: list[Any], rpm: list[Any], tpm: list[Any]) -> None:
    """A worker returns unused slices: [[counter, nano]], [[scope, minute, requests]], [[scope, minute, tokens]]."""
    for counter, amount in budgets:
        have = held.budgets.get(counter, 0)
        amt = min(int(amount), have)
        if amt <= 0:
            continue
        _hold(held, counter, have - amt)
        sr = c.budgets.get(counter)
        if sr is not None:
            sr[1] = max(0, sr[1] - amt)
    for table, returned in ((c.rpm, rpm), (c.tpm, tpm)):
        for scope, minute, n in returned:
            w = table.get(scope)
            if w is not None and w[0] == minute:
                w[1] = max(0, w[1] - int(n))


def used(c: MemoryCounters, held: Held, budgets: list[Any], tpm: list[Any]) -> None:
    """A worker reports leased requests settled: [[counter, cost, taken from its slice]] (cost is spent;
    what was taken leaves the slice's reservation) and [[scope, minute, tokens]] beyond its TPM slice."""
    for counter, cost, take in budgets:
        have = held.budgets.get(counter, 0)
        take = max(0, min(int(take), have))
        cost = max(0, int(cost))
        _hold(held, counter, have - take)
        sr = c.budgets.get(counter)
        if sr is not None:
            sr[1] = max(0, sr[1] - take)
            sr[0] += int(cost)
    for scope, minute, n in tpm:
        w = c.tpm.get(scope)
        if w is not None and w[0] == minute:
            w[1] = max(0, w[1] + int(n))


def _hold(held: Held, counter: str, amount: int) -> None:
    if amount > 0:
        held.budgets[counter] = amount
    else:
        held.budgets.pop(counter, None)


def lost(c: MemoryCounters, held: Held) -> None:
    """The worker went away: what it held of each budget counts as spent in full (never an overspend)."""
    for counter, amount in held.budgets.items():
        sr = c.budgets.get(counter)
        if sr is not None and amount > 0:
            sr[1] = max(0, sr[1] - amount)
            sr[0] += amount
    held.budgets.clear()
    held.marks.clear()


# -- the worker's side -------------------------------------------------------------------------------
class Slices:
    """A worker's slices, admitted from and settled into synchronously. ``gen`` changes when the
    connection they were granted on is lost: a ticket of an older generation settles nowhere (the
    supervisor counted its budget slice as spent in full)."""

    def __init__(self) -> None:
        self.rpm: dict[str, Slice] = {}
        self.tpm: dict[str, Slice] = {}
        self.bud: dict[str, Slice] = {}
        self.gen = 1
        self.used_b: dict[str, list[int]] = {}  # settled, not reported yet: counter -> [cost, taken from slices]
        self.used_t: dict[tuple[str, int], int] = {}  # (scope, minute) -> tokens beyond the TPM slice
        self.refill = False  # an admit left a slice below its low mark: ask for more now, before it runs out

    def __bool__(self) -> bool:
        return bool(self.rpm or self.tpm or self.bud)

    def admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt: int, now: float,
              clock: float) -> Ticket | None:
        """A ticket taken from the slices, or None (the round trip decides)."""
        minute = int(now // 60)
        rpm, tpm, bud = self.rpm, self.tpm, self.bud
        for r in rates:
            if r.max_parallel is not None:
                return None
            if r.rpm is not None:
                s = rpm.get(r.scope)
                if s is None or s.left < 1 or s.minute != minute or s.limit != r.rpm:
                    return None
            if r.tpm is not None:
                s = tpm.get(r.scope)
                if s is None or s.left < prompt or s.minute != minute or s.limit != r.tpm:
                    return None
        for b in budgets:
            s = bud.get(b.counter)
            if s is None or s.left < b.reserve or s.limit != b.limit:
                return None
        low = False
        for r in rates:
            if r.rpm is not None:
                s = rpm[r.scope]
                s.left -= 1
                s.used_at = clock
                low = low or s.left < s.low
            if r.tpm is not None:
                s = tpm[r.scope]
                s.left -= prompt
                s.used_at = clock
                low = low or s.left < s.low
        for b in budgets:
            s = bud[b.counter]
            s.left -= b.reserve
            s.used_at = clock
            low = low or s.left < s.low
        self.refill = low
        return Ticket(rates, budgets, minute, prompt, "shared", None, self.gen)

    def settle(self, ticket: Ticket, actual: list[int], total_tokens: int) -> bool:
        """Apply a leased ticket's settle to the slices, and add what the supervisor must hear to
        the report (:meth:`report`); False: nothing to report (a ticket of an older connection)."""
        if ticket.lease != self.gen:
            return False
        delta = total_tokens - ticket.prompt_tokens
        if delta:
            for r in ticket.rates:
                if r.tpm is None:
                    continue
                s = self.tpm.get(r.scope)
                extra = delta
                if s is not None and s.minute == ticket.minute:
                    if delta < 0:
                        s.left -= delta
                        extra = 0
                    else:
                        take = min(delta, s.left)
                        s.left -= take
                        extra = delta - take
                if extra:
                    k = (r.scope, ticket.minute)
                    self.used_t[k] = self.used_t.get(k, 0) + extra
        used = self.used_b
        for b, cost in zip(ticket.budgets, actual, strict=True):
            s = self.bud.get(b.counter)
            if s is None:  # returned meanwhile: the reservation leaves the supervisor's count
                take = b.reserve
            else:
                pool = s.left + b.reserve
                take = cost if cost < pool else pool
                s.left = pool - take
            u = used.get(b.counter)
            if u is None:
                used[b.counter] = [cost, take]
            else:
                u[0] += cost
                u[1] += take
        return bool(self.used_b or self.used_t)

    def report(self) -> list[Any] | None:
        """The "u" message for every leased settle since the last one (summed per counter), or None."""
        if not self.used_b and not self.used_t:
            return None
        msg = ["u", [[c, u[0], u[1]] for c, u in self.used_b.items()],
               [[scope, minute, n] for (scope, minute), n in self.used_t.items()]]
        self.used_b = {}
        self.used_t = {}
        return msg

    def take_grants(self, rates: list[RateCheck], budgets: list[BudgetCheck], minute: int, grants: list[list[int]],
                    clock: float, back: Returns) -> None:
        """Add the slices an admit's answer granted; a slice under another limit or of an older window
        is replaced (what was left of it under another limit goes into ``back``)."""
        rpm_g, tpm_g, bud_g = grants
        for r, g1, g2 in zip(rates, rpm_g, tpm_g, strict=True):
            if g1:
                _add(self.rpm, r.scope, r.rpm, minute, g1, clock, back.rpm)
            if g2:
                _add(self.tpm, r.scope, r.tpm, minute, g2, clock, back.tpm)
        for b, g in zip(budgets, bud_g, strict=True):
            if g:
                s = self.bud.get(b.counter)
                if s is not None and s.limit == b.limit:
                    s.left += g
                    s.used_at = clock
                    s.low = g // 2
                else:
                    if s is not None and s.left > 0:
                        back.bud.append([b.counter, s.left])
                    self.bud[b.counter] = Slice(b.limit, -1, g, clock, g // 2)

    def give_back(self, rates: list[RateCheck], budgets: list[BudgetCheck], back: Returns) -> None:
        """Return what is left of these checks' slices (a round trip is about to decide instead)."""
        for r in rates:
            _empty(self.rpm.get(r.scope), r.scope, back.rpm)
            _empty(self.tpm.get(r.scope), r.scope, back.tpm)
        for b in budgets:
            s = self.bud.get(b.counter)
            if s is not None and s.left > 0:
                back.bud.append([b.counter, s.left])
                s.left = 0

    def give_back_all(self, back: Returns, idle_before: float | None = None) -> None:
        """Return every slice (``idle_before``: only those not used since), and forget empty ones."""
        for table, out in ((self.rpm, back.rpm), (self.tpm, back.tpm)):
            for scope, s in list(table.items()):
                if idle_before is None or s.used_at < idle_before:
                    _empty(s, scope, out)
                    del table[scope]
        for counter, s in list(self.bud.items()):
            if idle_before is None or s.used_at < idle_before:
                if s.left > 0:
                    back.bud.append([counter, s.left])
                s.left = 0
                # kept (empty) while it may have requests in flight: their settles still apply here
                if idle_before is not None:
                    del self.bud[counter]

    def lost(self) -> None:
        """The connection is gone: every slice with it."""
        self.rpm.clear()
        self.tpm.clear()
        self.bud.clear()
        self.used_b = {}
        self.used_t = {}
        self.gen += 1


@dataclass(slots=True)
class Returns:
    """Slices being returned, as the "r" frame carries them."""

    bud: list[list[Any]]
    rpm: list[list[Any]]
    tpm: list[list[Any]]

    def __bool__(self) -> bool:
        return bool(self.bud or self.rpm or self.tpm)


def _add(table: dict[str, Slice], scope: str, limit: int | None, minute: int, g: int, clock: float,
         back: list[list[Any]]) -> None:
    assert limit is not None
    s = table.get(scope)
    if s is not None and s.minute == minute and s.limit == limit:
        s.left += g
        s.used_at = clock
        s.low = g // 2
        return
    if s is not None and s.minute == minute and s.left > 0:
        back.append([scope, minute, s.left])
    table[scope] = Slice(limit, minute, g, clock, g // 2)


def _empty(s: Slice | None, scope: str, out: list[list[Any]]) -> None:
    if s is not None and s.left > 0:
        out.append([scope, s.minute, s.left])
        s.left = 0
