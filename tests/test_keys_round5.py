"""The keyed request path after issue 13's keys round 5: a reservation decided in process makes no
coroutine (``reserve_now`` / ``release_now`` answer ``None``), while the cases that must wait still
return one; a budget's period and limit, worked out once per period, follow a new period and a
reloaded budget; the prompt walk's shortcut for ``{"role", "content"}`` messages counts what the
full walk counts; and the integer estimate is ``ceil(bytes / 2)``."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from kaiyuan.accounting import keystore, tokens
from kaiyuan.accounting.keystore import Budget
from kaiyuan.accounting.tokens import count_with, estimate_tokens
from kaiyuan.config import parse_config
from kaiyuan.context import RequestContext, Usage
from kaiyuan.errors import GatewayError
from kaiyuan.gateway import Gateway
from kaiyuan.limits.counters import NANO, SEED_UNKNOWN
from kaiyuan.offload import OFF_LOOP_BYTES
from kaiyuan.store.db import open_store
from tests.keyed_env import BODY, PRICE, Scenario, keyed_setup, run_keyed


@pytest.fixture
def keyed(tmp_path: Path) -> Callable[..., Any]:
    """A gateway object (no HTTP server) and a virtual key with RPM, TPM and a monthly budget of
    ``limit_usd``, counted in process."""

    def run(scenario: Scenario, limit_usd: float = 10**6) -> Any:
        return run_keyed(*keyed_setup(tmp_path / f"k{limit_usd}.db", "deepseek-chat", limit_usd), scenario)

    return run


def _ctx(key: str, i: int, body: dict[str, Any] = BODY) -> RequestContext:
    return RequestContext(f"req-{i}", "openai", "chat", headers={"Authorization": f"Bearer {key}"},
                          body=body, raw_body=orjson.dumps(body), model="m")


def test_in_process_reserve_and_release_are_decided_without_a_coroutine(keyed: Callable[..., Any]) -> None:
    async def scenario(gw: Gateway, key: str) -> None:
        for i in range(3):
            ctx = _ctx(key, i)
            rec = await gw.auth.authenticate(ctx)
            assert rec is not None
            if i == 0:  # the first request seeds the budget counter from the ledger: that one waits
                pending = gw.reservations.reserve_now(ctx, rec)
                assert pending is not None
                await pending
            else:
                assert gw.reservations.reserve_now(ctx, rec) is None
            assert ctx.ticket is not None and ctx.ticket.backend == "memory"
            ctx.deployment, ctx.usage = "m-dep", Usage(12, 10)
            assert gw.reservations.release_now(ctx, 12 * 1e-6 + 10 * 2e-6) is None and ctx.ticket is None
        ((spent, reserved),) = [tuple(v) for v in gw.reservations.local.budgets.values()]
        assert reserved == 0 and spent == 3 * round((12 * 1e-6 + 10 * 2e-6) * NANO)  # exact nano-dollars

    keyed(scenario)


def test_a_large_prompt_is_still_reserved_off_the_loop(keyed: Callable[..., Any]) -> None:
    async def scenario(gw: Gateway, key: str) -> None:
        big = {**BODY, "messages": [{"role": "user", "content": "x" * OFF_LOOP_BYTES}]}
        ctx = _ctx(key, 1, big)
        rec = await gw.auth.authenticate(ctx)
        assert rec is not None
        pending = gw.reservations.reserve_now(ctx, rec)
        assert pending is not None
        await pending
        assert ctx.ticket is not None and ctx.prompt_estimate == OFF_LOOP_BYTES // 2 + 4 + 3

    keyed(scenario)


def test_a_refusal_is_raised_at_once_in_the_callers_terms(keyed: Callable[..., Any]) -> None:
    async def scenario(gw: Gateway, key: str) -> None:
        ctx = _ctx(key, 1)
        rec = await gw.auth.authenticate(ctx)
        assert rec is not None
        await gw.reservations.reserve(ctx, rec)  # seeds the counter (a tiny budget, not yet spent)
        second = _ctx(key, 2)
        await gw.auth.authenticate(second)
        with pytest.raises(GatewayError) as e:
            gw.reservations.reserve_now(second, rec)  # the first one's reservation fills the budget
        assert e.value.status == 429 and e.value.code == "budget_exceeded" and rec.key_id in e.value.message

    keyed(scenario, limit_usd=0.0002)


def test_a_budgets_counter_follows_the_period_and_a_reloaded_limit(keyed: Callable[..., Any]) -> None:
    async def scenario(gw: Gateway, key: str) -> None:
        ctx = _ctx(key, 1)
        rec = await gw.auth.authenticate(ctx)
        assert rec is not None
        (b,) = rec.budgets
        r = gw.reservations
        nov, dec = 1_764_000_000.0, 1_764_600_000.0  # 2025-11-24 and 2025-12-01 (UTC)
        (c1,) = r._budget_checks(rec, nov, 0.5)
        (c2,) = r._budget_checks(rec, nov + 3600, 0.5)
        (c3,) = r._budget_checks(rec, dec, 0.5)
        start_nov, end_nov = keystore.period_bounds("month", nov)
        assert c1.counter == c2.counter == f"{b.id}:{int(start_nov)}"
        assert c3.counter == f"{b.id}:{int(keystore.period_bounds('month', dec)[0])}"
        assert (c1.limit, c1.seed, c1.reserve) == (round(b.limit_usd * NANO), SEED_UNKNOWN, NANO // 2)
        assert c1.ttl_s == int(end_nov - nov) + 2 * 86400 and c2.ttl_s == c1.ttl_s - 3600
        assert c1 is not c2  # a new check per request: the Redis admit writes into it
        rec.budgets = [Budget(b.id, b.scope, b.scope_id, b.period, 7.5)]  # a reload with a new limit
        (c4,) = r._budget_checks(rec, dec, 0.5)
        assert c4.limit == 7_500_000_000 and c4.counter == c3.counter
        rec.budgets = [Budget(b.id, b.scope, b.scope_id, "total", 1.0)]
        (c5,) = r._budget_checks(rec, dec, 0.5)
        assert c5.counter == f"{b.id}:0" and c5.ttl_s is None

    keyed(scenario)


MESSAGES = [
    {"role": "user", "content": "plain text"},
    {"role": "user", "content": "开源 text"},
    {"role": "assistant", "content": "", "name": "bot"},  # three keys: the full walk (the name is text)
    {"role": "user", "content": [{"type": "text", "text": "parts"}, {"type": "image_url", "image_url": {"url": "x"}}]},
    {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    {"content": "no role", "x": "y"},
    {"role": "user", "content": None},
]


@pytest.mark.parametrize("message", MESSAGES)
def test_the_message_shortcut_counts_what_the_full_walk_counts(message: dict[str, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"model": "m", "messages": [message, message], "tools": [{"type": "function", "function": {"name": "f"}}]}
    fast = count_with(estimate_tokens, body)

    def walk(node: Any, out: list[str], images: list[int]) -> None:  # the walk without the shortcut
        if isinstance(node, list):
            for v in node:
                if isinstance(v, str):
                    out.append(v)
                else:
                    tokens._strings({"_": v}, out, images) if isinstance(v, dict) else walk(v, out, images)
        else:
            real(node, out, images)

    real = tokens._strings
    monkeypatch.setattr(tokens, "_strings", walk)
    assert count_with(estimate_tokens, body) == fast


@pytest.mark.parametrize("text", ["", "a", "ab", "abc", "开", "开源", "é", "x" * 1001, "naïve 数据"])
def test_the_estimate_is_ceil_of_half_the_utf8_bytes(text: str) -> None:
    assert estimate_tokens(text) == math.ceil(len(text.encode("utf-8")) / 2)


def test_a_spend_row_is_every_ledger_column_and_reads_back_by_name(tmp_path: Path) -> None:
    """The ledger queues rows as tuples (``SpendRow``); they must carry every column of the table and
    land in the columns of their names, on SQLite's fast path as through SQLAlchemy."""
    from sqlalchemy import select

    from kaiyuan.accounting.ledger import SpendLedger, SpendRow
    from kaiyuan.context import Principal
    from kaiyuan.observability.metrics import Metrics
    from kaiyuan.store.schema import spend_ledger

    assert set(SpendRow._fields) == {c.name for c in spend_ledger.columns}
    engine = open_store(f"sqlite:///{tmp_path}/l.db")

    async def main() -> None:
        ledger = SpendLedger(engine, 60, Metrics().store)
        for i in range(40):  # more than one multi-row statement
            c = RequestContext(f"req-{i}", "openai", "chat", model="m", status=200, usage=Usage(5 + i, 7, i % 2 or None))
            c.principal = Principal(key_id="k1", team_id=None if i % 3 else "t1", user_id="u1")
            c.deployment = "m-dep"
            ledger.record(c, 0.25 + i / NANO, "up-model", "vendor")
        assert ledger.seq_of("req-39") == 39 and ledger.seq_of("req-38") is None
        assert await ledger.spent_since("team", "t1", 0) == pytest.approx(sum(0.25 + i / NANO for i in range(0, 40, 3)))
        assert await ledger.flush() == 40
        await ledger.close()

    asyncio.run(main())
    with engine.connect() as conn:
        rows = {r["request_id"]: r for r in conn.execute(select(spend_ledger)).mappings()}
    r7 = rows["req-7"]
    assert (r7["key_id"], r7["team_id"], r7["user_id"], r7["model"], r7["deployment"], r7["upstream_model"],
            r7["vendor"], r7["prompt_tokens"], r7["completion_tokens"], r7["cached_tokens"]) == (
        "k1", None, "u1", "m", "m-dep", "up-model", "vendor", 12, 7, 1)
    assert r7["cost_usd"] == 0.25 + 7 / NANO and rows["req-9"]["team_id"] == "t1" and rows["req-8"]["cached_tokens"] is None


def test_a_whole_answer_is_priced_once_unless_its_usage_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The x-kaiyuan-cost header prices the usage, the settle prices it again: the second time the
    same price and usage reuse the first cost; a usage the settle clamped (or any field that counts)
    is priced anew."""
    from kaiyuan.accounting.costing import Costing
    from kaiyuan.accounting.prices import ResolvedPrice
    from kaiyuan.config import AccountingSettings

    cfg = parse_config({"models": [{"name": "m", "deployments": [{"id": "m-dep", "provider": "openai_compatible",
                                     "base_url": "http://127.0.0.1:9/v1", "model": "x", "price": PRICE}]}]}, "<test>")
    costing = Costing(cfg.models, AccountingSettings())
    calls: list[int] = []
    real = ResolvedPrice.cost

    def counted(self: ResolvedPrice, usage: Usage) -> float | None:
        calls.append(1)
        return real(self, usage)

    monkeypatch.setattr(ResolvedPrice, "cost", counted)
    ctx = RequestContext("r", "openai", "chat", usage=Usage(1000, 500, 200))
    ctx.deployment = "m-dep"
    first = costing.cost(ctx)
    assert costing.cost(ctx) == first and len(calls) == 1
    assert first == (800 * 1.0 + 200 * 1.0 + 500 * 2.0) / 1e6
    for change in ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens"):
        setattr(ctx.usage, change, 100)
        again = costing.cost(ctx)
        assert again == real(costing.deployments["m-dep"].price, ctx.usage)  # type: ignore[arg-type]
    assert len(calls) == 5
