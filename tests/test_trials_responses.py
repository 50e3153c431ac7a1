"""Shadow (and judged canary) trials on /v1/responses traffic: the request a client makes with the
openai SDK's ``responses.create`` / ``responses.stream`` is mirrored to the candidate, translated for
its protocol as the Responses handler translates it (the conversation ``previous_response_id``
brings in included), scored against the answer the client got, and recorded as a paired row.
Real gateway, fake OpenAI-compatible and Anthropic upstreams."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.fake_quiz import FakeQuiz, quiz_items
from kaiyuan.testing.harness import RunningGateway
from kaiyuan.testing.server_thread import ServerThread
from tests.conftest import openai_model
from tests.test_trials_live import canary_gateway
from tests.test_trials_shadow import runtime_of, wait_for

CLAUDE = {"name": "claude", "deployments": [{"provider": "anthropic", "base_url": "", "model": "claude-up",
                                             "api_key": "sk-ant-upstream"}]}
TOOLS: Any = [{"type": "function", "name": "search", "description": "search the web",
               "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}]


@pytest.fixture
def gw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI, fake_anthropic: Any) -> RunningGateway:
    claude = {**CLAUDE, "deployments": [{**CLAUDE["deployments"][0], "base_url": fake_anthropic.url}]}  # type: ignore[index]
    return make_gateway({
        "models": [openai_model("gpt-big", fake_openai.url, "big"), claude,
                   openai_model("native", fake_openai.url, "up-resp", deployment={"responses_api": True})],
        "trials": [{"name": "sh", "mode": "shadow", "incumbent": "gpt-big", "candidates": ["claude"], "sample_rate": 1.0,
                    "scorers": [{"type": "regex", "pattern": "^echo: "}]},
                   {"name": "pt", "mode": "shadow", "incumbent": "native", "candidates": ["gpt-big"], "sample_rate": 1.0}],
    })


def client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=20)


def _rows(gw: RunningGateway, trial: str, n: int) -> list[dict[str, Any]]:
    rt = runtime_of(gw)
    wait_for(lambda: rt.counters[trial]["results"] >= n, f"{n} result(s) of trial {trial}")
    gw.servers.call(rt.flush())
    assert rt.store is not None
    return sorted(rt.store.results(trial), key=lambda r: r["ts"])


@pytest.mark.parametrize("stream", [False, True])
def test_responses_traffic_is_mirrored_and_paired(gw: RunningGateway, fake_anthropic: Any, stream: bool) -> None:
    c = client(gw)
    if stream:
        with c.responses.stream(model="gpt-big", input="two plus two", instructions="be brief") as s:
            for _ in s:
                pass
            r = s.get_final_response()
    else:
        r = c.responses.create(model="gpt-big", input="two plus two", instructions="be brief")
    assert r.output_text == "echo: two plus two"  # the client's answer is the incumbent's, unchanged
    [row] = _rows(gw, "sh", 1)
    assert row["source"] == "shadow" and row["candidate"] == "claude" and row["candidate_error"] is None
    assert (row["incumbent_answer"], row["candidate_answer"]) == ("echo: two plus two", "echo: two plus two")
    assert row["scores"] == '{"regex":{"incumbent":1.0,"candidate":1.0}}'
    sent = fake_anthropic.requests[-1]  # the mirror spoke Anthropic's format, the instructions as its system
    assert sent["system"] in ("be brief", [{"type": "text", "text": "be brief"}]) and not sent.get("stream")
    assert "two plus two" in str(sent["messages"])


def test_a_continued_conversation_is_mirrored_whole(gw: RunningGateway, fake_anthropic: Any) -> None:
    c = client(gw)
    r1 = c.responses.create(model="gpt-big", input="weather in Rome", tools=TOOLS)
    call = next(o for o in r1.output if o.type == "function_call")
    r2 = c.responses.create(model="gpt-big", previous_response_id=r1.id, tools=TOOLS,
                            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "rain"}])
    assert r2.output_text == "tool said: rain"
    first, second = _rows(gw, "sh", 2)
    assert first["incumbent_answer"] == first["candidate_answer"]  # both answered with the same call
    assert first["incumbent_answer"].startswith("[tool calls] search(") and "weather in Rome" in first["incumbent_answer"]
    assert second["candidate_answer"] == "tool said: rain" == second["incumbent_answer"]
    msgs = fake_anthropic.requests[-1]["messages"]  # the history came along: user, tool_use, tool_result
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"][0]["type"] == "tool_use" and msgs[2]["content"][0]["type"] == "tool_result"


def test_bad_requests_and_unreplayable_ones_are_not_mirrored(gw: RunningGateway, fake_openai: FakeOpenAI) -> None:
    c = client(gw)
    rt = runtime_of(gw)
    with pytest.raises(openai.NotFoundError):  # an unknown previous response: 404, nothing to mirror
        c.responses.create(model="gpt-big", input="more", previous_response_id="resp_nope")
    fake_openai.next(Behaviour(drop_after_chunks=3))  # the incumbent's stream breaks: no answer to compare
    with pytest.raises(openai.APIError):
        with c.responses.stream(model="gpt-big", input="a b c d e f") as s:
            for _ in s:
                pass
    # a pass-through model continuing the upstream's own state cannot be replayed elsewhere
    assert c.responses.create(model="native", input="hi", previous_response_id="resp_upstream").output_text == "echo: hi"
    assert c.responses.create(model="native", input="hello").output_text == "echo: hello"  # this one can
    [row] = _rows(gw, "pt", 1)
    assert row["incumbent_answer"] == "echo: hello" == row["candidate_answer"]
    gw.settle()
    assert rt.counters["pt"]["not_replayable"] == 1
    assert rt.counters["sh"]["results"] == 0 and rt.pending["sh"] == 0


def test_answer_of_a_responses_capture() -> None:
    from kaiyuan.trials.capture import answer_of

    msg = {"type": "message", "content": [{"type": "output_text", "text": "hi "}, {"type": "output_text", "text": "there"}]}
    call = {"type": "function_call", "name": "spawn", "namespace": "multi_agent_v1", "arguments": '{"a":1}'}
    obj = {"output": [{"type": "reasoning", "summary": []}, msg, call]}
    whole = answer_of("responses", json.dumps(obj).encode())
    assert whole.text == "hi there" and whole.tool_calls == [{"name": "multi_agent_v1__spawn", "arguments": '{"a":1}'}]
    ev = b"event: response.completed\ndata: " + json.dumps({"type": "response.completed", "response": obj}).encode()
    assert answer_of("responses", b"event: response.created\ndata: {}\n\n" + ev + b"\n\n") == whole
    # a capture cut short (no terminal event): the deltas and the finished call items
    cut = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in [
        {"type": "response.output_text.delta", "delta": "hi "}, {"type": "response.output_text.delta", "delta": "the"},
        {"type": "response.output_item.done", "item": call}])
    part = answer_of("responses", cut)
    assert part.text == "hi the" and part.tool_calls == whole.tool_calls
    for junk in (None, b"", b"not json", b"[1, 2]", b"data: {broken\n\n"):
        assert answer_of("responses", junk).text == "" and not answer_of("responses", junk).tool_calls


@pytest.fixture
def quiz(servers: ServerThread) -> Iterator[Any]:
    fake = FakeQuiz({"big": 1.0, "small": 0.0}, api_key="sk-upstream")  # the incumbent right, the candidate wrong
    fake.url = servers.serve(fake.app)  # type: ignore[attr-defined]
    yield fake
    servers.stop(fake.app)


def test_a_judged_canary_arm_on_responses(make_gateway: Callable[[dict[str, Any]], RunningGateway], quiz: Any) -> None:
    """The candidate answers the client; a background incumbent call (the Responses request replayed
    from its canonical form) gives the judge its reference."""
    gw = canary_gateway(make_gateway, quiz.url)
    rt = runtime_of(gw)
    for it in quiz_items(3):
        question = it["messages"][0]["content"]
        assert client(gw).responses.create(model="gpt-big", input=question).output_text == quiz.answer_for("small", question)
    wait_for(lambda: rt.counters["ca"]["canary_judged"] == 3 and rt.pending["ca"] == 0, "the canary judgements")
    gw.servers.call(rt.flush())
    assert rt.store is not None
    rows = rt.store.results("ca")
    assert len(rows) == 3 and all(r["judge_status"] == "ok" and r["judge_score"] == 0.0 for r in rows)
    assert sum(1 for r in quiz.requests if r.get("model") == "big") == 3  # the background incumbent calls
