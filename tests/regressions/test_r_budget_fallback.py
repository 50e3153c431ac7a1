"""Regression (issue 9 §2): a fallback to a pricier model was reserved at the first model's price
($0.82 spent on a $0.10 budget). The reservation now covers every model the plan can reach: the
model's fallbacks at any depth, and the target of a canary trial or a promotion."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, budget, cost, ledger, new_key, oai, priced, usd

CHEAP, PRICEY = (1.0, 1.0), (10.0, 1000.0)
ONE_TRY = {"retries": {"max_attempts": 1}}


def _models(url: str) -> list[dict[str, Any]]:
    return [
        priced("cheap", url, "up-cheap", *CHEAP, fallbacks=["middle"], **ONE_TRY),
        priced("middle", url, "up-middle", *CHEAP, fallbacks=["pricey"], **ONE_TRY),
        priced("pricey", url, "up-pricey", *PRICEY),
    ]


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER}, "models": _models(fake_openai.url)})  # type: ignore[attr-defined]


def test_a_fallback_two_levels_down_is_reserved_at_its_own_price(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 0.10}])
    c = oai(gw, k["key"])
    msgs: Any = [{"role": "user", "content": "hello"}]
    # 200 output tokens at the fallback's $1000/M = $0.20: more than the budget, refused up front
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="cheap", messages=msgs, max_tokens=200)
    assert e.value.code == "budget_exceeded" and fake_openai.requests == []
    # 50 tokens: $0.05 reserved; cheap and middle fail, pricey answers; what it costs is what is spent
    fake_openai.next(Behaviour(status=500), Behaviour(status=500))
    r = c.chat.completions.create(model="cheap", messages=msgs, max_tokens=50)
    assert [q["model"] for q in fake_openai.requests] == ["up-cheap", "up-middle", "up-pricey"]
    assert r.usage is not None
    expected = cost(r.usage.prompt_tokens, r.usage.completion_tokens, *PRICEY)
    assert [usd(x["cost_usd"]) for x in ledger(gw, k["id"])] == [expected]
    assert usd(budget(gw, k["id"])["spent_usd"]) == expected <= usd(0.10)


def test_a_canary_target_is_reserved_at_its_own_price(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                      fake_openai: FakeOpenAI) -> None:
    url = fake_openai.url  # type: ignore[attr-defined]
    trial = {"name": "ca", "mode": "canary", "incumbent": "cheap", "candidates": ["pricey"], "sample_rate": 1.0}
    gw = make_gateway({"server": {"master_key": MASTER}, "models": _models(url), "trials": [trial]})
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 0.10}])
    c = oai(gw, k["key"])
    msgs: Any = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.RateLimitError) as e:  # the canary sends it to pricey: $0.20 > $0.10
        c.chat.completions.create(model="cheap", messages=msgs, max_tokens=200)
    assert e.value.code == "budget_exceeded" and fake_openai.requests == []
    r = c.chat.completions.create(model="cheap", messages=msgs, max_tokens=50)
    assert [q["model"] for q in fake_openai.requests] == ["up-pricey"]
    assert r.usage is not None
    assert usd(budget(gw, k["id"])["spent_usd"]) == cost(r.usage.prompt_tokens, r.usage.completion_tokens, *PRICEY)
