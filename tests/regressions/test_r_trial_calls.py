"""Issue 9, section 1: trial mirrors and judge calls had their own attempt loop, which skipped the
breakers, deadlines and failure classification of the gateway's executor. They now run the same
executor (flagged as background calls): a candidate deployment that keeps failing opens its
breaker and is left alone, exactly as for client traffic."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.server_thread import ServerThread
from tests.conftest import openai_model
from tests.test_trials_shadow import runtime_of, wait_for


@pytest.fixture
def broken(servers: ServerThread) -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key="sk-upstream")
    fake.default = Behaviour(status=500)
    fake.url = servers.serve(fake.app)  # type: ignore[attr-defined]
    yield fake
    servers.stop(fake.app)


def _dep(url: str, ident: str) -> dict[str, Any]:
    return {"provider": "openai_compatible", "base_url": url + "/v1", "model": "small", "api_key": "sk-upstream", "id": ident}


def test_shadow_calls_respect_the_candidates_breaker(make_gateway: Any, fake_openai: FakeOpenAI,
                                                     broken: FakeOpenAI) -> None:
    gw = make_gateway({
        "models": [openai_model("gpt-big", fake_openai.url, "big"),
                   {"name": "qwen-small", "deployments": [_dep(broken.url, "bad"), _dep(fake_openai.url, "good")]}],
        "trials": [{"name": "sh", "mode": "shadow", "incumbent": "gpt-big", "candidates": ["qwen-small"],
                    "sample_rate": 1.0, "max_concurrency": 1}],
    })
    c = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0)
    rt = runtime_of(gw)
    n = 30
    for i in range(n):
        c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": f"q{i}"}])
        wait_for(lambda i=i: rt.counters["sh"]["candidate_calls"] + rt.counters["sh"]["candidate_failures"] > i,
                 "the shadow call")
    # every mirror got an answer: the executor failed over from the broken deployment
    assert rt.counters["sh"]["candidate_calls"] == n and rt.counters["sh"]["candidate_failures"] == 0
    state = {d["deployment"]: d for d in gw.gateway.router.describe()}
    # trial calls are one caller ("trials"): after routing.breaker.failures (5) the broken deployment left
    # their rotation and was then left alone; client traffic, not the trials' failures, decides the rest
    assert state["bad"]["callers_cooling_down"] == 1
    assert len(broken.requests) <= 6 < n
