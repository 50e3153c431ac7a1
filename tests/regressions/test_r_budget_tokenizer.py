"""Regression (issue 9 §2): a prompt the gateway under-counted overspent a budget by 32%. Prompts
are now counted with the model family's own tokenizer where one ships offline (OpenAI's o200k and
cl100k, Qwen, Llama 3), and otherwise with a stated safety margin (utf-8 bytes / 2) that covers
text the old estimate (bytes / 3) under-counted; tool schemas count with their keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from kaiyuan.accounting.tokens import count_prompt, counter_for
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, budget, cost, ledger, new_key, oai, priced, usd

IN = 1000.0  # $ per million prompt tokens; output is free, so a request costs its prompt
DENSE = " ".join("x" for _ in range(3000))  # 3000 one-letter words: 3000 tokens to the fake, 5999 bytes


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER},
                         "models": [priced("ds", fake_openai.url, "deepseek-chat", IN, 0.0)]})  # type: ignore[attr-defined]


def test_a_dense_prompt_cannot_overspend(gw: RunningGateway) -> None:
    msgs: Any = [{"role": "user", "content": DENSE}]
    one = cost(3003, 0, IN, 0.0)  # what the upstream bills for it: 3000 tokens + 3 for the message
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": float(one * 9 / 5)}])  # room for 1.8 requests
    c = oai(gw, k["key"])
    c.chat.completions.create(model="ds", messages=msgs, max_tokens=1)
    # the old bytes/3 estimate reserved ~2000 tokens, so a second request was let in and overspent
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="ds", messages=msgs, max_tokens=1)
    assert e.value.code == "budget_exceeded"
    [row] = ledger(gw, k["id"])
    assert row["prompt_tokens"] == 3003 and usd(row["cost_usd"]) == one
    assert usd(budget(gw, k["id"])["spent_usd"]) == one


def test_each_family_counts_with_its_own_tokenizer() -> None:
    families = {"gpt-4o": "o200k_base", "gpt-4-turbo": "cl100k_base", "Qwen/Qwen3-8B": "qwen3",
                "meta-llama/Llama-3.1-8B-Instruct": "llama3", "deepseek-chat": "estimate", "glm-4.6": "estimate",
                "claude-sonnet-4": "estimate"}
    assert {m: counter_for(m)[1] for m in families} == families
    est, _ = counter_for("deepseek-chat")
    assert est("abcd") == 2 and est("开源") == 3  # ceil(bytes / 2)
    o200k, _ = counter_for("gpt-4o")
    assert o200k("hello world") == 2  # exact, not estimated


def test_tool_schemas_count_their_keys() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a_long_parameter_name_that_the_vendor_renders": {"type": "string"}}}}}
    bare = {"messages": [{"role": "user", "content": "hi"}]}
    with_tool = {**bare, "tools": [tool]}
    # the parameter name is a dict key: the old count skipped it
    assert count_prompt("gpt-4o", with_tool) - count_prompt("gpt-4o", bare) >= 15
