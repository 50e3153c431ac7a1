"""Admission on /v1/responses counts the conversation ``previous_response_id`` brings in: a one-word
input on a long stored conversation reserves (TPM, budget) the whole prompt the upstream will read,
and the settle bills the upstream's prompt count for it instead of clamping it to the small body.
Real gateway, the official openai SDK, the fake OpenAI-compatible upstream, virtual keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from kaiyuan.accounting.tokens import count_prompt
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, cost, ledger, new_key, oai, priced, usd

IN, OUT = 1000.0, 1.0  # per million tokens: the prompt is what costs
LONG = " ".join(["word"] * 4000)  # 4,000 tokens to the fake upstream; ~10,000 as the gateway estimates
CAP = 16


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER}, "models": [priced("m", fake_openai.url, "up-m", IN, OUT)]})


def _reserved_usd(body: dict[str, Any]) -> float:
    return (count_prompt("up-m", body) * IN + CAP * OUT) / 1e6


def test_a_budget_counts_the_stored_history(gw: RunningGateway) -> None:
    first = {"model": "m", "input": LONG, "max_output_tokens": CAP}
    # the first request fits; its spend (4,003 prompt tokens as reported) plus a second reservation
    # of the same size does not
    limit = 1.3 * _reserved_usd(first)
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": limit}])
    c = oai(gw, k["key"])
    r1 = c.responses.create(**first)
    assert r1.usage is not None and r1.usage.input_tokens == 4003
    gw.settle()
    with pytest.raises(openai.RateLimitError) as e:  # one word, but it continues 4,000
        c.responses.create(model="m", input="one", max_output_tokens=CAP, previous_response_id=r1.id)
    assert e.value.code == "budget_exceeded"
    # the same word without the history fits: the refusal was the history's
    r3 = c.responses.create(model="m", input="one", max_output_tokens=CAP)
    assert r3.output_text == "echo: one"


def test_a_tpm_limit_counts_the_stored_history(gw: RunningGateway) -> None:
    first = {"model": "m", "input": LONG, "max_output_tokens": CAP}
    tpm = int(1.3 * (count_prompt("up-m", first) + CAP))
    k = new_key(gw, tpm=tpm)
    c = oai(gw, k["key"])
    r1 = c.responses.create(**first)
    gw.settle()
    with pytest.raises(openai.RateLimitError) as e:
        c.responses.create(model="m", input="one", max_output_tokens=CAP, previous_response_id=r1.id)
    assert e.value.code == "tpm_limit_exceeded"
    c.responses.create(model="m", input="one", max_output_tokens=CAP)  # fits without the history


def test_the_continued_prompt_is_billed_as_reported(gw: RunningGateway) -> None:
    """A 100-byte request that continues a 20,000-byte conversation: the upstream's prompt count
    (above the request's own bytes) is plausible and billed, not replaced by a count of the body."""
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 1000}])
    c = oai(gw, k["key"])
    r1 = c.responses.create(model="m", input=LONG, max_output_tokens=CAP)
    r2 = c.responses.create(model="m", input="one", max_output_tokens=CAP, previous_response_id=r1.id)
    assert r2.usage is not None and r2.usage.input_tokens > 4003
    rows = ledger(gw, k["id"])
    assert [row["prompt_tokens"] for row in rows] == [4003, r2.usage.input_tokens]
    assert usd(rows[1]["cost_usd"]) == cost(r2.usage.input_tokens, r2.usage.output_tokens, IN, OUT)


def test_bad_previous_ids_are_404_and_reserve_nothing(gw: RunningGateway) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 1000}], tpm=10**6)
    other = new_key(gw)
    c = oai(gw, k["key"])
    r1 = c.responses.create(model="m", input="mine", max_output_tokens=CAP)
    for who, rid in ((oai(gw, other["key"]), r1.id), (c, "resp_never_made"), (c, "")):
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as e:
            who.responses.create(model="m", input="more", max_output_tokens=CAP, previous_response_id=rid)
        assert isinstance(e.value.body, dict) and e.value.body.get("param") == "previous_response_id", e.value.body
    gw.settle()
    assert len(ledger(gw, k["id"])) == 1  # the refused ones reserved and spent nothing
    from tests.regressions.budget_kit import budget

    assert usd(budget(gw, k["id"])["reserved_usd"]) == 0
