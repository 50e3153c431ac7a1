"""The Redis admit and settle batch packed from memoised pieces (kaiyuan/limits/resp.py) are byte
for byte the commands the generic packer makes of their keys and arguments: for every shape of key (rate scopes with and
without each limit, parallel counts, budgets with and without a seed, a ttl, a known generation,
text that is not ASCII), across a change of minute and a reloaded key whose limits changed, and
with the memo emptied when full. No server needed: only bytes are compared.
"""

from __future__ import annotations

import pytest

from kaiyuan.limits import resp
from kaiyuan.limits.counters import NANO, BudgetCheck, RateCheck, RedisCounters, Ticket
from kaiyuan.limits.pipelining import pack, pack_py


def _generic(c: RedisCounters, *a: object) -> bytes:
    keys, args = c.admit_lists(*a)  # type: ignore[arg-type]
    return pack(["EVALSHA", c._admit.sha, len(keys), *keys, *args])


RATES = [
    [],
    [RateCheck("key:k_1", 60, 100_000, None)],
    [RateCheck("key:k_1", None, None, 4), RateCheck("team:t_é", 10, None, None)],
]
BUDGETS = [
    [],
    [BudgetCheck("b_1:1764547200", 10**15, -1, 123_456_789, 86_400 * 33)],
    [BudgetCheck("b_1:1764547200", 5 * 10**9, 42, 7, None, known="1764449999.123456"),
     BudgetCheck("b_2:0", 1, -1, 0, None, known="")],
]


@pytest.mark.parametrize("rates", RATES)
@pytest.mark.parametrize("budgets", BUDGETS)
@pytest.mark.parametrize("marker", [None, "ky:settled:abc:7"])
async def test_packed_admit_is_the_generic_command(rates: list[RateCheck], budgets: list[BudgetCheck],
                                                   marker: str | None) -> None:
    c = RedisCounters("redis://127.0.0.1:1/0")
    try:
        queued, inflight = {"key:k_1": 3}, {"key:k_1": 1}
        for minute, prompt, deadline in ((29_000_000, 12, 1_764_449_999_123), (29_000_000, 13, -1),
                                         (29_000_001, 12, 1_764_450_060_000)):
            a = (rates, budgets, prompt, minute, deadline, marker, queued, inflight)
            got = c._admit_packer.pack(*a)
            assert got == _generic(c, *a)
            keys, args = c.admit_lists(*a)
            assert got == pack_py(["EVALSHA", c._admit.sha, len(keys), *keys, *args])  # and the Python packer's
    finally:
        await c.close()


async def test_a_reloaded_key_with_new_limits_is_packed_with_them() -> None:
    c = RedisCounters("redis://127.0.0.1:1/0")
    try:
        old, new = RateCheck("key:k_1", 60, None, None), RateCheck("key:k_1", 30, 500, 2)  # same scope, new record
        for r in (old, new, old):
            a = ([r], [], 5, 29_000_000, 1, None, {}, {})
            assert c._admit_packer.pack(*a) == _generic(c, *a)
        assert b"$2\r\n30\r\n$3\r\n500\r\n$1\r\n2\r\n" in c._admit_packer.pack([new], [], 5, 29_000_000, 1, None, {}, {})
    finally:
        await c.close()


def test_the_memo_is_bounded_and_stays_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resp, "MEMO_MAX", 8)
    bulk = resp.Bulk()
    for i in range(100):
        assert bulk.i(i) == pack_py([i])[4:] and bulk.s(f"k{i}") == pack_py([f"k{i}"])[4:]
        assert len(bulk._int) <= 8 and len(bulk._str) <= 8


def test_only_text_and_integers_are_arguments() -> None:
    with pytest.raises(TypeError):
        resp.once(True)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        resp.once(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("rates", RATES)
@pytest.mark.parametrize("budgets", BUDGETS)
async def test_packed_settle_batch_is_the_generic_command(rates: list[RateCheck], budgets: list[BudgetCheck]) -> None:
    c = RedisCounters("redis://127.0.0.1:1/0")
    try:
        bt = c.batcher
        for b in budgets:
            b.gen = "1764449999.123456"
        batch = [(Ticket(rates, budgets, minute, prompt, "redis"), [cost] * len(budgets), total)
                 for minute, prompt, cost, total in ((29_000_000, 10, 0, 10), (29_000_000, 12, 3 * NANO, 40),
                                                     (29_000_001, 12, 7, 3))]
        for part in (batch[:1], batch, batch[1:]):
            marker = "ky:settled:rep:9"
            keys, args = bt.encode(part, marker)
            got = bt._packer.pack(part, marker)
            assert got == pack(["EVALSHA", bt._script.sha, len(keys), *keys, *args])
            assert got == pack_py(["EVALSHA", bt._script.sha, len(keys), *keys, *args])
    finally:
        await c.close()
