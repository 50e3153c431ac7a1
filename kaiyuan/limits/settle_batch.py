"""Redis settles off the request path: queued in memory, applied in batches by one background task.

A request's settle (release its reservation, add its real cost, correct its TPM count, free its
parallel slot) does not need to finish before the client gets its answer: until it is applied the
reservation simply stays counted, which can only refuse a request early, never let spend pass a
budget. So ``RedisCounters.settle_later`` appends the ticket to a bounded deque and wakes the
flusher, which sends everything queued as **one** EVALSHA of ``SETTLE_MANY_LUA`` (up to
``MAX_BATCH`` tickets), then loops while more arrived meanwhile. There is no linger: at low load a
settle reaches Redis within one event-loop turn; under load, the settles that arrive while a batch
is in flight ride together in the next one.

Retries: a failed batch is retried (same batch id) with backoff for about ``RETRY_FOR_S``; the
script first does ``SET NX`` on the batch id, so a batch that did apply before its reply was lost is
not applied twice. A batch that still fails is dropped and logged: its reservations stay counted
(conservative) until the period ends, and its parallel slots expire after ``PARALLEL_TTL_S``.

The batch goes out through the counters' auto-pipeline (``send``, see pipelining.py), in the order
it was issued among the admits: an admit that counted a queued release as free was issued before
the batch that applies it, so it runs before it too.

Parallel slots: the queued (not yet sent) releases of this replica are known exactly, so the ADMIT
script is told how many slots of each scope are already free (``pending_parallel``); a client that
sends its next request the moment it got the last answer is not refused for its own finished one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from kaiyuan.limits.resp import Bulk, once, remember

if TYPE_CHECKING:
    from kaiyuan.limits.counters import RateCheck, Ticket

log = logging.getLogger("kaiyuan.limits")

MAX_BATCH = 256  # tickets per EVALSHA
MAX_QUEUE = 10_000  # queued settles; beyond this a settle is applied inline (back-pressure)
RETRY_FOR_S = 10.0  # how long a failed batch is retried before it is dropped
MARK_TTL_S = 60  # how long Redis remembers an applied batch id (dedupes retries, which last < 15 s)
ORPHAN_TTL_S = 40 * 86400  # cost settled into a missing counter, kept until the counter is re-seeded

# One budget's part of a settle. The reservation is released only if the counter is still the one
# it was made in (same generation ``g``): after Redis lost its data and the counter was re-seeded,
# releasing an old reservation would free new requests' reservations. It releases at most this
# replica's share ``r:<replica>`` (expiry.py may have released it already). A counter that is missing
# (not re-seeded yet) keeps the cost aside in ``o``; the admit that seeds it from the ledger adds it
# (counted twice if the ledger already has the row: too much, never too little).
BUDGET_SETTLE_LUA = """
local function settle_budget(k, res, cost, gen, ottl, rid)
  if redis.call('HEXISTS', k, 's') == 1 then
    if res ~= '0' and redis.call('HGET', k, 'g') == gen then
      local f = 'r:' .. rid
      local mine = redis.call('HGET', k, f) or '0'
      if tonumber(mine) < tonumber(res) then res = mine end
      if res ~= '0' then
        local r = tonumber(redis.call('HGET', k, 'r') or '0')
        if r < tonumber(res) then redis.call('HSET', k, 'r', '0') else redis.call('HINCRBY', k, 'r', '-' .. res) end
        if res == mine then redis.call('HDEL', k, f) else redis.call('HINCRBY', k, f, '-' .. res) end
      end
    end
    if cost ~= '0' then redis.call('HINCRBY', k, 's', cost) end
  elseif cost ~= '0' then
    redis.call('HINCRBY', k, 'o', cost)
    if redis.call('TTL', k) < 0 then redis.call('EXPIRE', k, ottl) end
  end
end
"""

# A script that fails half-way keeps what it wrote, so the keys' types are checked first: a ticket
# whose keys hold something else (answer -index) is refused before anything is written.
# KEYS[1]: the batch marker; then per ticket: per rate scope its tpm window and parallel key, then
# one hash per budget. ARGV[1]: tickets; ARGV[2]: marker ttl; ARGV[3]: orphan ttl; ARGV[4]: replica
# id; per ticket:
# n_rates, n_budgets, token_delta, per rate: has_tpm, has_parallel; per budget: reserve, cost,
# generation (integer strings, passed through unconverted so that large nano-dollar amounts never
# go through Lua's %.14g number formatting).
SETTLE_MANY_LUA = BUDGET_SETTLE_LUA + """
local a = 5; local k = 2
for t = 1, tonumber(ARGV[1]) do
  local nr = tonumber(ARGV[a]); local nb = tonumber(ARGV[a + 1])
  for i = 1, nr * 2 do
    local ty = redis.call('TYPE', KEYS[k]).ok
    if ty ~= 'none' and ty ~= 'string' then return -t end
    k = k + 1
  end
  for j = 1, nb do
    local ty = redis.call('TYPE', KEYS[k]).ok
    if ty ~= 'none' and ty ~= 'hash' then return -t end
    k = k + 1
  end
  a = a + 3 + nr * 2 + nb * 3
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[2])) then return 0 end
local ottl = tonumber(ARGV[3]); local rid = ARGV[4]
a = 5; k = 2
for t = 1, tonumber(ARGV[1]) do
  local nr = tonumber(ARGV[a]); local nb = tonumber(ARGV[a + 1]); local delta = ARGV[a + 2]; a = a + 3
  for i = 1, nr do
    if ARGV[a] == '1' and delta ~= '0' and redis.call('EXISTS', KEYS[k]) == 1 then redis.call('INCRBY', KEYS[k], delta) end
    if ARGV[a + 1] == '1' then
      local c = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
      if c > 0 then redis.call('DECR', KEYS[k + 1]) end
    end
    a = a + 2; k = k + 2
  end
  for j = 1, nb do
    settle_budget(KEYS[k], ARGV[a], ARGV[a + 1], ARGV[a + 2], ottl, rid)
    a = a + 3; k = k + 1
  end
end
return 1
"""

OnEvent = Callable[[str, int], None]  # (what happened: "retry" | "dropped" | "inline" | "set_aside", tickets)
Send = Callable[[Any, list[str], list[Any]], Awaitable[Any]]  # (redis-py Script, keys, args) -> its reply
# (redis-py Script, the command packed, its keys and args as lists for a send without the pipeline) -> its reply
SendPacked = Callable[[Any, bytes, Callable[[], tuple[list[str], list[Any]]]], Awaitable[Any]]


class SettleBatcher:
    """The queue and the background task that applies queued settles in batches."""

    def __init__(self, redis: Any, prefix: str, replica: str, on_event: OnEvent | None = None,
                 send: Send | None = None, send_packed: SendPacked | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.on_event = on_event
        self._script = redis.register_script(SETTLE_MANY_LUA)
        self._call: Send = send or (lambda script, keys, args: script(keys=keys, args=args))
        self._call_packed = send_packed
        self._packer = SettlePacker(self._script.sha, prefix, replica)
        self._queue: deque[tuple[Ticket, list[int], int]] = deque()
        self.pending_parallel: dict[str, int] = {}  # scope -> releases queued here and not yet sent
        self.inflight_parallel: dict[str, int] = {}  # scope -> releases in the batch in flight
        self.inflight_marker: str | None = None  # that batch's id key (exists in Redis once applied)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._replica = replica
        self._seq = 0
        self.applied = 0  # tickets applied (for tests and metrics)
        self.batches = 0  # EVALSHAs that applied them
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, ticket: Ticket, actual: list[int], total_tokens: int) -> bool:
        """Queue a settle; False (nothing queued) when the queue is full or closed: settle inline then."""
        if self._closed or len(self._queue) >= MAX_QUEUE:
            return False
        self._queue.append((ticket, actual, total_tokens))
        pp = self.pending_parallel
        for r in ticket.rates:
            if r.max_parallel is not None:
                pp[r.scope] = pp.get(r.scope, 0) + 1
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kaiyuan-settle-flush")
        self._wake.set()
        return True

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.drain()
            except Exception:  # a bug must not stop settling for good: log it, keep the task alive
                log.exception("settle batch failed unexpectedly; its settles are lost (reservations stay counted)")
            if self._closed:
                return

    async def drain(self, give_up_at: float | None = None) -> None:
        """Apply everything queued now (one EVALSHA per MAX_BATCH tickets). A batch Redis refuses
        (a script error: a bad ticket, not a connection problem) is applied ticket by ticket, and a
        ticket refused alone is set aside (logged, counted): it never holds back the others."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            releases = self._unpend(batch)
            while batch:
                bad = await self._apply(batch, releases, give_up_at)
                if bad is None:
                    break
                self._set_aside(batch.pop(bad))
                releases = self._releases(batch)

    async def _apply(self, batch: list[tuple[Ticket, list[int], int]], releases: dict[str, int], give_up_at: float | None) -> int | None:
        """Send one batch (its parallel releases count as in flight meanwhile); the index of a
        ticket Redis refused (nothing of the batch was applied then), else None."""
        self._seq += 1
        marker = f"{self.prefix}settled:{self._replica}:{self._seq}"
        self.inflight_parallel = releases
        self.inflight_marker = marker if releases else None
        try:
            return await self._send(batch, marker, give_up_at)
        finally:
            self.inflight_parallel, self.inflight_marker = {}, None

    @staticmethod
    def _releases(batch: list[tuple[Ticket, list[int], int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for ticket, _a, _t in batch:
            for r in ticket.rates:
                if r.max_parallel is not None:
                    out[r.scope] = out.get(r.scope, 0) + 1
        return out

    def _unpend(self, batch: list[tuple[Ticket, list[int], int]]) -> dict[str, int]:
        """Move the batch's parallel releases from 'queued' to 'in flight' (returned)."""
        pp = self.pending_parallel
        moved: dict[str, int] = {}
        for ticket, _a, _t in batch:
            for r in ticket.rates:
                if r.max_parallel is not None:
                    moved[r.scope] = moved.get(r.scope, 0) + 1
                    n = pp.get(r.scope, 0) - 1
                    if n > 0:
                        pp[r.scope] = n
                    else:
                        pp.pop(r.scope, None)
        return moved

    def encode(self, batch: list[tuple[Ticket, list[int], int]], marker: str) -> tuple[list[str], list[Any]]:
        """The batch's keys and arguments (SETTLE_MANY_LUA's layout); ``SettlePacker`` packs the same."""
        p = self.prefix
        keys: list[str] = [marker]
        args: list[Any] = [len(batch), MARK_TTL_S, ORPHAN_TTL_S, self._replica]
        for ticket, actual, total in batch:
            args += [len(ticket.rates), len(ticket.budgets), total - ticket.prompt_tokens]
            for r in ticket.rates:
                keys += [f"{p}tpm:{r.scope}:{ticket.minute}", f"{p}par:{r.scope}"]
                args += [int(r.tpm is not None), int(r.max_parallel is not None)]
            for b, cost in zip(ticket.budgets, actual, strict=True):
                keys.append(f"{p}bud:{b.counter}")
                args += [b.reserve, cost, b.gen]
        return keys, args

    async def _send(self, batch: list[tuple[Ticket, list[int], int]], marker: str, give_up_at: float | None) -> int | None:
        deadline = give_up_at if give_up_at is not None else time.monotonic() + RETRY_FOR_S
        delay = 0.05
        if self._call_packed is not None:
            packed = self._packer.pack(batch, marker)
        else:
            keys, args = self.encode(batch, marker)
        while True:
            try:
                if self._call_packed is not None:
                    res = int(await self._call_packed(self._script, packed, lambda: self.encode(batch, marker)))
                else:
                    res = int(await self._call(self._script, keys, args))
                if res < 0:
                    return -res - 1
                self.applied += len(batch)
                self.batches += 1
                return None
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if time.monotonic() + delay > deadline:
                    self.dropped += len(batch)
                    self._event("dropped", len(batch))
                    log.error(
                        "could not settle %d requests in Redis (%s); dropped: their reservations stay counted until "
                        "the budget period ends and their parallel slots expire within 15 minutes", len(batch), e,
                    )
                    return None
                self._event("retry", len(batch))
                log.warning("settling %d requests in Redis failed (%s); retrying in %.2f s", len(batch), e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _set_aside(self, item: tuple[Ticket, list[int], int]) -> None:
        t = item[0]
        self.dropped += 1
        self._event("set_aside", 1)
        log.error("a settle was set aside: its Redis keys hold the wrong type (budgets %s, rates %s); its reservation "
                  "stays counted", [b.counter for b in t.budgets], [r.scope for r in t.rates])

    def _event(self, what: str, n: int) -> None:
        if self.on_event is not None:
            self.on_event(what, n)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking settles and apply what is queued (retrying for at most ``timeout_s``)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            self._wake.set()  # the task drains the queue (and finishes a batch in flight), then returns
            try:
                await asyncio.wait_for(task, timeout_s)
            except (TimeoutError, asyncio.CancelledError, Exception):
                pass
        if self._queue:
            await self.drain(time.monotonic() + 1.0)


class SettlePacker:
    """A batch's EVALSHA of SETTLE_MANY_LUA, packed from memoised pieces (see resp.py: a ticket's
    keys and flags repeat from one request of a key to the next)."""

    def __init__(self, sha: str, prefix: str, replica: str) -> None:
        self.bulk = Bulk()
        self.prefix = prefix
        self._evalsha = once("EVALSHA") + once(sha)
        self._tail = once(MARK_TTL_S) + once(ORPHAN_TTL_S) + once(replica)  # ARGV[2..4]
        # per rate scope: (the RateCheck, minute, its tpm and parallel keys, its two flags) encoded
        self._rates: dict[str, tuple[RateCheck, int, bytes, bytes]] = {}

    def _rate(self, r: RateCheck, minute: int) -> tuple[bytes, bytes]:
        hit = self._rates.get(r.scope)
        if hit is None or hit[0] is not r or hit[1] != minute:
            p = self.prefix
            keys = once(f"{p}tpm:{r.scope}:{minute}") + once(f"{p}par:{r.scope}")
            flags = once(int(r.tpm is not None)) + once(int(r.max_parallel is not None))
            hit = remember(self._rates, r.scope, (r, minute, keys, flags))
        return hit[2], hit[3]

    def pack(self, batch: list[tuple[Ticket, list[int], int]], marker: str) -> bytes:
        """The same bytes as the generic packer makes of ``SettleBatcher.encode(batch, marker)``."""
        bulk = self.bulk
        ig, sg, bi = bulk._int.get, bulk._str.get, bulk.i
        keys: list[bytes] = [once(marker)]
        args: list[bytes] = [bi(len(batch)), self._tail]
        n_keys, n_args = 1, 4
        p = self.prefix
        for ticket, actual, total in batch:
            delta = total - ticket.prompt_tokens
            args += [ig(len(ticket.rates)) or bi(len(ticket.rates)), ig(len(ticket.budgets)) or bi(len(ticket.budgets)),
                     ig(delta) or bi(delta)]
            for r in ticket.rates:
                k, flags = self._rate(r, ticket.minute)
                keys.append(k)
                args.append(flags)
            for b, cost in zip(ticket.budgets, actual, strict=True):
                key = f"{p}bud:{b.counter}"
                keys.append(sg(key) or bulk.s(key))
                args += [ig(b.reserve) or bi(b.reserve), ig(cost) or bi(cost), sg(b.gen) or bulk.s(b.gen)]
            n_keys += 2 * len(ticket.rates) + len(ticket.budgets)
            n_args += 3 + 2 * len(ticket.rates) + 3 * len(ticket.budgets)
        return b"".join([b"*%d\r\n" % (3 + n_keys + n_args), self._evalsha, bi(n_keys), *keys, *args])
