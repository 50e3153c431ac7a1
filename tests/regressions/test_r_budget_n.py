"""Regression (issue 9 §2): ``n`` with no ``max_tokens`` reserved for one completion, and one
request spent $81.92 against a $1 budget. The reservation is now ``cap x n``, where the cap is the
one sent upstream (the model's max_output_tokens when the caller gives none)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, budget, cost, ledger, new_key, oai, priced, usd

IN, OUT, MAX_OUT = 1.0, 1000.0, 1000  # one full completion costs $1.00 in output


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    url = fake_openai.url  # type: ignore[attr-defined]
    return make_gateway({"server": {"master_key": MASTER}, "models": [priced("m", url, "up-m", IN, OUT, MAX_OUT)]})


def test_n_multiplies_the_reservation(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 2.5}])
    c = oai(gw, k["key"])
    msgs: Any = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.RateLimitError) as e:  # 3 completions of up to 1000 tokens: $3 > $2.50
        c.chat.completions.create(model="m", messages=msgs, n=3)
    assert e.value.code == "budget_exceeded" and "may cost up to $3.00" in e.value.message
    assert fake_openai.requests == []  # refused before any upstream call
    r = c.chat.completions.create(model="m", messages=msgs, n=2)  # $2 reserved: fits
    assert len(r.choices) == 2
    sent = fake_openai.requests[-1]
    assert sent["n"] == 2 and sent["max_tokens"] == MAX_OUT and sent["max_completion_tokens"] == MAX_OUT
    assert r.usage is not None
    expected = cost(r.usage.prompt_tokens, r.usage.completion_tokens, IN, OUT)
    rows = ledger(gw, k["id"])
    assert [usd(x["cost_usd"]) for x in rows] == [expected]
    b = budget(gw, k["id"])
    assert usd(b["spent_usd"]) == expected and usd(b["reserved_usd"]) == 0


def test_n_with_a_cap_reserves_cap_times_n(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 0.25}])
    c = oai(gw, k["key"])
    msgs: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.RateLimitError):  # 3 x 100 tokens at $1000/M = $0.30 > $0.25
        c.chat.completions.create(model="m", messages=msgs, n=3, max_tokens=100)
    c.chat.completions.create(model="m", messages=msgs, n=2, max_tokens=100)  # $0.20: fits
    assert fake_openai.requests[-1]["max_tokens"] == 100


@pytest.mark.parametrize("n", [0, -1, "2", 1.5, True])
def test_bad_n_is_a_400_in_the_callers_dialect(gw: RunningGateway, fake_openai: FakeOpenAI, n: Any) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 5}])
    with pytest.raises(openai.BadRequestError) as e:
        oai(gw, k["key"]).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=n)
    assert "'n'" in e.value.message
    assert fake_openai.requests == []
    assert usd(budget(gw, k["id"])["reserved_usd"]) == 0  # the refused request holds nothing
