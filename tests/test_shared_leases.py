"""Leases (kaiyuan.limits.lease): workers admit from slices of the supervisor's limits and budgets.

Real CounterServer and SharedCounters clients on a Unix socket, each client standing for one worker
and admitting the way the gateway does (``admit_leased`` first, the round trip when it answers None).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from kaiyuan.limits.counters import BudgetCheck, Denial, MemoryCounters, RateCheck, Ticket
from kaiyuan.limits.shared import CounterServer, SharedCounters
from kaiyuan.testing.fake_openai import FakeOpenAI
from tests.test_workers import Served, _chat, served  # noqa: F401  (served: the fixture)


async def _admit(w: SharedCounters, rates: list[RateCheck], budgets: list[BudgetCheck], tokens: int,
                 now: float) -> Ticket | Denial:
    t = w.admit_leased(rates, budgets, tokens, now)
    if t is not None:
        return t
    out = await w.admit(rates, budgets, tokens, now)
    assert isinstance(out, Ticket | Denial), out
    return out


def _budget(limit: int, reserve: int) -> list[BudgetCheck]:
    return [BudgetCheck("b:0", limit, 0, reserve, None)]


async def _settled(w: SharedCounters) -> None:
    """Wait until what ``w`` buffered has been applied (a peek is answered after it, in order)."""
    await w.peek_budget("b:0")


async def _pair(tmp_path: Path) -> tuple[CounterServer, list[SharedCounters]]:
    server = CounterServer(str(tmp_path / "c.sock"))
    await server.start()
    ws = [SharedCounters(server.path), SharedCounters(server.path)]
    for w in ws:
        await w.connect()
    return server, ws


async def _close(server: CounterServer, ws: list[SharedCounters]) -> None:
    for w in ws:
        await w.close()
    await server.close()


async def test_most_admits_need_no_round_trip_and_the_slices_come_back(tmp_path: Path) -> None:
    server, (a, b) = await _pair(tmp_path)
    try:
        rates = [RateCheck("key:k", 10_000, 10_000_000, None)]
        tickets = [await _admit(a, rates, _budget(10**12, 1000), 50, 60.0) for _ in range(200)]
        assert all(isinstance(t, Ticket) for t in tickets)
        assert sum(t.lease is not None for t in tickets if isinstance(t, Ticket)) >= 190  # asked for ahead of need
        assert server.messages < 20  # a few round trips and asks, not one per request
        for t in tickets:
            assert isinstance(t, Ticket) and a.settle_later(t, [400], 70)
        await _settled(a)
        spent, reserved = server.counters.budgets["b:0"]
        assert spent == 200 * 400 and reserved > 0  # the unused slice counts as reserved
        assert server.counters.tpm["key:k"][1] >= 200 * 70
        for _ in range(500):  # unused for lease.IDLE_S: the slices go back on their own
            if server.counters.budgets["b:0"][1] == 0:
                break
            await asyncio.sleep(0.01)
        assert server.counters.budgets["b:0"] == [200 * 400, 0]
        assert server.counters.rpm["key:k"][1] == 200 and server.counters.tpm["key:k"][1] == 200 * 70
        assert not a.slices
        t = await _admit(a, rates, _budget(10**12, 1000), 50, 60.0)
        assert isinstance(t, Ticket) and a.slices
        assert a.settle_later(t, [400], 70)
        await a.close()  # a graceful stop (nothing in flight) returns every slice
        await _settled(b)
        assert server.counters.budgets["b:0"] == [201 * 400, 0]
    finally:
        await _close(server, [a, b])


async def test_two_workers_under_load_never_pass_a_limit_or_a_budget(tmp_path: Path) -> None:
    """Concurrent bursts from two workers against RPM 90 and a budget of 60 reservations: exactly
    the limit is admitted across both, and the spend never passes the budget."""
    server, ws = await _pair(tmp_path)
    try:
        rates = [RateCheck("key:r", 90, None, None)]
        got = await asyncio.gather(*(_admit(ws[i % 2], rates, [], 1, 60.0) for i in range(300)))
        assert sum(isinstance(t, Ticket) for t in got) == 90
        assert {t.kind for t in got if isinstance(t, Denial)} == {"rpm"}
        budget = _budget(60 * 1000, 1000)
        admitted, over = 0, 0
        for _round in range(6):  # bursts, each settled before the next: costs 700..1300 per request
            got = await asyncio.gather(*(_admit(ws[i % 2], [], budget, 1, 60.0) for i in range(40)))
            done = [(i, t) for i, t in enumerate(got) if isinstance(t, Ticket)]
            admitted += len(done)
            spent, reserved = server.counters.budgets["b:0"]
            # only a cost above its own reservation (1,300 > 1,000) can pass the limit, by as much
            assert spent + reserved <= 60 * 1000 + over
            for i, t in done:
                cost = 700 + 600 * (i % 2)
                over += max(0, cost - 1000)
                ws[i % 2].settle_later(t, [cost], 1)
            for w in ws:
                await _settled(w)
        for w in ws:
            await w.close()
        spent, reserved = server.counters.budgets["b:0"]
        assert reserved == 0 and admitted >= 50
        assert spent <= 60 * 1000 + over
    finally:
        await _close(server, ws)


async def test_a_refusal_recalls_the_other_workers_slices_first(tmp_path: Path) -> None:
    """Worker a holds slices of the key's limits; b's admit that the supervisor would refuse waits
    until a has returned them, and then uses the headroom; a denial counts only what is used."""
    server, (a, b) = await _pair(tmp_path)
    try:
        rates = [RateCheck("key:k", 40, None, None)]
        first = [await _admit(a, rates, [], 1, 60.0) for _ in range(3)]
        assert all(isinstance(t, Ticket) for t in first)
        assert a.slices.rpm["key:k"].left > 0  # headroom parked in a's slice
        got = [await _admit(b, rates, [], 1, 60.0) for _ in range(37)]
        assert all(isinstance(t, Ticket) for t in got), got
        d = await _admit(b, rates, [], 1, 60.0)
        assert isinstance(d, Denial) and (d.kind, d.current) == ("rpm", 40)
        assert not a.slices.rpm.get("key:k") or a.slices.rpm["key:k"].left == 0
        budget = _budget(10_000, 1000)
        t = await _admit(a, [], budget, 1, 60.0)
        assert isinstance(t, Ticket) and a.slices.bud["b:0"].left > 0
        got = [await _admit(b, [], budget, 1, 60.0) for _ in range(9)]
        assert all(isinstance(x, Ticket) for x in got), got
        d = await _admit(b, [], budget, 1, 60.0)
        assert isinstance(d, Denial) and (d.kind, d.current, d.reserved) == ("budget", 0, 10_000)
    finally:
        await _close(server, [a, b])


async def test_a_worker_killed_mid_lease_counts_its_budget_slice_as_spent(tmp_path: Path) -> None:
    server, (a, b) = await _pair(tmp_path)
    try:
        budget = _budget(100_000, 1000)
        t = await _admit(a, [], budget, 1, 60.0)
        t2 = await _admit(a, [], budget, 1, 60.0)
        assert isinstance(t2, Ticket) and t2.lease is not None  # in flight, from a's slice
        held = server.counters.budgets["b:0"][1]
        assert held > 2000
        transport = a._open()
        assert transport is not None
        transport.abort()  # the worker dies: no settle, no return
        for _ in range(200):
            if server.counters.budgets["b:0"][1] == 0:
                break
            await asyncio.sleep(0.005)
        assert server.counters.budgets["b:0"] == [held, 0]  # all it held counts as spent: never an overspend
        assert isinstance(t, Ticket) and a.settle_later(t2, [10], 1)  # a stale settle goes nowhere
        got = [await _admit(b, [], budget, 1, 60.0) for _ in range((100_000 - held) // 1000 + 1)]
        assert [isinstance(x, Ticket) for x in got].count(True) == (100_000 - held) // 1000
        assert isinstance(got[-1], Denial)
    finally:
        await _close(server, [a, b])


async def test_revocation_and_a_changed_limit_drop_the_slices(tmp_path: Path) -> None:
    server, (a, b) = await _pair(tmp_path)
    heard: list[str | None] = []
    a.on_invalidate = heard.append
    try:
        rates = [RateCheck("key:k", 1000, None, None)]
        assert isinstance(await _admit(a, rates, _budget(50_000, 100), 1, 60.0), Ticket)
        assert a.slices.bud["b:0"].left > 0 and a.slices.rpm["key:k"].left > 0
        await b.publish_invalidation("hash1")  # b changed or revoked the key
        await _settled(b)
        for _ in range(200):
            if heard:
                break
            await asyncio.sleep(0.005)
        assert heard == ["hash1"]
        await _settled(a)
        assert not a.slices.rpm and a.slices.bud["b:0"].left == 0
        assert server.counters.budgets["b:0"][1] == 100  # only the request in flight stays reserved
        assert server.counters.rpm["key:k"][1] == 1
        # a lower limit is not admitted from a slice granted under the old one
        t = await _admit(a, rates, _budget(50_000, 100), 1, 60.0)
        assert isinstance(t, Ticket) and a.slices.rpm["key:k"].left > 0
        t = await _admit(a, [RateCheck("key:k", 2, None, None)], [], 1, 60.0)
        assert isinstance(t, Denial) and t.current == 2
    finally:
        await _close(server, [a, b])


async def test_bad_lease_frames_close_only_their_connection(tmp_path: Path) -> None:
    from kaiyuan.limits.shared import frame

    server, (a, b) = await _pair(tmp_path)
    try:
        budget = _budget(100_000, 1000)
        assert isinstance(await _admit(b, [], budget, 1, 60.0), Ticket)
        before = list(server.counters.budgets["b:0"])
        for bad in (["r", 0, "x", [], []], ["u", [[1, 2]], []], ["r", 0, [["b:0", -5000]], [], []]):
            w = a._open() or (await a.connect(), a._open())[1]
            assert w is not None
            w.write(frame(bad))
            await asyncio.sleep(0.05)
        assert server.counters.budgets["b:0"] == before  # a negative return changes nothing
        assert isinstance(await _admit(b, [], budget, 1, 60.0), Ticket)
    finally:
        await _close(server, [a, b])


async def test_randomised_sequences_decide_as_one_memory_counter_does(tmp_path: Path) -> None:
    """One request at a time from either worker, settled in random order: every admit decides as
    a single MemoryCounters on the same sequence, with the same numbers in every denial, and the
    budget ends with the same spend."""
    rng = random.Random(1306)
    server, ws = await _pair(tmp_path)
    ref = MemoryCounters()
    try:
        phases = [[RateCheck("key:q", 100, 10**6, None)], [RateCheck("key:q", 10**4, 8_000, None)],
                  [RateCheck("key:q", 10**4, 10**6, None)]]  # a limit changed: the old slices do not apply
        limit = 800_000
        open_: list[tuple[int, Ticket, Ticket]] = []
        denied: set[str] = set()
        for step in range(1800):
            now = 60.0 + step * 0.1  # a minute per phase: RPM binds in the 1st, TPM in the 2nd, the budget in the 3rd
            if open_ and rng.random() < 0.45:
                wi, t, rt = open_.pop(rng.randrange(len(open_)))
                cost = rng.choice([0, 500, 2_500, 4_000, 6_000])  # sometimes above its reservation
                total = t.prompt_tokens + rng.randint(-t.prompt_tokens, 100)
                assert ws[wi].settle_later(t, [cost], total)
                ref.settle_sync(rt, [cost], total)
                await _settled(ws[wi])
                continue
            wi = rng.randrange(2)
            tokens = rng.randint(10, 200)
            rates = phases[step // 600]
            budget = [BudgetCheck("b:0", limit, 0, 5_000, None)]
            got = await _admit(ws[wi], rates, budget, tokens, now)
            want = ref.admit_sync(rates, [BudgetCheck("b:0", limit, 0, 5_000, None)], tokens, now)
            if isinstance(want, Ticket):
                assert isinstance(got, Ticket), (step, got)
                open_.append((wi, got, want))
            else:
                assert isinstance(want, Denial) and isinstance(got, Denial), (step, got, want)
                assert (got.kind, got.current, got.reserved) == (want.kind, want.current, want.reserved), step
                denied.add(got.kind)
        for wi, t, rt in open_:
            ws[wi].settle_later(t, [1_000], t.prompt_tokens)
            ref.settle_sync(rt, [1_000], rt.prompt_tokens)
        for w in ws:
            await w.close()
        await asyncio.sleep(0.05)
        assert server.counters.budgets["b:0"] == ref.budgets["b:0"]
        assert denied == {"rpm", "tpm", "budget"}  # every limit was reached on the way
    finally:
        await _close(server, ws)


async def test_a_stalled_worker_does_not_hold_a_refusal_forever(tmp_path: Path) -> None:
    """A worker that does not read (its loop is stuck) cannot answer a recall: the admit that waits
    for its slices is decided after RECALL_WAIT_S with what is back, counting the stuck worker's
    slice as used (under-use, never overspend)."""
    server, (a, b) = await _pair(tmp_path)
    try:
        rates = [RateCheck("key:k", 40, None, None)]
        assert isinstance(await _admit(a, rates, [], 1, 60.0), Ticket)
        parked = a.slices.rpm["key:k"].left
        assert parked > 0
        transport = a._open()
        assert transport is not None
        transport.pause_reading()
        got = [await asyncio.wait_for(_admit(b, rates, [], 1, 60.0), 30) for _ in range(40 - 1 - parked + 1)]
        assert all(isinstance(x, Ticket) for x in got[:-1])
        d = got[-1]
        assert isinstance(d, Denial) and (d.kind, d.current) == ("rpm", 40)
        transport.resume_reading()
    finally:
        await _close(server, [a, b])


def test_through_two_workers_the_admin_api_shows_slices_as_reserved_until_they_come_back(
        served: Served, fake_openai: FakeOpenAI) -> None:  # noqa: F811
    """End to end (`kaiyuan serve --workers 2`, the OpenAI SDK): a key's requests are admitted from
    slices; with none in flight the budget's reserved_usd is the unused slices, and once they are
    returned (idle for lease.IDLE_S) it is 0 and spent_usd equals the ledger's sum."""
    import openai
    from sqlalchemy import create_engine, func, select

    from kaiyuan.store.schema import spend_ledger

    key = served.admin("POST", "/admin/keys", {"name": "leased", "rpm": 1000,
                                               "budgets": [{"period": "total", "limit_usd": 50}]})
    c = openai.OpenAI(base_url=served.url + "/v1", api_key=key["key"], max_retries=0)
    results = [_chat(served.url, key["key"], client=c) for _ in range(30)]
    assert results == ["ok"] * 30
    seen_reserved = []
    deadline = time.monotonic() + 20
    b: dict[str, Any] = {}
    while time.monotonic() < deadline:
        b = served.admin("GET", f"/admin/keys/{key['id']}")["budgets"][0]
        seen_reserved.append(b["reserved_usd"])
        if b["reserved_usd"] == 0:
            break
        time.sleep(0.1)
    assert seen_reserved[0] > 0, seen_reserved  # the unused slices, nothing in flight
    assert b["reserved_usd"] == 0, seen_reserved  # returned when idle
    engine = create_engine(served.config["store"]["url"])
    q = select(func.count(), func.coalesce(func.sum(spend_ledger.c.cost_usd), 0)).where(spend_ledger.c.key_id == key["id"])
    rows, spent = 0, 0.0
    while time.monotonic() < deadline:  # the workers' ledger writers flush every 0.2 s
        with engine.connect() as conn:
            rows, spent = conn.execute(q).one()
        if rows >= 30:
            break
        time.sleep(0.2)
    engine.dispose()
    assert rows == 30 and b["spent_usd"] == pytest.approx(float(spent), abs=1e-6)
