"""The full guard: virtual keys, allowed models, RPM/TPM/parallel limits, budgets and cost.

``admit`` (before routing) authenticates the caller, then reserves the request's worst-case cost
(:mod:`kaiyuan.accounting.reserve`: prompt counted plus the output cap sent upstream times n, at
the highest price over every deployment the plan can reach) against every budget of the key and
its team, and counts it (tokens: prompt plus output cap) against the rate limits, all in one
atomic step. ``settle`` (after the request, whatever happened) computes
the real cost from the upstream's usage, sets ``ctx.cost_usd`` (``None`` when the price is
unknown, never 0), releases the reservation, adds the real cost and queues a spend-ledger row. With
Redis the settle itself is queued too and applied in batches by a background task, so the only
Redis round trip on a request's path is the admit's one EVALSHA.

Keys are cached in memory for ``limits.key_cache_ttl_s``; the database is only read on a cache
miss and never written on the request path (the ledger goes out in batches).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from prometheus_client import Counter

from kaiyuan.accounting import keystore
from kaiyuan.accounting.keystore import Budget, KeyRecord
from kaiyuan.accounting.output_cap import OutputCaps, asked
from kaiyuan.accounting.prices import PriceCatalog, ResolvedPrice, deployment_price, vendor_of
from kaiyuan.accounting.reserve import reserve
from kaiyuan.accounting.tokens import count_prompt
from kaiyuan.accounting.usage_check import clamp_to_plausible
from kaiyuan.config import DeploymentBase
from kaiyuan.context import Principal, RequestContext
from kaiyuan.errors import ErrorKind, GatewayError
from kaiyuan.guard import bearer_token
from kaiyuan.limits.counters import (
    NANO,
    BudgetCheck,
    Counters,
    Denial,
    MemoryCounters,
    RateCheck,
    RedisCounters,
    Ticket,
)

if TYPE_CHECKING:
    from kaiyuan.gateway import Gateway

log = logging.getLogger("kaiyuan.guard")

TICKET = "kaiyuan.ticket"
NEGATIVE_TTL_S = 2.0
T = TypeVar("T")


class SingleFlight:
    """Concurrent callers asking for the same key share one blocking load (run in a thread)."""

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[Any]] = {}

    async def run(self, key: Hashable, fn: Callable[..., T], *args: Any) -> T:
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            self._inflight[key] = fut
            fut.add_done_callback(self._done(key))
        # shield: one caller going away must not cancel the load the others are waiting for
        return await asyncio.shield(fut)

    def _done(self, key: Hashable) -> Callable[[asyncio.Future[Any]], None]:
        def forget(_f: asyncio.Future[Any]) -> None:
            self._inflight.pop(key, None)

        return forget
BILLED_ENDPOINTS = frozenset({"chat", "completions", "embeddings", "messages", "responses"})
SEED_TTL_S = 60.0
INVALIDATE_CHANNEL = "ky:invalidate"  # a counter's starting spend is re-read from the ledger at most this often
PERIOD_WORD = {"day": "daily", "week": "weekly", "month": "monthly", "total": "total"}


class KeyGuard:
    """Master key + virtual keys. With no master key configured the gateway is open (as before),
    and cost is still computed and recorded for every request."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        cfg = gw.config
        self.master_key = cfg.server.master_key
        self.engine = gw.engine
        self.catalog = PriceCatalog.load(cfg.accounting)
        self.settings = cfg.limits
        self.acc = cfg.accounting
        self._admin = Principal(key_id="master", is_admin=True)
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self.local = MemoryCounters()
        self.counters: Counters = self.local
        r = gw.metrics.registry
        self.m_settle = Counter(
            "kaiyuan_limits_settle_problems",
            "Redis settles that failed once and were retried, were dropped after retrying (their reservations "
            "stay counted), or were applied in-line because the settle queue was full",
            ["action"], registry=r,
        )
        if self.settings.backend == "redis":
            assert self.settings.redis_url is not None
            self.counters = RedisCounters(self.settings.redis_url, on_settle_event=lambda what, n: self.m_settle.labels(what).inc(n))
        # deployment id -> (deployment, price or None, vendor); model -> deployments
        self.deployments: dict[str, tuple[DeploymentBase, ResolvedPrice | None, str]] = {}
        self.model_deps: dict[str, list[str]] = {}
        for m in cfg.models:
            ids = []
            for d in m.deployments:
                price = deployment_price(d, self.catalog)
                did = d.id or d.default_id()
                self.deployments[did] = (d, price, vendor_of(d, price))
                ids.append(did)
                if price is None:
                    log.warning(
                        "model %s: deployment %s (upstream model %r) has NO PRICE: its cost will be shown as unknown "
                        "and keys with budgets cannot use it; add `price: {input: ..., output: ...}` to the deployment "
                        "(0 for self-hosted) or a row to accounting.prices_file",
                        m.name, did, d.model,
                    )
            self.model_deps[m.name] = ids
        self.caps = OutputCaps.build(
            [(did, d, p.max_output_tokens if p else None, p is not None and p.charges_output())
             for did, (d, p, _v) in self.deployments.items()], self.acc
        )
        self.m_denied = Counter("kaiyuan_guard_denied", "Requests refused by the guard", ["reason"], registry=r)
        self.m_redis_errors = Counter(
            "kaiyuan_limits_redis_errors", "Redis failures, by what the gateway did (fail_closed, local)", ["action"], registry=r
        )
        self.m_spend = Counter("kaiyuan_spend_usd", "Spend recorded, USD", ["model"], registry=r)
        self.m_over = Counter(
            "kaiyuan_cost_above_reservation", "Requests whose real cost exceeded their budget reservation", registry=r
        )
        self._ledger: deque[dict[str, Any]] = deque()
        self._seeds: dict[str, tuple[float, int]] = {}
        self._loads = SingleFlight()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closing = False

    # -- keys ------------------------------------------------------------------------------------
    def invalidate(self, key_hash: str | None = None) -> None:
        """Forget cached keys here (all, or one)."""
        if key_hash is None:
            self._cache.clear()
        else:
            self._cache.pop(key_hash, None)

    async def invalidate_everywhere(self, key_hash: str | None = None) -> None:
        """Forget cached keys here and, with Redis, on every replica at once (the admin API calls this
        after every change); replicas that miss the message still drop the key within the cache TTL."""
        self.invalidate(key_hash)
        if isinstance(self.counters, RedisCounters):
            try:
                await self.counters.redis.publish(INVALIDATE_CHANNEL, key_hash or "*")
            except Exception as e:
                log.warning("could not tell other replicas to drop a cached key (%s); they will within %ss",
                            e, self.settings.key_cache_ttl_s)

    async def _listen(self) -> None:
        """Drop cached keys when another replica's admin API changes them (Redis pub/sub)."""
        assert isinstance(self.counters, RedisCounters)
        first = True
        while not self._closing:
            try:
                pubsub = self.counters.redis.pubsub()
                await pubsub.subscribe(INVALIDATE_CHANNEL)
                if not first:
                    self.invalidate()  # anything published while we were not subscribed
                first = False
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    data = msg["data"].decode() if isinstance(msg["data"], bytes) else str(msg["data"])
                    self.invalidate(None if data == "*" else data)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("key invalidation channel lost (%s); retrying in 1 s", e)
                first = False
                await asyncio.sleep(1.0)

    def _start_tasks(self) -> None:
        if self._task is None and self.engine is not None and not self._closing:
            self._task = asyncio.create_task(self._run(), name="kaiyuan-spend-ledger")
        if self._listener is None and isinstance(self.counters, RedisCounters) and not self._closing:
            self._listener = asyncio.create_task(self._listen(), name="kaiyuan-key-invalidation")

    async def _record(self, token: str) -> KeyRecord | None:
        h = keystore.hash_key(token)
        hit = self._cache.get(h)
        mono = time.monotonic()
        if hit is not None:
            ttl = self.settings.key_cache_ttl_s if hit[1] is not None else min(NEGATIVE_TTL_S, self.settings.key_cache_ttl_s)
            if mono - hit[0] < ttl:
                return hit[1]
        assert self.engine is not None
        # Single flight: when a cached key expires under load, one lookup serves every waiting request.
        rec = await self._loads.run(("key", h), keystore.load_key, self.engine, h)
        self._cache[h] = (mono, rec)
        if len(self._cache) > 100_000:  # bounded: a flood of random keys cannot grow it forever
            self._cache.clear()
        return rec

    async def authenticate(self, ctx: RequestContext) -> KeyRecord | None:
        if self.master_key is None:
            return None
        token = bearer_token(ctx.headers)
        if token is None:
            raise GatewayError(
                ErrorKind.AUTHENTICATION,
                "missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>'); retrying without a key will not help",
                code="missing_api_key",
            )
        if hmac.compare_digest(token.encode(), self.master_key.encode()):
            ctx.principal = self._admin
            return None
        if not keystore.looks_like_key(token) or self.engine is None:
            self.m_denied.labels("invalid_key").inc()
            raise GatewayError(
                ErrorKind.AUTHENTICATION,
                "invalid API key: this gateway does not accept the key sent (Kaiyuan keys look like 'sk-ky-' followed by 43 "
                "characters); check the key your client is configured with, or ask your admin for one. Retrying will not help",
                code="invalid_api_key",
            )
        rec = await self._record(token)
        if rec is None:
            self.m_denied.labels("invalid_key").inc()
            raise GatewayError(ErrorKind.AUTHENTICATION, "invalid API key: this gateway does not know the key sent (a wrong key, or one replaced by a "
                                                             "rotation); check the key your client is configured with. Retrying will not help", code="invalid_api_key")
        if rec.revoked_at is not None:
            self.m_denied.labels("revoked").inc()
            raise GatewayError(ErrorKind.AUTHENTICATION, f"API key {rec.key_id} was revoked at {_iso(rec.revoked_at)}", code="key_revoked")
        if rec.expires_at is not None and rec.expires_at <= time.time():
            self.m_denied.labels("expired").inc()
            raise GatewayError(ErrorKind.AUTHENTICATION, f"API key {rec.key_id} expired at {_iso(rec.expires_at)}", code="key_expired")
        ctx.principal = Principal(
            key_id=rec.key_id,
            team_id=rec.team_id,
            user_id=rec.user_id,
            allowed_models=rec.allowed_models,
            policy=rec.policy,
            extra={"key_name": rec.name},
        )
        return rec

    # -- the Guard protocol ----------------------------------------------------------------------
    async def admit(self, ctx: RequestContext) -> None:
        if self._task is None:
            self._start_tasks()
        ctx.pricer = self._cost  # lets a non-streamed response carry x-kaiyuan-cost
        rec = await self.authenticate(ctx)
        if rec is None or ctx.endpoint not in BILLED_ENDPOINTS:
            return  # the master key, or an open gateway: no limits (cost is still computed at settle)
        deps = self.model_deps.get(ctx.model or "")
        if not deps:
            return  # unknown model: the gateway answers 404 before any upstream call
        if rec.allowed_models is not None and ctx.model not in rec.allowed_models:
            self.m_denied.labels("model_not_allowed").inc()
            raise GatewayError(
                ErrorKind.PERMISSION,
                f"this key may not use model {ctx.model!r}; allowed: {', '.join(sorted(rec.allowed_models)) or '(none)'}",
                param="model",
                code="model_not_allowed",
            )
        if not rec.limits and not rec.budgets:
            return  # nothing to count against
        body = ctx.body
        if not body and ctx.raw_body:
            try:
                parsed = orjson.loads(ctx.raw_body)
                body = parsed if isinstance(parsed, dict) else {}
            except orjson.JSONDecodeError:
                body = {}
        # the worst case over every deployment the plan can reach (fallbacks, canary and promote targets)
        reachable = [d for m in self.gw.reachable_models(ctx.model or "") for d in self.model_deps.get(m, ())]
        res = reserve(reachable, self.deployments, self.caps, asked(body, ctx.endpoint), body)
        ctx.extra["kaiyuan.prompt_estimate"] = res.prompt_tokens
        ctx.extra["kaiyuan.tokens_reserved"] = res.tokens
        worst, unpriced = res.worst_usd, res.unpriced
        now = time.time()
        rates = [RateCheck(scope, lim.get("rpm"), lim.get("tpm"), lim.get("max_parallel")) for scope, lim in rec.limits.items()]
        budgets = await self._budget_checks(rec, now, worst)
        if budgets and unpriced:
            self.m_denied.labels("price_unknown").inc()
            raise GatewayError(
                ErrorKind.PERMISSION,
                f"model {ctx.model!r} has no known price (deployment {unpriced}), so this key's budget cannot be "
                "enforced; the admin must set a price for it in the gateway config",
                param="model",
                code="price_unknown",
            )
        if not rates and not budgets:
            return
        result = await self._counters_admit(rates, [b for b, _ in budgets], res.tokens, now)
        if isinstance(result, Denial):
            raise self._denied(result, rates, budgets, ctx, now)
        result.extra["worst"] = worst
        ctx.extra[TICKET] = result

    async def settle(self, ctx: RequestContext) -> None:
        ticket: Ticket | None = ctx.extra.pop(TICKET, None)
        clamp_to_plausible(ctx.usage, ctx.request_id, ctx.raw_body,
                           ctx.reply.bytes_received() if ctx.reply is not None else 0, ctx.output_cap, ctx.choices,
                           lambda: self._prompt_count(ctx))
        cost = self._cost(ctx)
        if cost is None and ctx.cost_usd is not None:
            cost = ctx.cost_usd  # the catalog has no price, but a hook (a plugin price source) priced it
        ctx.cost_usd = cost
        if ticket is not None:
            nano = 0 if cost is None else round(cost * NANO)
            u = ctx.usage
            total = (u.prompt_tokens or 0) + (u.completion_tokens or 0) if u.prompt_tokens is not None else ticket.prompt_tokens
            if ticket.budgets and nano > ticket.budgets[0].reserve:
                self.m_over.inc()
                log.warning(
                    "request %s cost $%.6f, more than the $%.6f reserved for it (the upstream counted more tokens "
                    "than the gateway's estimate, or ignored max_tokens); budgets may be exceeded by the difference",
                    ctx.request_id, nano / NANO, ticket.budgets[0].reserve / NANO,
                )
            try:
                if ticket.backend == "redis" and isinstance(self.counters, RedisCounters):
                    # queued, applied off the request path in batches (kaiyuan.limits.settle_batch)
                    if not self.counters.settle_later(ticket, [nano] * len(ticket.budgets), total):
                        self.m_settle.labels("inline").inc()
                        # shielded: a client that hangs up must not cancel the release of its reservation
                        await asyncio.shield(self.counters.settle(ticket, [nano] * len(ticket.budgets), total))
                else:
                    self.local.settle_sync(ticket, [nano] * len(ticket.budgets), total)
            except Exception as e:
                self.m_redis_errors.labels("settle_failed").inc()
                log.error("could not settle request %s in %s: %s (its reservation stays counted)", ctx.request_id, ticket.backend, e)
        if cost is not None and self.engine is not None:
            dep = self.deployments.get(ctx.deployment or "")
            u = ctx.usage
            self._ledger.append(
                {
                    "request_id": ctx.request_id,
                    "ts": ctx.started_wall,
                    "key_id": ctx.principal.key_id,
                    "team_id": ctx.principal.team_id,
                    "user_id": ctx.principal.user_id,
                    "model": ctx.model,
                    "deployment": ctx.deployment,
                    "upstream_model": dep[0].model if dep else None,
                    "vendor": dep[2] if dep else None,
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "cached_tokens": u.cached_tokens,
                    "cost_usd": cost,
                }
            )
            if cost:
                self.m_spend.labels(ctx.model or "").inc(cost)

    async def close(self) -> None:
        self._closing = True
        for task in (self._task, self._listener):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._task = self._listener = None
        await self.flush()
        await self.counters.close()

    # -- cost ------------------------------------------------------------------------------------
    def _cost(self, ctx: RequestContext) -> float | None:
        if ctx.deployment is None:
            return None  # never reached an upstream
        entry = self.deployments.get(ctx.deployment)
        if entry is None or entry[1] is None:
            return None
        if ctx.endpoint == "count_tokens":
            return 0.0  # vendors do not bill token counting
        price = entry[1]
        u = ctx.usage
        if u.prompt_tokens is not None or u.completion_tokens is not None:
            return price.cost(u)
        if ctx.endpoint not in BILLED_ENDPOINTS:
            return None  # an endpoint we do not know how to price without usage
        if ctx.ttft is None and ctx.status >= 400:
            return 0.0  # the upstream refused or failed before answering: nothing billed
        # An answer went out but the upstream reported no usage (e.g. the client hung up mid-stream):
        # charge the worst case we reserved for it, so a budget can never be under-counted.
        prompt = self._prompt_count(ctx)
        return price.worst_case(prompt, self.caps.reserved_output(ctx.deployment, asked(ctx.body, ctx.endpoint)))

    def _prompt_count(self, ctx: RequestContext) -> int:
        """The prompt as the gateway counts it (at admission, or now for the deployment that answered)."""
        prompt = ctx.extra.get("kaiyuan.prompt_estimate")
        if prompt is None:
            entry = self.deployments.get(ctx.deployment or "")
            prompt = count_prompt(entry[0].model if entry else "", ctx.body)
        return int(prompt)

    # -- budgets and limits ----------------------------------------------------------------------
    async def _budget_checks(self, rec: KeyRecord, now: float, worst: float) -> list[tuple[BudgetCheck, Budget]]:
        out = []
        reserve = math.ceil(worst * NANO)
        for b in rec.budgets:
            start, end = keystore.period_bounds(b.period, now)
            counter = f"{b.id}:{int(start)}"
            seed = await self._seed(b, start, counter)
            ttl = int(end - now) + 2 * 86400 if end is not None else None
            out.append((BudgetCheck(counter, round(b.limit_usd * NANO), seed, reserve, ttl), b))
        return out

    async def _seed(self, b: Budget, start: float, counter: str) -> int:
        """Spend already recorded this period (from the ledger), used only when the counter is new."""
        seeds = self._seeds
        hit = seeds.get(counter)
        mono = time.monotonic()
        if hit is not None and mono - hit[0] < SEED_TTL_S:
            return hit[1]
        if self.engine is None:
            return 0
        v = await self._loads.run(("seed", counter, start), keystore.spent_since, self.engine, b.scope, b.scope_id, start)
        if len(seeds) > 100_000:
            seeds.clear()
        seeds[counter] = (mono, round(v * NANO))
        return seeds[counter][1]

    async def _counters_admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt: int, now: float) -> Ticket | Denial:
        if self.counters is self.local:
            return self.local.admit_sync(rates, budgets, prompt, now)
        try:
            return await self.counters.admit(rates, budgets, prompt, now)
        except Exception as e:
            if self.settings.on_redis_error == "local":
                self.m_redis_errors.labels("local").inc()
                log.warning("Redis unreachable (%s): enforcing limits and budgets per replica only (limits.on_redis_error=local)", e)
                return self.local.admit_sync(rates, budgets, prompt, now)
            self.m_redis_errors.labels("fail_closed").inc()
            log.error("Redis unreachable (%s): refusing requests with limits or budgets (limits.on_redis_error=fail_closed)", e)
            raise GatewayError(
                ErrorKind.NO_DEPLOYMENT,
                "the gateway cannot check this key's limits and budgets right now (Redis unreachable); retry shortly",
                code="limits_unavailable",
                headers={"Retry-After": "1"},
            ) from None

    def _denied(self, d: Denial, rates: list[RateCheck], budgets: list[tuple[BudgetCheck, Budget]], ctx: RequestContext, now: float) -> GatewayError:
        self.m_denied.labels(d.kind).inc()
        if d.kind == "budget":
            check, b = budgets[d.index]
            _start, end = keystore.period_bounds(b.period, now)
            resets = f"it resets at {_iso(end)}" if end is not None else "it does not reset (a total budget)"
            who = f"key {ctx.principal.key_id}" if b.scope == "key" else f"team {b.scope_id}"
            msg = (
                f"budget exceeded: the {PERIOD_WORD[b.period]} budget of {who} is {_usd(b.limit_usd)}; "
                f"spent {_usd(d.current / NANO)}, reserved by requests in flight {_usd(d.reserved / NANO)}, "
                f"and this request may cost up to {_usd(check.reserve / NANO)}; {resets}"
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
                f"{ctx.extra.get('kaiyuan.tokens_reserved')} more (its prompt and its output cap), limit {r.tpm} per minute"
            )
        return GatewayError(ErrorKind.RATE_LIMITED, msg, code=f"{d.kind}_limit_exceeded" if d.kind != "parallel" else "parallel_limit_exceeded", headers={"Retry-After": retry})

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
            await self.flush()
            spent, reserved = await asyncio.to_thread(keystore.spent_since, self.engine, b.scope, b.scope_id, start), 0.0
        return {"spent_usd": round(spent, 9), "reserved_usd": round(reserved, 9), "period_start": start, "resets_at": end}

    # -- spend ledger writer -----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.acc.spend_flush_interval_s)
            await self.flush()

    async def flush(self) -> int:
        written = 0
        while self._ledger and self.engine is not None:
            batch = [self._ledger[i] for i in range(min(len(self._ledger), 1000))]
            try:
                await asyncio.to_thread(keystore.write_spend, self.engine, batch)
            except Exception as e:
                log.error("spend ledger write failed (%d rows kept, will retry): %s", len(self._ledger), e)
                return written
            for _ in batch:
                self._ledger.popleft()
            written += len(batch)
        return written


def _usd(v: float) -> str:
    """Dollars with cents, or with enough digits to be non-zero for sub-cent amounts."""
    if v == 0 or abs(v) >= 0.01:
        return f"${v:,.2f}"
    return f"${v:.6f}".rstrip("0")


def _iso(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
