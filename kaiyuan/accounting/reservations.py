"""Limits and budgets: reserve a request's worst case before the call, settle to its real cost after.

``reserve`` counts the request (tokens: prompt plus output cap x n) against the key's
RPM/TPM/parallel limits and reserves its worst-case cost over every deployment the plan can reach
(:meth:`Costing.reservation`) against every budget of the key and its team, in one
atomic step of the counters (in process, or one Redis EVALSHA). ``release`` runs once the request
has ended, whatever happened: it gives the reservation back and adds the real cost. With Redis the
release is queued and applied in batches (:mod:`kaiyuan.limits.settle_batch`), so the reserve is
the only Redis round trip on a request's path. A budget counter starts from the ledger's spend for
its period, read when the counter is missing (:mod:`kaiyuan.accounting.budget_seeds`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Engine

from kaiyuan.accounting import keystore
from kaiyuan.accounting.auth import SingleFlight, iso
from kaiyuan.accounting.budget_seeds import BudgetSeeds
from kaiyuan.accounting.costing import BILLED_ENDPOINTS, Costing
from kaiyuan.accounting.keystore import Budget, KeyRecord
from kaiyuan.accounting.ledger import SpendLedger
from kaiyuan.accounting.reserve import Reservation
from kaiyuan.config import LimitsSettings
from kaiyuan.context import RequestContext
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.limits.counters import (
    DECIDED,
    NANO,
    SEED_UNKNOWN,
    Admitted,
    BudgetCheck,
    Counters,
    Denial,
    MemoryCounters,
    RateCheck,
    RedisCounters,
    Ticket,
)
from kaiyuan.limits.shared import ENV_SOCKET as SHARED_COUNTERS_ENV
from kaiyuan.limits.shared import SharedCounters
from kaiyuan.offload import big

log = logging.getLogger("kaiyuan.reservations")

SEEDS_MAX = 100_000
PERIODS_MAX = 100_000  # budgets whose current period is kept (emptied beyond: worked out again)
PERIOD_WORD = {"day": "daily", "week": "weekly", "month": "monthly", "total": "total"}


class Period(NamedTuple):
    """A budget's current period: its counter's name and the limit in nano-USD (per budget record:
    a reloaded budget with a new limit is a new record)."""

    budget: Budget
    start: float
    end: float  # inf: a total budget, which never resets
    counter: str
    limit: int


class Reservations:
    """``ledger`` is read (uncached) to seed a missing budget counter and for spend;
    ``reachable`` names every model a request for a model can be answered by (fallbacks, trial targets)."""

    def __init__(self, settings: LimitsSettings, costing: Costing, engine: Engine | None, loads: SingleFlight,
                 registry: CollectorRegistry, denied: Counter, ledger: SpendLedger,
                 reachable: Callable[[str], tuple[str, ...]]) -> None:
        self.settings = settings
        self.reachable = reachable
        self.costing = costing
        self.engine = engine
        self.loads = loads
        self.ledger = ledger
        self.seeds = BudgetSeeds(ledger)
        self.m_denied = denied
        self._periods: dict[str, Period] = {}  # budget id -> its current period
        self.local = MemoryCounters()
        self.counters: Counters = self.local
        self.m_settle = Counter(
            "kaiyuan_limits_settle_problems",
            "Redis settles that failed once and were retried, were dropped after retrying (their reservations "
            "stay counted), or were applied in-line because the settle queue was full",
            ["action"], registry=registry,
        )
        if settings.backend == "redis":
            assert settings.redis_url is not None
            self.counters = RedisCounters(settings.redis_url,
                                          on_settle_event=lambda what, n: self.m_settle.labels(what).inc(n))
        elif shared_path := os.environ.get(SHARED_COUNTERS_ENV):  # a worker of `kaiyuan serve --workers N`
            self.counters = SharedCounters(shared_path)
        self._leased = self.counters if isinstance(self.counters, SharedCounters) else None
        self.m_redis_errors = Counter(
            "kaiyuan_limits_redis_errors", "Redis failures, by what the gateway did (fail_closed, local)", ["action"],
            registry=registry,
        )
        self.m_over = Counter(
            "kaiyuan_cost_above_reservation", "Requests whose real cost exceeded their budget reservation",
            registry=registry,
        )

    @property
    def shared(self) -> SharedCounters | None:
        """The supervisor's counters (workers of ``kaiyuan serve --workers``): key invalidations use it."""
        return self.counters if isinstance(self.counters, SharedCounters) else None

    @property
    def redis(self) -> Any:
        """The Redis client the counters use (``None`` in process): key invalidations share it."""
        return self.counters.redis if isinstance(self.counters, RedisCounters) else None

    # -- reserve ---------------------------------------------------------------------------------
    async def reserve(self, ctx: RequestContext, rec: KeyRecord) -> None:
        """Count ``ctx`` against ``rec``'s limits and budgets (sets ``ctx.ticket``), or raise a 429/402/403."""
        pending = self.reserve_now(ctx, rec)
        if pending is not None:
            await pending

    def reserve_now(self, ctx: RequestContext, rec: KeyRecord) -> Awaitable[None] | None:
        """:meth:`reserve`, decided now when it can be (in process, counters seeded, a small body):
        then ``None``, and no coroutine is made for the request path to await; else the awaitable
        that finishes it (a large prompt counted off the loop, a budget counter to seed, Redis)."""
        if ctx.endpoint not in BILLED_ENDPOINTS or (not rec.limits and not rec.budgets):
            return None
        model = ctx.model or ""
        if model not in self.costing.model_deps:
            return None
        models = self.reachable(ctx.requested_model or model)
        if model not in models:  # a trial hook sent it elsewhere: that plan's reach too
            models = (*models, *self.reachable(model))
        if big(len(ctx.raw_body)):  # tokenizing a large prompt is worked on off the event loop
            return self._reserve_off_loop(ctx, rec, models)
        return self._admit(ctx, rec, self.costing.reservation(models, ctx))

    async def _reserve_off_loop(self, ctx: RequestContext, rec: KeyRecord, models: tuple[str, ...]) -> None:
        pending = self._admit(ctx, rec, await asyncio.to_thread(self.costing.reservation, models, ctx))
        if pending is not None:
            await pending

    def _admit(self, ctx: RequestContext, rec: KeyRecord, res: Reservation) -> Awaitable[None] | None:
        ctx.prompt_estimate, ctx.tokens_reserved = res.prompt_tokens, res.tokens
        now = time.time()
        rates = rec.rates
        checks = self._budget_checks(rec, now, res.worst_usd) if rec.budgets else []
        if checks and res.unpriced:
            self.m_denied.labels("price_unknown").inc()
            raise GatewayError(
                ErrorKind.PERMISSION,
                f"model {ctx.model!r} has no known price (deployment {res.unpriced}), so this key's budget cannot be "
                "enforced; the admin must set a price for it in the gateway config",
                param="model",
                code="price_unknown",
            )
        if not rates and not checks:
            return None
        if self.counters is self.local:  # one synchronous step; only a budget counter still to seed awaits
            result = self.local.admit_sync(rates, checks, res.tokens, now)
            if type(result) is Ticket:  # admitted (the commonest answer, taken without a call)
                ctx.ticket = result
                return None
            if isinstance(result, DECIDED):
                self._decided(result, rates, checks, rec, ctx, now)
                return None
        elif (leased := self._leased) is not None and (t := leased.admit_leased(rates, checks, res.tokens, now)) is not None:
            ctx.ticket = t  # from this worker's slices of the supervisor's limits (limits/lease.py): no round trip
            return None
        return self._admit_later(ctx, rates, checks, rec, res.tokens, now)

    async def _admit_later(self, ctx: RequestContext, rates: list[RateCheck], checks: list[BudgetCheck],
                           rec: KeyRecord, tokens: int, now: float) -> None:
        budgets = list(zip(checks, rec.budgets, strict=True))
        result = await self.seeds.admit(partial(self._counters_admit, rates, checks, tokens, now), budgets, self.counters)
        self._decided(result, rates, checks, rec, ctx, now)

    def _decided(self, result: Admitted, rates: list[RateCheck], checks: list[BudgetCheck], rec: KeyRecord,
                 ctx: RequestContext, now: float) -> None:
        if isinstance(result, Denial):
            raise self._denied(result, rates, list(zip(checks, rec.budgets, strict=True)), ctx, now)
        assert isinstance(result, Ticket)
        ctx.ticket = result

    def _budget_checks(self, rec: KeyRecord, now: float, worst: float) -> list[BudgetCheck]:
        """One check per budget of ``rec`` (in its order), each reserving ``worst``."""
        out = []
        reserve = math.ceil(worst * NANO)
        for b in rec.budgets:
            p = self._periods.get(b.id)
            if p is None or p.budget is not b or not p.start <= now < p.end:
                p = self._period(b, now)
            ttl = int(p.end - now) + 2 * 86400 if p.end != math.inf else None
            out.append(BudgetCheck(p.counter, p.limit, SEED_UNKNOWN, reserve, ttl))
        return out

    def _period(self, b: Budget, now: float) -> Period:
        """``b``'s counter for the period containing ``now``, worked out once per period."""
        start, end = keystore.period_bounds(b.period, now)
        if len(self._periods) >= PERIODS_MAX:
            self._periods.clear()
        p = self._periods[b.id] = Period(b, start, math.inf if end is None else end, f"{b.id}:{int(start)}",
                                         round(b.limit_usd * NANO))
        return p

    async def _counters_admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt: int, now: float) -> Admitted:
        if self.counters is self.local:
            return self.local.admit_sync(rates, budgets, prompt, now)
        try:
            return await self.counters.admit(rates, budgets, prompt, now)
        except Exception as e:
            where = "Redis" if self.counters.name == "redis" else "the supervisor's shared counters"
            if self.settings.on_redis_error == "local":
                self.m_redis_errors.labels("local").inc()
                log.warning("%s unreachable (%s): enforcing limits and budgets per replica only "
                            "(limits.on_redis_error=local)", where, e)
                return self.local.admit_sync(rates, budgets, prompt, now)
            self.m_redis_errors.labels("fail_closed").inc()
            log.error("%s unreachable (%s): refusing requests with limits or budgets (limits.on_redis_error=fail_closed)",
                      where, e)
            raise GatewayError(
                ErrorKind.NO_DEPLOYMENT,
                f"the gateway cannot check this key's limits and budgets right now ({where} unreachable); retry shortly",
                code="limits_unavailable",
                headers={"Retry-After": "1"},
            ) from None

    def _denied(self, d: Denial, rates: list[RateCheck], budgets: list[tuple[BudgetCheck, Budget]], ctx: RequestContext,
                now: float) -> GatewayError:
        self.m_denied.labels(d.kind).inc()
        if d.kind == "budget":
            check, b = budgets[d.index]
            _start, end = keystore.period_bounds(b.period, now)
            resets = f"it resets at {iso(end)}" if end is not None else "it does not reset (a total budget)"
            who = f"key {ctx.principal.key_id}" if b.scope == "key" else f"team {b.scope_id}"
            msg = (
                f"budget exceeded: the {PERIOD_WORD[b.period]} budget of {who} is {usd(b.limit_usd)}; "
                f"spent {usd(d.current / NANO)}, reserved by requests in flight {usd(d.reserved / NANO)}, "
                f"and this request may cost up to {usd(check.reserve / NANO)}; {resets}"
            )
            headers = {"Retry-After": str(max(1, int(end - now)))} if end is not None else {}
            return GatewayError(ErrorKind.BUDGET_EXCEEDED, msg, code="budget_exceeded", headers=headers)
        r = rates[d.index]
        retry = str(max(1, 60 - int(now % 60)))
        if d.kind == "parallel":
            msg = f"too many parallel requests for {r.scope}: {d.current} in flight, limit {r.max_parallel}"
            retry = "1"
        elif d.kind == "rpm":
            msg = f"rate limit exceeded for {r.scope}: {d.current} requests this minute, limit {r.rpm} per minute"
        else:
            msg = (
                f"token rate limit exceeded for {r.scope}: {d.current} tokens this minute, this request reserves "
                f"{ctx.tokens_reserved} more (its prompt and its output cap), limit {r.tpm} per minute"
            )
        return GatewayError(ErrorKind.RATE_LIMITED, msg, code=f"{d.kind}_limit_exceeded", headers={"Retry-After": retry})

    # -- release -----------------------------------------------------------------------------------
    async def release(self, ctx: RequestContext, cost: float | None) -> None:
        """Give back ``ctx``'s reservation and count its real ``cost`` (``None``: unknown, counted as 0)."""
        pending = self.release_now(ctx, cost)
        if pending is not None:
            await pending

    def release_now(self, ctx: RequestContext, cost: float | None) -> Awaitable[None] | None:
        """:meth:`release`, done now (in process; or queued for Redis's batched settles): ``None``;
        else the awaitable that applies it (Redis's settle queue was full)."""
        ticket, ctx.ticket = ctx.ticket, None
        if ticket is None:
            return None
        nano = 0 if cost is None else round(cost * NANO)
        if ticket.backend == "redis":  # before any await: its ledger row is the last one queued
            self.seeds.release(ticket, nano, self.ledger.seq_of(ctx.request_id) if cost is not None else None)
        u = ctx.usage
        total = (u.prompt_tokens or 0) + (u.completion_tokens or 0) if u.prompt_tokens is not None else ticket.prompt_tokens
        if ticket.budgets and nano > ticket.budgets[0].reserve:
            self.m_over.inc()
            log.warning(
                "request %s cost $%.6f, more than the $%.6f reserved for it (the upstream counted more tokens "
                "than the gateway's estimate, or ignored max_tokens); budgets may be exceeded by the difference",
                ctx.request_id, nano / NANO, ticket.budgets[0].reserve / NANO,
            )
        actual = [nano] * len(ticket.budgets)
        if ticket.backend == "memory":  # in process: a synchronous step, nothing to fail or queue
            self.local.settle_sync(ticket, actual, total)
            return None
        try:
            if ticket.backend == "redis" and isinstance(self.counters, RedisCounters):
                # queued, applied off the request path in batches (kaiyuan.limits.settle_batch)
                if not self.counters.settle_later(ticket, actual, total):
                    self.m_settle.labels("inline").inc()
                    return self._settle_inline(self.counters, ticket, actual, total, ctx.request_id)
            elif ticket.backend == "shared" and isinstance(self.counters, SharedCounters):
                # a write on a local socket, no await: a cancelled handler cannot skip what follows
                if not self.counters.settle_later(ticket, actual, total):
                    asyncio.get_running_loop().create_task(self.counters.settle(ticket, actual, total))
            else:
                self.local.settle_sync(ticket, actual, total)
        except Exception as e:
            self._settle_failed(e, ctx.request_id, ticket.backend)
        return None

    async def _settle_inline(self, counters: RedisCounters, ticket: Ticket, actual: list[int], total: int,
                             request_id: str) -> None:
        try:
            # shielded: a client that hangs up must not cancel the release of its reservation
            await asyncio.shield(counters.settle(ticket, actual, total))
        except Exception as e:
            self._settle_failed(e, request_id, ticket.backend)

    def _settle_failed(self, e: Exception, request_id: str, backend: str) -> None:
        self.m_redis_errors.labels("settle_failed").inc()
        log.error("could not settle request %s in %s: %s (its reservation stays counted)", request_id, backend, e)

    # -- admin ---------------------------------------------------------------------------------------
    async def budget_status(self, b: Budget) -> dict[str, Any]:
        """Current spend of a budget, for the admin API (counters if live here, else the ledger)."""
        now = time.time()
        start, end = keystore.period_bounds(b.period, now)
        counter = f"{b.id}:{int(start)}"
        try:
            live = await self.counters.peek_budget(counter)
        except Exception:
            live = None
        if live is None:
            live = await self.local.peek_budget(counter)
        if live is not None:
            spent, reserved = live[0] / NANO, live[1] / NANO
        else:
            assert self.engine is not None
            spent, reserved = await self.ledger.spent_since(b.scope, b.scope_id, start), 0.0
        return {"spent_usd": round(spent, 9), "reserved_usd": round(reserved, 9), "period_start": start, "resets_at": end}

    async def close(self) -> None:
        await self.seeds.close()
        await self.counters.close()


def usd(v: float) -> str:
    """Dollars with cents, or with enough digits to be non-zero for sub-cent amounts."""
    if v == 0 or abs(v) >= 0.01:
        return f"${v:,.2f}"
    return f"${v:.6f}".rstrip("0")
