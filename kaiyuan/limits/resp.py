"""The Redis admit of a keyed request, packed in RESP with the parts that repeat encoded once.

Why: ``hiredis.pack_command`` formats every argument with ``sprintf`` and a decimal conversion,
about 1,600 instructions per argument under callgrind; the admit has ~27 arguments (~44,000
instructions per request, the largest single item of a Redis-backed key's cost, bench/RESULTS.md
"Issue 13, keys round 5"). Most of them are the same from one request of a key to the next: the
script's sha, the rate-window keys (per minute), the limits, the budget counter's key (per
period), this replica's id. Here an argument is encoded once (``$<len>\\r\\n<bytes>\\r\\n``) and
kept in a bounded memo; a command is the concatenation of those pieces behind its ``*<n>`` header.
Values that never repeat (the admit's deadline) are encoded without the memo. The bytes are exactly
what ``pack_command`` makes of the same list (tested), so Redis sees the same command.

Arguments are ``str`` (any text: lengths are counted in UTF-8 bytes) or ``int`` (not ``bool``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

K = TypeVar("K")
V = TypeVar("V")

if TYPE_CHECKING:
    from kaiyuan.limits.counters import BudgetCheck, RateCheck

MEMO_MAX = 4096  # encoded arguments kept per kind (str, int); the memo is emptied when it is full


class Bulk:
    """Encoded arguments, memoised (bounded)."""

    def __init__(self) -> None:
        self._str: dict[str, bytes] = {}
        self._int: dict[int, bytes] = {}

    def s(self, v: str) -> bytes:
        return self._str.get(v) or remember(self._str, v, once(v))

    def i(self, v: int) -> bytes:
        return self._int.get(v) or remember(self._int, v, once(v))


def remember(memo: dict[K, V], key: K, value: V) -> V:
    """Keep ``value`` for ``key`` in ``memo`` (emptied first when it holds MEMO_MAX entries)."""
    if len(memo) >= MEMO_MAX:
        memo.clear()
    memo[key] = value
    return value


def once(v: str | int) -> bytes:
    """One argument in RESP, not memoised."""
    if type(v) is str:
        raw = v.encode()
    elif type(v) is int:
        raw = b"%d" % v
    else:
        raise TypeError(f"a Redis argument here is str or int, not {type(v).__name__}")
    return b"$%d\r\n%b\r\n" % (len(raw), raw)


class AdmitPacker:
    """The ADMIT script's EVALSHA (its layout: ``kaiyuan.limits.counters.ADMIT_LUA``), packed from
    memoised pieces. One per RedisCounters: ``prefix``, ``replica`` and the script's ``sha`` are fixed."""

    def __init__(self, sha: str, prefix: str, replica: str, resof: str, window_ttl: int, parallel_ttl: int) -> None:
        self.bulk = Bulk()
        self.prefix = prefix
        self._evalsha = once("EVALSHA") + once(sha)
        self._replica = once(replica)
        self._resof = once(resof)
        self._ttls = once(window_ttl) + once(parallel_ttl)
        self._zero, self._one = once(0), once(1)
        # per rate scope: (the RateCheck, minute, its 3 keys, its 3 limits) encoded, for the current minute
        self._rates: dict[str, tuple[RateCheck, int, bytes, bytes]] = {}
        self._budget_keys: dict[str, bytes] = {}  # budget counter -> its hash's key, encoded

    def _budget_key(self, counter: str) -> bytes:
        return self._budget_keys.get(counter) or remember(self._budget_keys, counter, once(f"{self.prefix}bud:{counter}"))

    def _rate(self, r: RateCheck, minute: int) -> tuple[RateCheck, int, bytes, bytes]:
        """``r``'s keys for ``minute`` and its limits (with the parallel counts, 0 and 0, when it has
        no parallel limit), encoded; kept until the minute or the key's record changes."""
        hit = self._rates.get(r.scope)
        if hit is None or hit[0] is not r or hit[1] != minute:
            p, s = self.prefix, r.scope
            keys = once(f"{p}rpm:{s}:{minute}") + once(f"{p}tpm:{s}:{minute}") + once(f"{p}par:{s}")
            lims = b"".join([once(-1 if v is None else v) for v in (r.rpm, r.tpm, r.max_parallel)])
            if r.max_parallel is None:
                lims += once(0) + once(0)
            hit = remember(self._rates, r.scope, (r, minute, keys, lims))
        return hit

    def pack(self, rates: list[RateCheck], budgets: list[BudgetCheck], prompt_tokens: int, minute: int, deadline: int,
             marker: str | None, queued: dict[str, int], inflight: dict[str, int]) -> bytes:
        """The admit command; the same bytes as ``pack(["EVALSHA", sha, len(keys), *keys, *args])``
        with the keys and arguments ``RedisCounters.admit_lists`` gives. (Every keyed request runs
        this: the memo is read with ``dict.get`` in place, a call of ``Bulk.i`` only on a miss.)"""
        bulk = self.bulk
        ig, sg, bi = bulk._int.get, bulk._str.get, bulk.i
        keys: list[bytes] = []
        args: list[bytes] = [ig(len(rates)) or bi(len(rates)), ig(len(budgets)) or bi(len(budgets)),
                             ig(prompt_tokens) or bi(prompt_tokens), self._ttls,
                             self._one if marker is not None else self._zero, once(deadline), self._replica]
        for r in rates:
            hit = self._rates.get(r.scope)
            if hit is None or hit[0] is not r or hit[1] != minute:
                hit = self._rate(r, minute)
            keys.append(hit[2])
            args.append(hit[3])
            if r.max_parallel is not None:
                q, f = queued.get(r.scope, 0), inflight.get(r.scope, 0)
                args += [ig(q) or bi(q), ig(f) or bi(f)]
        for b in budgets:
            keys.append(self._budget_keys.get(b.counter) or self._budget_key(b.counter))
            ttl = b.ttl_s if b.ttl_s else -1
            args += [ig(b.limit) or bi(b.limit), ig(b.seed) or bi(b.seed), ig(b.reserve) or bi(b.reserve),
                     ig(ttl) or bi(ttl), sg(b.known) or bulk.s(b.known)]
        keys.append(self._resof)
        if marker is not None:
            keys.append(once(marker))
        n_keys = 3 * len(rates) + len(budgets) + 1 + (marker is not None)
        n_args = 8 + 5 * len(rates) + 5 * len(budgets)
        return b"".join([b"*%d\r\n" % (3 + n_keys + n_args), self._evalsha, ig(n_keys) or bi(n_keys), *keys, *args])
