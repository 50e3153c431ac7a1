"""Regression (issue 9 §2): TPM limits counted only prompts at admission, so a 15,000 TPM limit
let 22,500 real tokens through. Admission now reserves the prompt plus the output cap, and the
settle corrects the window to the real count."""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, new_key, oai, priced

MSGS: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER},
                         "models": [priced("m", fake_openai.url, "up-m", 1.0, 1.0)]})  # type: ignore[attr-defined]


def _fresh_minute() -> None:
    """TPM windows are fixed minutes: start well inside one."""
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)


def test_tpm_reserves_the_output_cap_and_settles_to_the_real_count(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    _fresh_minute()
    k = new_key(gw, tpm=250)
    c = oai(gw, k["key"])
    fake_openai.default = Behaviour(delay_first_byte=0.5)

    def call(_i: int) -> Any:
        try:
            return c.chat.completions.create(model="m", messages=MSGS, max_tokens=100)
        except openai.RateLimitError as e:
            return e

    with cf.ThreadPoolExecutor(3) as pool:  # each reserves its prompt (~10) + 100: two fit in 250
        results = list(pool.map(call, range(3)))
    denied = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(denied) == 1 and denied[0].code == "tpm_limit_exceeded"
    assert "its output cap" in denied[0].message
    assert len(fake_openai.requests) == 2
    # settled to what was really used (a few tokens each), so the minute has room again
    fake_openai.default = Behaviour()
    used = sum(r.usage.total_tokens for r in results if not isinstance(r, openai.RateLimitError))
    assert used < 40
    c.chat.completions.create(model="m", messages=MSGS, max_tokens=100)


def test_a_cap_above_the_tpm_limit_is_refused_up_front(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    _fresh_minute()
    k = new_key(gw, tpm=500)
    with pytest.raises(openai.RateLimitError) as e:
        oai(gw, k["key"]).chat.completions.create(model="m", messages=MSGS, max_tokens=1000)
    assert e.value.code == "tpm_limit_exceeded" and fake_openai.requests == []
