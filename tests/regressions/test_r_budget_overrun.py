"""Regression (issue 9 §2): an upstream that ignored ``max_tokens`` overspent a budget by 450%.
The gateway now stops such an answer at the cap it sent: the stream ends with finish reason
``length`` (``max_tokens`` for Anthropic callers) and a whole answer is cut the same way, the
upstream request is closed, the ledger records the true usage (reported, or else counted), and
``/admin/deployments`` flags the deployment as not honouring ``max_tokens``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, admin, anth, budget, cost, ledger, new_key, oai, priced, usd
from tests.test_trials_shadow import wait_for

IN, OUT = 1.0, 1000.0
LONG = " ".join(f"w{i}" for i in range(60))  # 60 tokens to the fake upstream
MSGS: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI, fake_anthropic: Any) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER}, "models": [
        priced("m", fake_openai.url, "up-m", IN, OUT),  # type: ignore[attr-defined]
        priced("claude", fake_anthropic.url, "claude-up", IN, OUT, protocol="anthropic"),
    ]})


def _flag(gw: RunningGateway, model: str) -> dict[str, Any]:
    [d] = admin(gw, "GET", f"/admin/deployments?model={model}").json()["data"]
    return d


def test_a_stream_past_the_cap_is_cut_and_the_upstream_closed(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 1}])
    fake_openai.default = Behaviour(ignore_max_tokens=True, content=LONG, chunk_delay=0.02)
    assert _flag(gw, "m")["honours_max_tokens"] is True
    chunks = list(oai(gw, k["key"]).chat.completions.create(model="m", messages=MSGS, max_tokens=5, stream=True,
                                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["w0", "w1", "w2", "w3", "w4"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6  # counted: the 6th token is where it was cut
    gw.settle()
    # the upstream request was closed mid-generation (the fake sees the closed connection on its own
    # loop turn, so give it a moment rather than race it)
    wait_for(lambda: fake_openai.cancelled == 1, "the upstream to see its request closed", limit=5.0)
    [row] = ledger(gw, k["id"])
    assert row["completion_tokens"] == 6
    assert usd(row["cost_usd"]) == cost(row["prompt_tokens"], 6, IN, OUT)
    assert usd(budget(gw, k["id"])["spent_usd"]) == cost(row["prompt_tokens"], 6, IN, OUT)
    flag = _flag(gw, "m")
    assert flag["honours_max_tokens"] is False
    assert flag["max_tokens_overruns"]["count"] == 1 and flag["max_tokens_overruns"]["last_cap"] == 5


def test_a_whole_answer_past_the_cap_is_cut_and_billed_as_reported(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 1}])
    fake_openai.default = Behaviour(ignore_max_tokens=True, content=LONG)
    r = oai(gw, k["key"]).chat.completions.create(model="m", messages=MSGS, max_tokens=6)
    assert r.choices[0].finish_reason == "length"
    assert len(r.choices[0].message.content or "") < len(LONG) // 5
    assert r.usage is not None and r.usage.completion_tokens == 60  # the vendor's bill, unchanged
    [row] = ledger(gw, k["id"])
    assert row["completion_tokens"] == 60 and usd(row["cost_usd"]) == cost(r.usage.prompt_tokens, 60, IN, OUT)
    assert _flag(gw, "m")["honours_max_tokens"] is False


def test_an_anthropic_caller_gets_max_tokens(gw: RunningGateway, fake_openai: FakeOpenAI, fake_anthropic: Any) -> None:
    fake_openai.default = Behaviour(ignore_max_tokens=True, content=LONG)
    fake_anthropic.default = Behaviour(ignore_max_tokens=True, content=LONG)
    a = anth(gw, MASTER)
    for model in ("m", "claude"):  # translated from an OpenAI upstream, and Anthropic pass-through
        with a.messages.stream(model=model, max_tokens=4, messages=MSGS) as s:
            msg = s.get_final_message()
        assert msg.stop_reason == "max_tokens", model
        assert "".join(b.text for b in msg.content if b.type == "text").split() == ["w0", "w1", "w2", "w3"], model
        whole = a.messages.create(model=model, max_tokens=4, messages=MSGS)
        assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 60, model
    assert _flag(gw, "claude")["honours_max_tokens"] is False


def test_an_openai_caller_of_an_anthropic_upstream_gets_length(gw: RunningGateway, fake_anthropic: Any) -> None:
    fake_anthropic.default = Behaviour(ignore_max_tokens=True, content=LONG)
    chunks = list(oai(gw, MASTER).chat.completions.create(model="claude", messages=MSGS, max_tokens=3, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["w0", "w1", "w2"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_an_upstream_that_honours_the_cap_is_never_cut_or_flagged(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.default = Behaviour(content=LONG)  # it stops at max_tokens itself
    c = oai(gw, MASTER)
    for n in (1, 5, 59, 60, 61):
        chunks = list(c.chat.completions.create(model="m", messages=MSGS, max_tokens=n, stream=True))
        words = "".join(x.choices[0].delta.content or "" for x in chunks if x.choices).split()
        assert len(words) == min(n, 60)
        r = c.chat.completions.create(model="m", messages=MSGS, max_tokens=n)
        assert (r.choices[0].message.content or "").split() == words
    assert _flag(gw, "m")["honours_max_tokens"] is True
    assert fake_openai.cancelled == 0


def test_gemini_and_legacy_completions_are_cut_too(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                   fake_openai: FakeOpenAI, fake_gemini: Any) -> None:
    gw = make_gateway({"server": {"master_key": MASTER}, "models": [
        priced("gemini", fake_gemini.url, "gemini-up", IN, OUT, protocol="gemini"),
        priced("m", fake_openai.url, "up-m", IN, OUT),  # type: ignore[attr-defined]
    ]})
    fake_gemini.default = Behaviour(ignore_max_tokens=True, content=LONG)
    chunks = list(oai(gw, MASTER).chat.completions.create(model="gemini", messages=MSGS, max_tokens=3, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split() == ["w0", "w1", "w2"]
    assert chunks[-1].choices[0].finish_reason == "length"
    with anth(gw, MASTER).messages.stream(model="gemini", max_tokens=2, messages=MSGS) as s:
        assert s.get_final_message().stop_reason == "max_tokens"
    fake_openai.default = Behaviour(content=LONG)  # the fake's legacy completions ignore max_tokens
    parts = list(oai(gw, MASTER).completions.create(model="m", prompt="go", max_tokens=4, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == "w0w1w2w3"  # the fake sends bare words
    assert parts[-1].choices[0].finish_reason == "length"
    whole = oai(gw, MASTER).completions.create(model="m", prompt="go", max_tokens=4)
    assert whole.choices[0].finish_reason == "length" and len(whole.choices[0].text) < len(LONG) // 5
    assert _flag(gw, "gemini")["honours_max_tokens"] is False
