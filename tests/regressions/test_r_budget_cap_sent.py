"""Regression (issue 9 §2): when ``max_completion_tokens`` and ``max_tokens`` disagreed, the
smaller was reserved while the upstream could honour the larger. The gateway now decides one
output cap per request and deployment, reserves it, and sends it in every field the protocol has:
both OpenAI fields (one where the host refuses the pair), Anthropic's ``max_tokens``, Gemini's
``maxOutputTokens``. With no cap asked, the model's ``max_output_tokens`` is sent and reserved."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from kaiyuan.accounting.output_cap import cap_fields
from kaiyuan.config import OpenAICompatibleDeployment
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, anth, new_key, oai, priced

OUT = 1000.0  # $ per million output tokens: 100 tokens = $0.10


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI, fake_anthropic: Any,
       fake_gemini: Any) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER}, "models": [
        priced("m", fake_openai.url, "up-m", 0.0, OUT, 4000),  # type: ignore[attr-defined]
        priced("one-field", fake_openai.url, "up-one", 0.0, OUT, 4000,  # type: ignore[attr-defined]
               dep={"max_tokens_fields": "max_completion_tokens"}),
        priced("claude", fake_anthropic.url, "claude-up", 0.0, OUT, protocol="anthropic",
               dep={"default_max_tokens": 300}),
        priced("gemini", fake_gemini.url, "gemini-up", 0.0, OUT, 700, protocol="gemini"),
        priced("free", fake_openai.url, "up-free", 0.0, 0.0, 700),  # type: ignore[attr-defined]
    ]})


def test_disagreeing_fields_are_sent_as_the_one_cap_reserved(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 0.5}])
    c = oai(gw, k["key"])
    msgs: Any = [{"role": "user", "content": "hello"}]
    c.chat.completions.create(model="m", messages=msgs, max_completion_tokens=10, max_tokens=3000)
    sent = fake_openai.requests[-1]
    assert sent["max_tokens"] == 10 and sent["max_completion_tokens"] == 10
    # max_completion_tokens (OpenAI's current field) decides: 3000 tokens = $3 > $0.50, refused
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="m", messages=msgs, max_completion_tokens=3000, max_tokens=10)
    assert e.value.code == "budget_exceeded"
    assert len(fake_openai.requests) == 1


def test_no_cap_asked_sends_and_reserves_the_models_limit(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 3.9}])
    with pytest.raises(openai.RateLimitError):  # 4000 tokens = $4 > $3.90
        oai(gw, k["key"]).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    k2 = new_key(gw, budgets=[{"period": "day", "limit_usd": 4.1}])
    oai(gw, k2["key"]).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    sent = fake_openai.requests[-1]
    assert sent["max_tokens"] == 4000 and sent["max_completion_tokens"] == 4000


def test_a_deployment_that_takes_one_field_gets_one(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    oai(gw, MASTER).chat.completions.create(model="one-field", messages=[{"role": "user", "content": "hi"}], max_tokens=7)
    sent = fake_openai.requests[-1]
    assert sent["max_completion_tokens"] == 7 and "max_tokens" not in sent
    # hosts known to refuse the pair get one field without configuration
    dep = OpenAICompatibleDeployment(provider="openai_compatible", base_url="https://api.openai.com/v1", model="gpt-4o")
    assert cap_fields(dep) == ("max_completion_tokens",)
    dep = OpenAICompatibleDeployment(provider="openai_compatible", base_url="https://api.deepseek.com/v1", model="x")
    assert cap_fields(dep) == ("max_tokens", "max_completion_tokens")


def test_native_protocols_get_the_cap_in_their_own_field(gw: RunningGateway, fake_anthropic: Any, fake_gemini: Any) -> None:
    c = oai(gw, MASTER)
    c.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], max_tokens=12)
    assert fake_anthropic.requests[-1]["max_tokens"] == 12
    c.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert fake_anthropic.requests[-1]["max_tokens"] == 300  # the deployment's default_max_tokens
    c.chat.completions.create(model="gemini", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=9)
    assert fake_gemini.requests[-1]["generationConfig"]["maxOutputTokens"] == 9
    c.chat.completions.create(model="gemini", messages=[{"role": "user", "content": "hi"}])
    assert fake_gemini.requests[-1]["generationConfig"]["maxOutputTokens"] == 700  # the catalog's limit
    # an Anthropic caller reaching an OpenAI-protocol upstream: its max_tokens, in both fields
    anth(gw, MASTER).messages.create(model="m", max_tokens=11, messages=[{"role": "user", "content": "hi"}])


def test_the_budget_reserved_for_an_anthropic_caller_is_its_max_tokens(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 0.5}])
    a = anth(gw, k["key"])
    with pytest.raises(anthropic.RateLimitError):  # 600 tokens on "m" = $0.60 > $0.50
        a.messages.create(model="m", max_tokens=600, messages=[{"role": "user", "content": "hi"}])
    a.messages.create(model="m", max_tokens=400, messages=[{"role": "user", "content": "hi"}])
    sent = fake_openai.requests[-1]
    assert sent["max_tokens"] == 400 and sent["max_completion_tokens"] == 400


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("max_tokens", "100"), ("max_completion_tokens", -3),
                                         ("max_completion_tokens", 2.5)])
def test_bad_caps_are_a_400(gw: RunningGateway, fake_openai: FakeOpenAI, field: str, value: Any) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 5}])
    with pytest.raises(openai.BadRequestError) as e:
        oai(gw, k["key"]).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                  **{field: value})
    assert field in e.value.message and fake_openai.requests == []


def test_a_free_deployment_gets_no_default_cap(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    """Self-hosted (price 0): no money to protect, and vLLM refuses a cap above the context left."""
    c = oai(gw, MASTER)
    c.chat.completions.create(model="free", messages=[{"role": "user", "content": "hi"}])
    sent = fake_openai.requests[-1]
    assert "max_tokens" not in sent and "max_completion_tokens" not in sent
    c.chat.completions.create(model="free", messages=[{"role": "user", "content": "hi"}], max_tokens=9)
    sent = fake_openai.requests[-1]
    assert sent["max_tokens"] == 9 and sent["max_completion_tokens"] == 9
