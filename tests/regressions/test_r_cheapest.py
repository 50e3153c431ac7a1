"""Issue 9, section 1: the ``cheapest`` strategy added raw prices and ignored their currency, so a
deployment priced CNY 1/2 per million tokens (USD 0.42 at 7.1) ranked after one priced USD 1/1."""

from __future__ import annotations

from typing import Any

import openai

from kaiyuan.routing.router import usd_cost
from kaiyuan.testing.fake_openai import FakeOpenAI


def _dep(url: str, ident: str, price: dict[str, Any]) -> dict[str, Any]:
    return {"provider": "openai_compatible", "base_url": url + "/v1", "model": "up-" + ident, "api_key": "sk-upstream",
            "id": ident, "price": price}


def test_cheapest_compares_prices_in_one_currency(make_gateway: Any, fake_openai: FakeOpenAI) -> None:
    gw = make_gateway({"models": [{"name": "m", "routing": {"strategy": "cheapest"}, "deployments": [
        _dep(fake_openai.url, "usd", {"input": 1, "output": 1}),
        _dep(fake_openai.url, "cny", {"input": 1, "output": 2, "currency": "CNY"}),
    ]}]})
    c = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0)
    for _ in range(5):
        raw = c.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert raw.headers["x-kaiyuan-deployment"] == "cny"


def test_the_conversion_uses_the_configured_rate() -> None:
    cny = {"input": 1, "output": 2, "currency": "CNY"}
    assert usd_cost(cny, 7.1) < usd_cost({"input": 1, "output": 1, "currency": "USD"}, 7.1)
    assert usd_cost(cny, 1.0) > usd_cost({"input": 1, "output": 1}, 1.0)  # at parity, 3 > 2
    assert usd_cost({"input": 1}, 7.1) == float("inf")
