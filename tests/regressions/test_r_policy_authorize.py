"""Issue 9, section 1: the data policy was applied only by the executor, after the budget had been
reserved. Authorize now checks it too: a key (or a request header) whose policy no deployment of
the model, or of a fallback the key may use, satisfies is refused with a 403 ``policy_unsatisfied``
in the caller's dialect before anything is reserved, sent or written to the ledger."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, admin, anth, budget, ledger, new_key, oai

MSGS: Any = [{"role": "user", "content": "hello"}]


def _dep(url: str, ident: str, tags: list[str]) -> dict[str, Any]:
    return {"provider": "openai_compatible", "base_url": url + "/v1", "model": "up-" + ident, "api_key": "sk-upstream",
            "id": ident, "tags": tags, "price": {"input": 1.0, "output": 1.0}}


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    url = fake_openai.url  # type: ignore[attr-defined]
    return make_gateway({"server": {"master_key": MASTER}, "models": [
        {"name": "cloud", "deployments": [_dep(url, "oai", ["vendor:openai"]), _dep(url, "ds", ["vendor:deepseek"])]},
        {"name": "hybrid", "routing": {"fallbacks": ["onprem"]}, "deployments": [_dep(url, "oai2", ["vendor:openai"])]},
        {"name": "onprem", "deployments": [_dep(url, "own", ["self_hosted"])]},
    ]})


def test_a_key_policy_no_deployment_satisfies_is_refused_before_reserving(gw: RunningGateway,
                                                                         fake_openai: FakeOpenAI) -> None:
    # A budget too small for any reservation: were the budget reserved first, this would be a 429.
    k = new_key(gw, policy="self_hosted", budgets=[{"period": "day", "limit_usd": 0.000001}])
    with pytest.raises(openai.PermissionDeniedError) as e:
        oai(gw, k["key"]).chat.completions.create(model="cloud", messages=MSGS, max_tokens=500)
    assert e.value.status_code == 403 and e.value.code == "policy_unsatisfied"
    assert "'self_hosted'" in e.value.message and "'cloud'" in e.value.message
    assert fake_openai.requests == []
    assert ledger(gw, k["id"]) == []
    b = budget(gw, k["id"])
    assert float(b["spent_usd"]) == 0 and float(b.get("reserved_usd") or 0) == 0
    assert gw.log_rows()[-1]["status"] == 403


def test_the_refusal_is_in_the_callers_dialect(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, policy="self_hosted")
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        anth(gw, k["key"]).messages.create(model="cloud", max_tokens=50, messages=MSGS)
    assert e.value.status_code == 403 and e.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    assert "data policy" in e.value.message
    assert fake_openai.requests == []


def test_a_header_policy_is_checked_the_same_way(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw)
    c = openai.OpenAI(base_url=gw.base_url, api_key=k["key"], max_retries=0,
                      default_headers={"x-kaiyuan-policy": "region:eu"})
    with pytest.raises(openai.PermissionDeniedError) as e:
        c.chat.completions.create(model="cloud", messages=MSGS)
    assert e.value.code == "policy_unsatisfied" and fake_openai.requests == []
    # a header narrowing to one deployment that exists is served by it
    ok = openai.OpenAI(base_url=gw.base_url, api_key=k["key"], max_retries=0,
                       default_headers={"x-kaiyuan-policy": "!vendor:openai"})
    raw = ok.chat.completions.with_raw_response.create(model="cloud", messages=MSGS)
    assert raw.headers["x-kaiyuan-deployment"] == "ds"


def test_a_fallback_that_satisfies_the_policy_is_enough(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, policy="self_hosted")
    raw = oai(gw, k["key"]).chat.completions.with_raw_response.create(model="hybrid", messages=MSGS)
    assert raw.headers["x-kaiyuan-deployment"] == "own"
    assert [q["model"] for q in fake_openai.requests] == ["up-own"]
    # ... but only a fallback the key may use
    narrow = new_key(gw, policy="self_hosted", allowed_models=["hybrid"])
    with pytest.raises(openai.PermissionDeniedError) as e:
        oai(gw, narrow["key"]).chat.completions.create(model="hybrid", messages=MSGS)
    assert e.value.code == "policy_unsatisfied" and len(fake_openai.requests) == 1


def test_bad_policies_are_refused_before_reserving(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 0.000001}])
    c = openai.OpenAI(base_url=gw.base_url, api_key=k["key"], max_retries=0,
                      default_headers={"x-kaiyuan-policy": "self_hosted,,!"})
    with pytest.raises(openai.BadRequestError) as e:  # malformed: a 400, not the budget's 429
        c.chat.completions.create(model="cloud", messages=MSGS)
    assert e.value.code == "invalid_policy"
    r = admin(gw, "POST", "/admin/keys", {"name": "bad", "policy": "self hosted!"})  # and at admin time
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_policy"
    assert fake_openai.requests == [] and ledger(gw, k["id"]) == []
