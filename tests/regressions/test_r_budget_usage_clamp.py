"""Regression (issue 9 §2): an upstream reporting ``completion_tokens = 3e9`` made the ledger writer
retry one batch forever, and every later request went unrecorded. Reported usage is now validated
and clamped before it is priced: strings, floats, negatives, nulls and absurd counts never crash
a request, are logged as suspicious, and the ledger gets a plausible row (an answer cannot hold
more tokens than the cap sent or the bytes received; a prompt, more than its request's bytes)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from kaiyuan.accounting.usage_check import MAX_TOKENS, reported_tokens
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, anth, cost, ledger, new_key, oai, priced, usd

IN, OUT = 1.0, 2.0
MSGS: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI, fake_anthropic: Any) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER}, "models": [
        priced("m", fake_openai.url, "up-m", IN, OUT),  # type: ignore[attr-defined]
        priced("claude", fake_anthropic.url, "claude-up", IN, OUT, protocol="anthropic"),
    ]})


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bad", [3e9, 3_000_000_000, 2**64 - 1, -5, "12abc", None, [1], {"n": 1}, float("nan")])
def test_absurd_completion_tokens_are_clamped_and_recorded(gw: RunningGateway, fake_openai: FakeOpenAI, bad: Any,
                                                           stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 10}])
    fake_openai.next(Behaviour(usage={"completion_tokens": bad}))
    c = oai(gw, k["key"])
    if stream:
        text = "".join(x.choices[0].delta.content or "" for x in c.chat.completions.create(
            model="m", messages=MSGS, max_tokens=50, stream=True) if x.choices)
    else:
        text = c.chat.completions.create(model="m", messages=MSGS, max_tokens=50).choices[0].message.content or ""
    assert text == "echo: hello"  # the answer is not cut for a usage report that cannot be true
    r = c.chat.completions.create(model="m", messages=MSGS, max_tokens=50)  # the next request is recorded too
    rows = ledger(gw, k["id"])
    assert len(rows) == 2
    first = rows[0]["completion_tokens"]
    assert 0 <= first <= 50 + 16  # at most the cap sent (the worst case when no usable count came back)
    assert usd(rows[0]["cost_usd"]) == cost(rows[0]["prompt_tokens"], first, IN, OUT)
    assert r.usage is not None and rows[1]["completion_tokens"] == r.usage.completion_tokens
    if bad is not None:
        assert "suspicious usage" in caplog.text


def test_absurd_anthropic_usage_is_clamped(gw: RunningGateway, fake_anthropic: Any) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 10}])
    fake_anthropic.next(Behaviour(usage={"output_tokens": 3e9, "input_tokens": "lots"}))
    msg = anth(gw, k["key"]).messages.create(model="claude", max_tokens=20, messages=MSGS)
    assert msg.content[0].type == "text"
    [row] = ledger(gw, k["id"])
    assert row["completion_tokens"] <= 20 + 16 and 0 < row["prompt_tokens"] < 200


def test_reported_tokens_rule() -> None:
    assert reported_tokens(7) == 7 and reported_tokens(7.0) == 7 and reported_tokens(6.2) == 7
    assert reported_tokens("12") == 12 and reported_tokens(" 12 ") == 12
    assert reported_tokens(-1) is None and reported_tokens("x") is None and reported_tokens(True) is None
    assert reported_tokens(None) is None and reported_tokens(float("inf")) is None
    assert reported_tokens(3e9) == MAX_TOKENS and reported_tokens(2**200) == MAX_TOKENS


@pytest.mark.skipif(not os.environ.get("KAIYUAN_TEST_POSTGRES_URL"), reason="set KAIYUAN_TEST_POSTGRES_URL")
def test_postgres_ledger_takes_the_row_and_the_next(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                                   fake_openai: FakeOpenAI) -> None:
    """The original failure: a PostgreSQL integer column refused 3e9 and the batch was retried forever."""
    gw = make_gateway({"server": {"master_key": MASTER}, "store": {"url": os.environ["KAIYUAN_TEST_POSTGRES_URL"]},
                       "models": [priced("m", fake_openai.url, "up-m", IN, OUT)]})  # type: ignore[attr-defined]
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 10}])
    fake_openai.next(Behaviour(usage={"completion_tokens": 3e9, "prompt_tokens": 2**63}))
    c = oai(gw, k["key"])
    c.chat.completions.create(model="m", messages=MSGS, max_tokens=50)
    c.chat.completions.create(model="m", messages=MSGS, max_tokens=50)
    rows = ledger(gw, k["id"])
    assert len(rows) == 2 and rows[0]["completion_tokens"] == 50 and rows[0]["prompt_tokens"] < 100
