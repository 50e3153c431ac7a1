"""Regression (issue 10): a /v1/responses pass-through upstream (one that speaks the Responses API
itself) was sent the output cap but its answer was relayed whole, uncounted: an upstream that
ignored ``max_output_tokens`` spent money nobody reserved. Now, as on chat streams, the stream is
counted and cut at the cap (``response.incomplete``, reason ``max_output_tokens``, the open items
ended, the upstream request closed), a whole answer is cut to the cap, the ledger records the true
usage and ``/admin/deployments`` flags the deployment. The openai SDK is the client."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.regressions.budget_kit import MASTER, admin, cost, ledger, new_key, oai, priced, usd
from tests.test_trials_shadow import wait_for

IN, OUT = 1.0, 1000.0
LONG = " ".join(f"w{i}" for i in range(60))  # 60 tokens (words) to the fake upstream


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER}, "models": [
        priced("native", fake_openai.url, "up-resp", IN, OUT, dep={"responses_api": True})]})


def _flag(gw: RunningGateway) -> dict[str, Any]:
    [d] = admin(gw, "GET", "/admin/deployments?model=native").json()["data"]
    return d


def _stream(gw: RunningGateway, key: str, **kw: Any) -> list[Any]:
    with oai(gw, key).responses.stream(model="native", input="go", **kw) as s:
        return list(s)


def test_a_stream_past_the_cap_is_cut_and_the_upstream_closed(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 1}])
    fake_openai.default = Behaviour(ignore_max_tokens=True, content=LONG, chunk_delay=0.02)
    assert _flag(gw)["honours_max_tokens"] is True
    events = _stream(gw, k["key"], max_output_tokens=5)
    assert fake_openai.requests[-1]["max_output_tokens"] == 5
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.split() == ["w0", "w1", "w2", "w3", "w4"]
    kinds = [e.type for e in events]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))  # numbered on from the upstream's
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == text and final.output[0].status == "incomplete"
    assert final.usage.output_tokens == 6  # counted: the 6th token is where it was cut
    wait_for(lambda: fake_openai.cancelled == 1, "the upstream to see its request closed", limit=5.0)
    [row] = ledger(gw, k["id"])
    assert row["completion_tokens"] == 6
    assert usd(row["cost_usd"]) == cost(row["prompt_tokens"], 6, IN, OUT)
    flag = _flag(gw)
    assert flag["honours_max_tokens"] is False
    assert flag["max_tokens_overruns"]["count"] == 1 and flag["max_tokens_overruns"]["last_cap"] == 5


def test_a_whole_answer_past_the_cap_is_cut_and_billed_as_reported(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    k = new_key(gw, budgets=[{"period": "day", "limit_usd": 1}])
    fake_openai.default = Behaviour(ignore_max_tokens=True, content=LONG)
    r = oai(gw, k["key"]).responses.create(model="native", input="go", max_output_tokens=6)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert 0 < len(r.output_text) < len(LONG) // 5
    assert r.usage is not None and r.usage.output_tokens == 60  # the vendor's bill, unchanged
    [row] = ledger(gw, k["id"])
    assert row["completion_tokens"] == 60 and usd(row["cost_usd"]) == cost(r.usage.input_tokens, 60, IN, OUT)
    assert _flag(gw)["honours_max_tokens"] is False


def test_a_stream_cut_mid_tool_call(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    """Cut while a function call's arguments stream: the call item ends ``incomplete`` with the
    arguments received so far (not valid JSON: the client must not run it), then response.incomplete."""
    args = json.dumps({"cmd": " ".join(f"arg{i}" for i in range(40))})
    fake_openai.default = Behaviour(ignore_max_tokens=True, tool_calls=[("exec_command", args)])
    events = _stream(gw, MASTER, max_output_tokens=4)
    kinds = [e.type for e in events]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.incomplete"]
    sent = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert len(sent) == 12 and args.startswith(sent)  # four 3-character deltas
    final = events[-1].response
    call = final.output[0]
    assert call.type == "function_call" and call.status == "incomplete" and call.arguments == sent
    assert call.name == "exec_command" and final.incomplete_details.reason == "max_output_tokens"


def test_an_upstream_that_honours_the_cap_is_relayed_whole(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.default = Behaviour(content=LONG)
    events = _stream(gw, MASTER, max_output_tokens=5)
    assert events[-1].type == "response.incomplete"  # the upstream's own
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "w0 w1 w2 w3 w4"
    r = oai(gw, MASTER).responses.create(model="native", input="go", max_output_tokens=80)
    assert r.status == "completed" and r.output_text == LONG
    assert fake_openai.cancelled == 0 and _flag(gw)["honours_max_tokens"] is True


def test_pass_through_replies_carry_the_public_model_name(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    """docs/translation.md: every reply's ``model`` is the name the caller sent, passed through too."""
    r = oai(gw, MASTER).responses.create(model="native", input="hi")
    assert fake_openai.requests[-1]["model"] == "up-resp" and r.model == "native"
    events = _stream(gw, MASTER)
    models = {e.response.model for e in events if e.type.startswith("response.") and hasattr(e, "response")}
    assert models == {"native"}
    fake_openai.default = Behaviour(ignore_max_tokens=True, content=LONG)  # and on a cut answer, whole or streamed
    assert oai(gw, MASTER).responses.create(model="native", input="go", max_output_tokens=3).model == "native"
    assert _stream(gw, MASTER, max_output_tokens=3)[-1].response.model == "native"
