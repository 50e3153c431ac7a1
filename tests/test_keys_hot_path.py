"""The keyed request path's own state (issue 13, keys round 4): what it builds once per key and
shares, what it must not leave behind (reference cycles), the in-process rate windows, and a prompt
that spells a tokenizer's special token (a 500 before: the tokenizer refused it)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from kaiyuan.accounting.tokens import count_prompt
from kaiyuan.context import RequestContext, Usage
from kaiyuan.gateway import Gateway
from kaiyuan.limits.counters import NANO, BudgetCheck, Denial, MemoryCounters, RateCheck, Ticket
from kaiyuan.pipeline import end
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model
from tests.http import http
from tests.keyed_env import BODY, MASTER, PRICE, Scenario, keyed_setup, run_keyed

RAW = orjson.dumps(BODY)


@pytest.fixture
def keyed(tmp_path: Path) -> Callable[[Scenario], Any]:
    """Run a scenario on a gateway object (no HTTP server) with a virtual key that has RPM, TPM and
    a monthly budget, counted in process: the admit and settle a keyed request runs, without an
    upstream. The gateway lives and is closed on the scenario's event loop."""
    cfg, engine, key = keyed_setup(tmp_path / "k.db", "gpt-4o-mini")
    return lambda scenario: run_keyed(cfg, engine, key, scenario)


async def _keyed_request(gw: Gateway, key: str, i: int) -> RequestContext:
    """Authenticate, reserve, then settle and finish (pipeline.end), as a request answered with usage."""
    ctx = RequestContext(f"req-{i}", "openai", "chat", headers={"Authorization": f"Bearer {key}"},
                         body=BODY, raw_body=RAW, model="m")
    rec = await gw.auth.authenticate(ctx)
    assert rec is not None
    await gw.reservations.reserve(ctx, rec)
    assert ctx.ticket is not None
    ctx.deployment, ctx.status, ctx.usage = "m-dep", 200, Usage(12, 10)
    await end(gw, ctx)
    return ctx


def test_keyed_requests_leave_no_reference_cycles(keyed: Callable[[Scenario], Any]) -> None:
    """Every object a keyed request makes (principal, checks, ticket, ledger row, log row) is freed
    by reference counting: none waits for the cyclic collector."""

    async def scenario(gw: Gateway, key: str) -> int:
        for i in range(50):  # warm-up: the key cache, tokenizer, first-use imports
            await _keyed_request(gw, key, i)
        gc.collect()
        gc.disable()
        try:
            await asyncio.gather(*(_keyed_request(gw, key, 1000 + i) for i in range(200)))
            return gc.collect()
        finally:
            gc.enable()

    assert keyed(scenario) == 0


def test_a_cached_key_shares_one_read_only_principal_and_its_rate_checks(keyed: Callable[[Scenario], Any]) -> None:
    async def scenario(gw: Gateway, key: str) -> None:
        a, b = await _keyed_request(gw, key, 1), await _keyed_request(gw, key, 2)
        assert a.principal is b.principal and a.principal.key_id is not None
        with pytest.raises(dataclasses.FrozenInstanceError):
            a.principal.policy = "self_hosted"  # type: ignore[misc]
        rec = await gw.auth.authenticate(RequestContext("r", "openai", "chat", headers={"Authorization": f"Bearer {key}"}))
        assert rec is not None and rec.rates == [RateCheck(f"key:{rec.key_id}", 10**9, 10**12, None)]
        # the budget was settled to the real cost: exact nano-dollars, nothing left reserved
        ((spent, reserved),) = [tuple(v) for v in gw.reservations.local.budgets.values()]
        one = 12 * PRICE["input"] / 1e6 + 10 * PRICE["output"] / 1e6
        assert reserved == 0 and spent == 2 * round(one * NANO)

    keyed(scenario)


# -- the in-process rate windows --------------------------------------------------------------------
def _admit(c: MemoryCounters, rate: RateCheck, tokens: int, now: float) -> Ticket | Denial:
    out = c.admit_sync([rate], [], tokens, now)
    assert isinstance(out, Ticket | Denial)
    return out


def test_rpm_window_is_the_calendar_minute_and_resets_with_the_next() -> None:
    c = MemoryCounters()
    r = RateCheck("key:a", 2, None, None)
    assert isinstance(_admit(c, r, 1, 60.0), Ticket) and isinstance(_admit(c, r, 1, 119.0), Ticket)
    d = _admit(c, r, 1, 119.9)
    assert isinstance(d, Denial) and (d.kind, d.current) == ("rpm", 2)
    assert isinstance(_admit(c, r, 1, 120.0), Ticket)  # a new minute


def test_tpm_settle_corrects_its_own_minute_only() -> None:
    c = MemoryCounters()
    r = RateCheck("key:a", None, 100, None)
    old = _admit(c, r, 40, 60.0)
    assert isinstance(old, Ticket)
    now = _admit(c, r, 40, 120.0)  # next minute: the window starts again at 40
    assert isinstance(now, Ticket)
    c.settle_sync(old, [], 90)  # the previous minute's request used 90: the current window is untouched
    assert c.tpm["key:a"] == [2, 40]
    c.settle_sync(now, [], 10)  # this minute's used 10, not 40
    assert c.tpm["key:a"] == [2, 10]
    d = _admit(c, r, 91, 121.0)
    assert isinstance(d, Denial) and (d.kind, d.current) == ("tpm", 10)


def test_idle_scopes_leave_the_windows_once_their_minute_is_old() -> None:
    c = MemoryCounters()
    for i in range(100):
        assert isinstance(_admit(c, RateCheck(f"key:{i}", 10, 10**6, None), 1, 60.0), Ticket)
    assert len(c.rpm) == len(c.tpm) == 100
    assert isinstance(_admit(c, RateCheck("key:0", 10, 10**6, None), 1, 120.0), Ticket)  # the minute after: kept
    assert len(c.rpm) == 100
    assert isinstance(_admit(c, RateCheck("key:x", 10, 10**6, None), 1, 180.0), Ticket)  # two minutes on
    assert set(c.rpm) == set(c.tpm) == {"key:0", "key:x"}


def test_budget_admit_and_settle_are_exact_integers() -> None:
    c = MemoryCounters()
    b = BudgetCheck("bud:0", 3 * NANO, 0, NANO, None)
    tickets = [c.admit_sync([], [dataclasses.replace(b)], 0, 1.0) for _ in range(3)]
    assert all(isinstance(t, Ticket) for t in tickets)
    d = c.admit_sync([], [dataclasses.replace(b)], 0, 1.0)
    assert isinstance(d, Denial) and (d.kind, d.reserved) == ("budget", 3 * NANO)
    for t in tickets:
        assert isinstance(t, Ticket)
        c.settle_sync(t, [333_333_333], 0)
    assert c.budgets["bud:0"] == [999_999_999, 0]


# -- a prompt that spells a special token -------------------------------------------------------------
def test_special_token_text_is_counted_as_text() -> None:
    n = count_prompt("gpt-4o", {"messages": [{"role": "user", "content": "<|endoftext|> and <|im_start|>"}]})
    assert n > 8


def test_a_keyed_prompt_with_a_special_token_is_answered(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                          fake_openai: FakeOpenAI) -> None:
    gw = make_gateway({"server": {"master_key": MASTER},
                       "models": [openai_model("m", fake_openai.url, "gpt-4o-mini", deployment={"price": PRICE})]})  # type: ignore[attr-defined]
    r = http("POST", gw.url + "/admin/keys", {"name": "k", "tpm": 10**6, "budgets": [{"period": "month", "limit_usd": 10}]},
             MASTER)
    assert r.status_code == 201, r.text
    c = openai.OpenAI(base_url=gw.base_url, api_key=r.json()["key"], max_retries=0)
    out = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "what is <|endoftext|>?"}])
    assert out.choices[0].message.content
