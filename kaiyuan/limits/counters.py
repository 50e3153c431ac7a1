"""Rate-limit and budget counters: in this process, or in Redis so they hold across replicas.

One ``admit`` checks every limit that applies to a request (RPM, TPM and parallel requests per
key and per team; every budget of the key and its team) and, only if all pass, counts the
request and reserves its worst-case cost. It is atomic: a single synchronous step in memory, a
single Lua script (one round trip) in Redis. ``settle`` releases the reservation and adds the
real cost; in Redis the request path only queues it (``settle_later``) and a background task applies
the queued settles in batches, one EVALSHA each (see ``settle_batch``), so Redis costs a request
exactly one round trip. Money is counted in integer nano-dollars so the sums are exact.

RPM and TPM use fixed one-minute windows (tolerance: one window). TPM counts the prompt tokens
at admit and corrects to the real total (prompt + completion) at settle.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kaiyuan.limits.expiry import Liveness
from kaiyuan.limits.resp import AdmitPacker
from kaiyuan.limits.settle_batch import BUDGET_SETTLE_LUA, ORPHAN_TTL_S, OnEvent, SettleBatcher

NANO = 1_000_000_000
SEED_UNKNOWN = -1
ADMIT_DEADLINE_S = 2.0  # an admit that reaches Redis later than this is refused (see RedisCounters.admit)
WINDOW_TTL_S = 120  # a rate window (one minute) is kept a minute longer
PARALLEL_TTL_S = 900  # a replica that dies mid-request stops holding a parallel slot after this


@dataclass(frozen=True, slots=True)
class RateCheck:
    """One scope's request-rate limits. Immutable: built once per key record and shared by every
    request of that key (``KeyRecord.rates``)."""

    scope: str  # "key:ID" | "team:ID"
    rpm: int | None
    tpm: int | None
    max_parallel: int | None


@dataclass(slots=True)
class BudgetCheck:
    counter: str  # budget id + period start: one counter per budget per period
    limit: int  # nano-USD
    seed: int  # nano-USD already spent this period (from the ledger) if the counter is new; SEED_UNKNOWN: not read
    reserve: int  # nano-USD this request may cost at most
    ttl_s: int | None  # when the counter can be forgotten (after the period ends)
    gen: str = ""  # Redis: the counter's generation the reservation was made in (set by admit)
    seen: int = 0  # Redis: the counter's spent + reserved just after this admit (a floor should Redis lose it)
    known: str = ""  # Redis: the generation this replica last saw ("": none); another one: AdoptFirst


@dataclass(slots=True)
class NeedSeed:
    """The budget counter ``index`` is missing (new period, or Redis lost its data): admit again
    with its spend read from the ledger."""

    index: int


@dataclass(slots=True)
class AdoptFirst:
    """The budget counter ``index`` was re-made (Redis lost its data) since this replica last saw
    it: add this replica's part to generation ``gen`` (``BudgetSeeds``), then admit again."""

    index: int
    gen: str


@dataclass(slots=True)
class Denial:
    kind: str  # "rpm" | "tpm" | "parallel" | "budget"
    index: int  # which RateCheck / BudgetCheck
    current: int  # requests / tokens / in flight; for budgets: spent (nano)
    reserved: int = 0  # budgets: reserved by requests in flight (nano)


@dataclass(slots=True)
class Ticket:
    """What an admitted request holds, to be given back at settle."""

    rates: list[RateCheck]
    budgets: list[BudgetCheck]
    minute: int
    prompt_tokens: int
    backend: str
    shared_id: int | None = None  # the supervisor's number for it (SharedCounters), to settle it by
    lease: int | None = None  # SharedCounters: admitted from the worker's slices of this generation (limits/lease.py)


Admitted = Ticket | Denial | NeedSeed | AdoptFirst  # what an admit answers (AdoptFirst: Redis only)
DECIDED = (Ticket, Denial)  # an admit's final answers, for isinstance (``Ticket | Denial`` is made anew each time)


class Counters(Protocol):
    name: str

    async def admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> Admitted: ...

    async def settle(self, ticket: Ticket, actual: list[int], total_tokens: int) -> None: ...

    async def peek_budget(self, counter: str) -> tuple[int, int] | None: ...

    async def close(self) -> None: ...


class MemoryCounters:
    """Counters in this process (one node). Atomic because admit never awaits.

    A rate window is one ``[minute, count]`` list per scope (rpm, tpm), reset when its minute is
    over: no key string is formatted per request. Windows of scopes idle for more than a minute are
    dropped once a minute, so the tables hold the scopes in use (like ``parallel``)."""

    name = "memory"

    def __init__(self) -> None:
        self.rpm: dict[str, list[int]] = {}  # scope -> [minute, requests in it]
        self.tpm: dict[str, list[int]] = {}  # scope -> [minute, tokens in it]
        self.parallel: dict[str, int] = {}
        self.budgets: dict[str, list[int]] = {}  # counter -> [spent, reserved]
        self._last_prune = 0

    def admit_sync(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> Ticket | Denial | NeedSeed:
        # every keyed request runs this: windows are read and counted in place, without helper calls
        held = self.budgets
        for j, b in enumerate(budgets):
            if b.seed == SEED_UNKNOWN and b.counter not in held:
                return NeedSeed(j)
        minute = int(now // 60)
        if minute != self._last_prune:
            self._prune(minute)
        rpm, tpm, parallel = self.rpm, self.tpm, self.parallel
        for i, r in enumerate(rates):
            if r.rpm is not None:
                w = rpm.get(r.scope)
                c = w[1] if w is not None and w[0] == minute else 0
                if c + 1 > r.rpm:
                    return Denial("rpm", i, c)
            if r.tpm is not None:
                w = tpm.get(r.scope)
                c = w[1] if w is not None and w[0] == minute else 0
                if c + prompt_tokens > r.tpm:
                    return Denial("tpm", i, c)
            if r.max_parallel is not None:
                c = parallel.get(r.scope, 0)
                if c + 1 > r.max_parallel:
                    return Denial("parallel", i, c)
        for j, b in enumerate(budgets):
            sr = held.get(b.counter)
            if sr is None:
                sr = held[b.counter] = [b.seed, 0]
            if sr[0] + sr[1] + b.reserve > b.limit:
                return Denial("budget", j, sr[0], sr[1])
        for r in rates:  # a window of another minute starts again
            if r.rpm is not None:
                w = rpm.get(r.scope)
                if w is None or w[0] != minute:
                    rpm[r.scope] = [minute, 1]
                else:
                    w[1] += 1
            if r.tpm is not None:
                w = tpm.get(r.scope)
                if w is None or w[0] != minute:
                    tpm[r.scope] = [minute, prompt_tokens]
                else:
                    w[1] += prompt_tokens
            if r.max_parallel is not None:
                parallel[r.scope] = parallel.get(r.scope, 0) + 1
        for b in budgets:
            held[b.counter][1] += b.reserve
        return Ticket(rates, budgets, minute, prompt_tokens, self.name)

    async def admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> Ticket | Denial | NeedSeed:
        return self.admit_sync(rates, budgets, prompt_tokens, now)

    def settle_sync(self, ticket: Ticket, actual: list[int], total_tokens: int) -> None:
        for r in ticket.rates:
            if r.tpm is not None:
                w = self.tpm.get(r.scope)
                if w is not None and w[0] == ticket.minute:  # a window that is over no longer counts
                    w[1] = max(0, w[1] + total_tokens - ticket.prompt_tokens)
            if r.max_parallel is not None:
                self.parallel[r.scope] = max(0, self.parallel.get(r.scope, 0) - 1)
        for b, cost in zip(ticket.budgets, actual, strict=True):
            sr = self.budgets.get(b.counter)
            if sr is None:
                sr = self.budgets[b.counter] = [max(b.seed, 0), b.reserve]
            left = sr[1] - b.reserve
            sr[1] = left if left > 0 else 0
            sr[0] += cost

    async def settle(self, ticket: Ticket, actual: list[int], total_tokens: int) -> None:
        self.settle_sync(ticket, actual, total_tokens)

    async def peek_budget(self, counter: str) -> tuple[int, int] | None:
        sr = self.budgets.get(counter)
        return (sr[0], sr[1]) if sr else None

    def _prune(self, minute: int) -> None:
        self._last_prune = minute
        for table in (self.rpm, self.tpm):
            for scope in [s for s, w in table.items() if w[0] < minute - 1]:
                del table[scope]

    async def close(self) -> None:
        return None


# -- Redis ----------------------------------------------------------------------------------------
# KEYS: for each rate scope: rpm window, tpm window, parallel; then one hash per budget counter;
#       then the set of counters this replica holds reservations on (kept 40 days, see expiry.py);
#       then, if ARGV[6] is 1, the marker of this replica's settle batch in flight (see settle_batch).
# ARGV: n_rates, n_budgets, prompt_tokens, window_ttl, parallel_ttl, has_marker, deadline_ms (Redis
#       clock; -1 = none), replica id,
#       per rate: rpm, tpm, max_parallel (-1 = no limit), this replica's parallel releases queued
#       (not sent yet: certain to be applied, so those slots count as free) and in the batch in
#       flight (free too while its marker is absent, i.e. the batch has not been applied yet),
#       per budget: limit, seed (-1 = not read: answer "need seed" if the counter is missing),
#       reserve, ttl (-1 = none), the generation this replica knows ('' = none: answer "adopt
#       first" if the counter is in another one, see accounting/budget_seeds.py)
# A budget hash holds s (spent), r (reserved), r:<replica> (each replica's share of r), g (its
# generation: when it was seeded) and o (cost settled while it was missing, added on seeding). Returns {0, g..., t...} admitted
# (each budget's generation, then each budget's spent + reserved after it), {1, index, kind, current, reserved} refused, {2, index} need seed, {3} too late,
# {4, index, generation} adopt first (the counter was re-made since this replica last saw it).
ADMIT_LUA = """
local nr = tonumber(ARGV[1]); local nb = tonumber(ARGV[2]); local pt = tonumber(ARGV[3])
local wttl = tonumber(ARGV[4]); local pttl = tonumber(ARGV[5])
local t = redis.call('TIME')
if tonumber(ARGV[7]) >= 0 and tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[7]) then
  return {3}
end
local a = 9
local unapplied = 0
if tonumber(ARGV[6]) == 1 and redis.call('EXISTS', KEYS[nr*3 + nb + 2]) == 0 then unapplied = 1 end
for i = 0, nr - 1 do
  local rpm = tonumber(ARGV[a + i*5]); local tpm = tonumber(ARGV[a + i*5 + 1]); local par = tonumber(ARGV[a + i*5 + 2])
  if rpm >= 0 then
    local c = tonumber(redis.call('GET', KEYS[i*3 + 1]) or '0')
    if c + 1 > rpm then return {1, i, 'rpm', c, 0} end
  end
  if tpm >= 0 then
    local c = tonumber(redis.call('GET', KEYS[i*3 + 2]) or '0')
    if c + pt > tpm then return {1, i, 'tpm', c, 0} end
  end
  if par >= 0 then
    local c = tonumber(redis.call('GET', KEYS[i*3 + 3]) or '0') - tonumber(ARGV[a + i*5 + 3]) - unapplied * tonumber(ARGV[a + i*5 + 4])
    if c + 1 > par then return {1, i, 'parallel', c, 0} end
  end
end
local b = a + nr*5
local kb = nr*3
for j = 0, nb - 1 do
  if redis.call('HEXISTS', KEYS[kb + j + 1], 's') == 0 and ARGV[b + j*5 + 1] == '-1' then return {2, j} end
end
for j = 0, nb - 1 do
  local k = KEYS[kb + j + 1]
  if redis.call('HEXISTS', k, 's') == 0 then
    local o = redis.call('HGET', k, 'o') or '0'
    redis.call('HSET', k, 's', ARGV[b + j*5 + 1], 'r', '0', 'g', t[1] .. '.' .. t[2])
    redis.call('HDEL', k, 'o')
    if o ~= '0' then redis.call('HINCRBY', k, 's', o) end
  end
  redis.call('HSETNX', k, 'g', t[1] .. '.' .. t[2])
  local kn = ARGV[b + j*5 + 4]
  if kn ~= '' then
    local g = redis.call('HGET', k, 'g')
    if g ~= kn then return {4, j, g} end
  end
  local limit = tonumber(ARGV[b + j*5]); local res = tonumber(ARGV[b + j*5 + 2])
  local s = tonumber(redis.call('HGET', k, 's')); local r = tonumber(redis.call('HGET', k, 'r') or '0')
  if s + r + res > limit then return {1, j, 'budget', s, r} end
end
for i = 0, nr - 1 do
  if tonumber(ARGV[a + i*5]) >= 0 then redis.call('INCR', KEYS[i*3 + 1]); redis.call('EXPIRE', KEYS[i*3 + 1], wttl) end
  if tonumber(ARGV[a + i*5 + 1]) >= 0 then redis.call('INCRBY', KEYS[i*3 + 2], pt); redis.call('EXPIRE', KEYS[i*3 + 2], wttl) end
  if tonumber(ARGV[a + i*5 + 2]) >= 0 then redis.call('INCR', KEYS[i*3 + 3]); redis.call('EXPIRE', KEYS[i*3 + 3], pttl) end
end
local out = {0}
for j = 0, nb - 1 do
  local k = KEYS[kb + j + 1]
  redis.call('HINCRBY', k, 'r', ARGV[b + j*5 + 2])
  redis.call('HINCRBY', k, 'r:' .. ARGV[8], ARGV[b + j*5 + 2])
  redis.call('SADD', KEYS[kb + nb + 1], k)
  local ttl = tonumber(ARGV[b + j*5 + 3])
  if ttl > 0 then redis.call('EXPIRE', k, ttl) end
  out[j + 2] = redis.call('HGET', k, 'g')
  out[nb + j + 2] = tonumber(redis.call('HGET', k, 's')) + tonumber(redis.call('HGET', k, 'r') or '0')
end
if nb > 0 then redis.call('EXPIRE', KEYS[kb + nb + 1], 3456000) end
return out
"""

# One ticket, applied at once (``RedisCounters.settle``: the in-line fallback when the queue is full).
# KEYS: tpm window and parallel key per rate scope, then budget hashes.
# ARGV: n_rates, n_budgets, token_delta, orphan_ttl, replica id, per rate: has_tpm, has_parallel; per budget:
# reserve, actual, generation. The budget part is BUDGET_SETTLE_LUA, shared with the batch script.
SETTLE_LUA = """
local nr = tonumber(ARGV[1]); local nb = tonumber(ARGV[2]); local delta = tonumber(ARGV[3])
local ottl = tonumber(ARGV[4]); local rid = ARGV[5]
local a = 6
for i = 0, nr - 1 do
  if tonumber(ARGV[a + i*2]) == 1 and delta ~= 0 and redis.call('EXISTS', KEYS[i*2 + 1]) == 1 then
    redis.call('INCRBY', KEYS[i*2 + 1], delta)
  end
  if tonumber(ARGV[a + i*2 + 1]) == 1 then
    local c = tonumber(redis.call('GET', KEYS[i*2 + 2]) or '0')
    if c > 0 then redis.call('DECR', KEYS[i*2 + 2]) end
  end
end
local b = a + nr*2
for j = 0, nb - 1 do
  settle_budget(KEYS[nr*2 + j + 1], ARGV[b + j*3], ARGV[b + j*3 + 1], ARGV[b + j*3 + 2], ottl, rid)
end
return 0
"""
SETTLE_LUA = BUDGET_SETTLE_LUA + SETTLE_LUA


# Count again what a replica had counted in a budget counter that was re-made since (Redis lost its
# data): its reservations still in flight (r, and its share r:<replica>) and the cost of its requests
# whose ledger rows the seed may lack (s); see accounting/budget_seeds.py. Only into the generation
# the replica saw: a counter that moved on again answers 0 and is adopted into at the next look.
# KEYS: the budget hash, this replica's set of counters. ARGV: generation, reserve and spend
# (nano-USD, integer strings), replica id.
ADOPT_LUA = """
if redis.call('HGET', KEYS[1], 'g') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '0' then
  redis.call('HINCRBY', KEYS[1], 'r', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'r:' .. ARGV[4], ARGV[2])
  redis.call('SADD', KEYS[2], KEYS[1])
end
if ARGV[3] ~= '0' then redis.call('HINCRBY', KEYS[1], 's', ARGV[3]) end
return 1
"""

REDIS_MAX_CONNECTIONS = 64
REDIS_POOL_WAIT_S = 5.0
REDIS_SOCKET_TIMEOUT_S = 5.0  # > ADMIT_DEADLINE_S plus any clock-offset error: see RedisCounters.admit
CLOCK_REFRESH_S = 60.0


class AdmitTooLate(Exception):
    """Redis ran an admit after its deadline (it was paused or overloaded): nothing was counted."""


class RedisCounters:
    """Counters in Redis, shared by every replica. An admit is one EVALSHA on the request path;
    settles are queued (``settle_later``) and applied in batches off it."""

    name = "redis"

    def __init__(self, url: str, prefix: str = "ky:", on_settle_event: OnEvent | None = None) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import NoScriptError

        from kaiyuan.limits.pipelining import AutoPipeline, PipelineFull, pack

        # A bounded, blocking pool: under a burst, requests queue for one of REDIS_MAX_CONNECTIONS
        # connections instead of each opening its own (a connect storm that timed out as "unreachable").
        # A pooled connection that Redis dropped (it restarted) fails with a connection error on its
        # next use: reconnect and retry at once (twice at most) instead of failing that request, so
        # a restarted Redis is used again as soon as it is up. Timeouts are not retried: the command
        # may have run.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_MAX_CONNECTIONS, timeout=REDIS_POOL_WAIT_S,
            socket_connect_timeout=2, socket_timeout=REDIS_SOCKET_TIMEOUT_S, health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2, supported_errors=(RedisConnectionError,)),
        )
        self.redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() disconnects it
        self.prefix = prefix
        self._offset_ms: float | None = None  # Redis clock minus ours, for admit deadlines
        self._offset_at = 0.0
        self._clock: asyncio.Task[None] | None = None
        self._admit = self.redis.register_script(ADMIT_LUA)
        self.pipeline = AutoPipeline(self.redis, REDIS_SOCKET_TIMEOUT_S)
        self._pack = pack
        self._send_alone: tuple[type[Exception], ...] = (NoScriptError, PipelineFull)
        self._settle = self.redis.register_script(SETTLE_LUA)
        self._adopt = self.redis.register_script(ADOPT_LUA)
        self.replica = uuid.uuid4().hex[:12]
        self.liveness = Liveness(self.redis, prefix, self.replica)
        self._admit_packer = AdmitPacker(self._admit.sha, prefix, self.replica, self.liveness.resof(self.replica),
                                         WINDOW_TTL_S, PARALLEL_TTL_S)
        self.batcher = SettleBatcher(self.redis, prefix, self.replica, on_settle_event, send=self._eval,
                                     send_packed=self._eval_packed)

    def _rate_keys(self, scope: str, minute: int) -> list[str]:
        p = self.prefix
        return [f"{p}rpm:{scope}:{minute}", f"{p}tpm:{scope}:{minute}", f"{p}par:{scope}"]

    async def admit(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, now: float) -> Admitted:
        """One EVALSHA. It carries a deadline on Redis's clock: an admit that reaches Redis after it
        (Redis was paused, and the caller has timed out and answered 503) counts nothing, so a late
        admit can never leave a reservation that no one will release."""
        minute = int(now // 60)
        off = self._offset_ms  # the clock offset, measured (the first admit, then every CLOCK_REFRESH_S) or not
        if off is not None and time.monotonic() - self._offset_at <= CLOCK_REFRESH_S:
            deadline = int(time.time() * 1000 + off + ADMIT_DEADLINE_S * 1000)
        else:
            deadline = await self._deadline_ms()
        # from here to the command's place in the pipeline's queue nothing yields: the settle
        # batcher's counts and marker below are the ones the admit runs behind (pipelining.py)
        bt = self.batcher
        marker = bt.inflight_marker
        # copies (when not empty): a fallback send (below) uses the counts this admit was packed with
        queued = dict(bt.pending_parallel) if bt.pending_parallel else {}
        inflight = dict(bt.inflight_parallel) if bt.inflight_parallel else {}
        packed = self._admit_packer.pack(rates, budgets, prompt_tokens, minute, deadline, marker, queued, inflight)
        res = await self._eval_packed(
            self._admit, packed,
            lambda: self.admit_lists(rates, budgets, prompt_tokens, minute, deadline, marker, queued, inflight),
            lambda r: self._orphaned(r, rates, budgets, minute, prompt_tokens),
        )
        code = int(res[0])
        if code == 0:
            return self._ticket(res, rates, budgets, minute, prompt_tokens)
        if code == 2:
            return NeedSeed(int(res[1]))
        if code == 3:
            raise AdmitTooLate("Redis ran the admit after its deadline")
        if code == 4:
            g = res[2]
            return AdoptFirst(int(res[1]), g.decode() if isinstance(g, bytes) else str(g))
        kind = res[2].decode() if isinstance(res[2], bytes) else str(res[2])
        return Denial(kind, int(res[1]), int(res[3]), int(res[4]))

    def admit_lists(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, minute: int,
                    deadline: int, marker: str | None, queued: dict[str, int],
                    inflight: dict[str, int]) -> tuple[list[str], list[Any]]:
        """The admit's keys and arguments (ADMIT_LUA's layout) as lists: what redis-py's own call
        sends when the script must be loaded first; ``AdmitPacker`` packs the same from memoised parts."""
        keys: list[str] = []
        args: list[Any] = [len(rates), len(budgets), prompt_tokens, WINDOW_TTL_S, PARALLEL_TTL_S, int(marker is not None), deadline, self.replica]
        for r in rates:
            keys += self._rate_keys(r.scope, minute)
            args += [_lim(r.rpm), _lim(r.tpm), _lim(r.max_parallel)]
            args += [queued.get(r.scope, 0), inflight.get(r.scope, 0)] if r.max_parallel is not None else [0, 0]
        for b in budgets:
            keys.append(f"{self.prefix}bud:{b.counter}")
            args += [b.limit, b.seed, b.reserve, b.ttl_s if b.ttl_s else -1, b.known]
        keys.append(self.liveness.resof(self.replica))
        if marker is not None:
            keys.append(marker)
        return keys, args

    def _ticket(self, res: list[Any], rates: list[RateCheck], budgets: list[BudgetCheck], minute: int,
                prompt_tokens: int) -> Ticket:
        n = len(budgets)
        for b, g, seen in zip(budgets, res[1:n + 1], res[n + 1:], strict=True):
            b.gen = g.decode() if isinstance(g, bytes) else str(g)
            b.seen = int(seen)
        return Ticket(rates, budgets, minute, prompt_tokens, self.name)

    def _orphaned(self, res: list[Any], rates: list[RateCheck], budgets: list[BudgetCheck], minute: int,
                  prompt_tokens: int) -> None:
        """An admit ran after its caller went away (the client hung up meanwhile): nothing will use
        or settle it, so give its reservation, parallel slots and tokens back (cost 0: the request
        was never sent upstream)."""
        if int(res[0]) != 0:
            return
        ticket = self._ticket(res, rates, budgets, minute, prompt_tokens)
        if not self.settle_later(ticket, [0] * len(budgets), 0):
            asyncio.get_running_loop().create_task(self.settle(ticket, [0] * len(budgets), 0))

    async def _eval(self, script: Any, keys: list[str], args: list[Any], orphan: Callable[[Any], None] | None = None) -> Any:
        """Run a registered script through the auto-pipeline, with the other commands issued in
        this loop turn (see pipelining.py); through redis-py's own call (which loads it) when Redis
        does not have the script (it restarted) or the pipeline's queue is full."""
        try:
            return await self.pipeline.call(self._pack(["EVALSHA", script.sha, len(keys), *keys, *args]), orphan)
        except self._send_alone:
            return await script(keys=keys, args=args)

    async def _eval_packed(self, script: Any, packed: bytes, lists: Callable[[], tuple[list[str], list[Any]]],
                           orphan: Callable[[Any], None] | None = None) -> Any:
        """``_eval`` with the command already packed; ``lists`` gives its keys and arguments for
        redis-py's own call (NOSCRIPT: Redis restarted; or the pipeline's queue is full)."""
        try:
            return await self.pipeline.call(packed, orphan)
        except self._send_alone:
            keys, args = lists()
            return await script(keys=keys, args=args)

    async def _deadline_ms(self) -> int:
        """Now plus ADMIT_DEADLINE_S, on Redis's clock (the offset is measured with TIME, then
        refreshed in the background every CLOCK_REFRESH_S)."""
        if self._offset_ms is None or time.monotonic() - self._offset_at > CLOCK_REFRESH_S:
            if self._clock is None or self._clock.done():
                self._offset_at = time.monotonic()  # one refresh at a time
                self._clock = asyncio.ensure_future(self._measure_clock())
                self._clock.add_done_callback(lambda t: t.cancelled() or t.exception())
            if self._offset_ms is None:
                await asyncio.shield(self._clock)
        assert self._offset_ms is not None
        return int(time.time() * 1000 + self._offset_ms + ADMIT_DEADLINE_S * 1000)

    async def _measure_clock(self) -> None:
        try:
            t1 = time.time()
            sec, usec = await self.redis.time()
            t2 = time.time()
        except Exception:
            self._offset_at = 0.0  # measure again on the next admit
            raise
        if self._offset_ms is None or t2 - t1 < 0.5:  # a slow reply measures badly: keep the old one
            self._offset_ms = sec * 1000 + usec / 1000 - (t1 + t2) * 500
        await self.liveness.beat()  # before this replica's first reservation: see expiry.py
        self.liveness.start()

    async def adopt(self, counter: str, gen: str, reserve: int, spent: int = 0) -> bool:
        """Count ``reserve`` (reservations in flight) and ``spent`` (settled cost the ledger may lack)
        made before ``counter`` was re-made, in its current generation ``gen``; False if the counter
        has moved on (or is missing) again."""
        keys = [f"{self.prefix}bud:{counter}", self.liveness.resof(self.replica)]
        return bool(await self._adopt(keys=keys, args=[gen, str(reserve), str(spent), self.replica]))

    async def generations(self, counters: list[str]) -> list[str | None]:
        """The counters' current generations (None: missing), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for c in counters:
            pipe.hget(f"{self.prefix}bud:{c}", "g")
        return [None if g is None else g.decode() if isinstance(g, bytes) else str(g) for g in await pipe.execute()]

    def settle_later(self, ticket: Ticket, actual: list[int], total_tokens: int) -> bool:
        """Queue the settle for the background batcher (no I/O); False when the queue is full."""
        return self.batcher.put(ticket, actual, total_tokens)

    async def settle(self, ticket: Ticket, actual: list[int], total_tokens: int) -> None:
        """Apply one settle now (one EVALSHA)."""
        keys: list[str] = []
        args: list[Any] = [len(ticket.rates), len(ticket.budgets), total_tokens - ticket.prompt_tokens, ORPHAN_TTL_S, self.replica]
        for r in ticket.rates:
            rk = self._rate_keys(r.scope, ticket.minute)
            keys += [rk[1], rk[2]]
            args += [int(r.tpm is not None), int(r.max_parallel is not None)]
        for b, cost in zip(ticket.budgets, actual, strict=True):
            keys.append(f"{self.prefix}bud:{b.counter}")
            args += [b.reserve, cost, b.gen]
        await self._settle(keys=keys, args=args)

    async def peek_budget(self, counter: str) -> tuple[int, int] | None:
        v = await self.redis.hmget(f"{self.prefix}bud:{counter}", ["s", "r"])
        if v[0] is None:
            return None
        return int(v[0]), int(v[1] or 0)

    async def close(self) -> None:
        await self.batcher.close()
        await self.liveness.close()
        await self.pipeline.close()
        if self._clock is not None and not self._clock.done():
            self._clock.cancel()
        await self.redis.aclose()


def _lim(v: int | None) -> int:
    return -1 if v is None else v


def now() -> float:
    return time.time()
