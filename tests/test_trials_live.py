"""Live trials, second round: catalog-priced trial spend, shadowing Anthropic Messages traffic (and
translated streams), and judged canary arms."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from kaiyuan.config import parse_config
from kaiyuan.gateway import Gateway
from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.fake_quiz import FakeQuiz, quiz_items
from kaiyuan.testing.harness import RunningGateway
from kaiyuan.testing.server_thread import ServerThread
from kaiyuan.trials.capture import answer_of, judge_request
from kaiyuan.trials.evaluate import price_of
from kaiyuan.trials.models import TrialConfig
from kaiyuan.trials.report import build_report
from kaiyuan.trials.runtime import TrialsRuntime
from tests.conftest import openai_model
from tests.test_trials_shadow import StallingFake, _set, client, runtime_of, wait_for


def claude_model(name: str, url: str, upstream: str = "claude-up", **dep: Any) -> dict[str, Any]:
    return {"name": name, "deployments": [{"provider": "anthropic", "base_url": url, "model": upstream,
                                           "api_key": "sk-ant-upstream", **dep}]}


@pytest.fixture
def stalled(servers: ServerThread) -> Iterator[StallingFake]:
    """An OpenAI-compatible candidate that answers only when released (see test_trials_shadow)."""
    fake = StallingFake(api_key="sk-upstream")
    fake.url = servers.serve(fake.app)  # type: ignore[attr-defined]
    yield fake
    if fake.release is not None:
        servers.call(_set(fake))
    servers.stop(fake.app)


def aclient(gw: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=20)


# -- 1. pricing from the catalog ----------------------------------------------------------------------


def test_price_of_uses_trial_prices_then_deployment_price_then_catalog() -> None:
    url = "http://127.0.0.1:9/v1"
    cfg = parse_config({"models": [
        openai_model("inc", url, "mystery-model-x"),
        openai_model("ds", url, "deepseek-chat"),  # in the bundled catalog: 0.27 in / 1.10 out per 1M (USD)
        openai_model("cny", url, "mystery-model-y", deployment={"price": {"input": 7, "output": 14, "currency": "CNY"}}),
        openai_model("own", url, "deepseek-chat", deployment={"price": {"input": 0, "output": 0}}),
    ], "accounting": {"cny_per_usd": 7.0}})
    t = TrialConfig.model_validate({"name": "p", "incumbent": "inc", "candidates": ["ds", "cny", "own"],
                                    "prices": {"inc": {"input_per_mtok": 2, "output_per_mtok": 3}}})
    m = 1_000_000
    assert price_of("ds", t, cfg, m, m) == pytest.approx(0.27 + 1.10)
    assert price_of("ds", t, cfg, m, None) == pytest.approx(0.27)
    assert price_of("cny", t, cfg, m, m) == pytest.approx((7 + 14) / 7.0)
    assert price_of("own", t, cfg, m, m) == 0.0  # the deployment's own price wins over the catalog
    assert price_of("inc", t, cfg, m, m) == pytest.approx(5.0)  # the trial's prices win over everything
    t2 = t.model_copy(update={"prices": {}})
    assert price_of("inc", t2, cfg, m, m) is None  # not in the catalog: unknown, never 0
    assert price_of("ds", t, cfg, None, None) is None  # no usage: unknown
    assert price_of("nope", t, cfg, m, m) is None
    # the deployment that answered is priced, not the model's first
    assert price_of("inc", t2, cfg, m, m, cfg.model("ds").deployments[0]) == pytest.approx(1.37)  # type: ignore[union-attr]


def test_unpriced_trial_models_are_named_at_start(caplog: Any) -> None:
    url = "http://127.0.0.1:9/v1"
    models = [openai_model("inc", url, "mystery-model-x"), openai_model("ds", url, "deepseek-chat"),
              openai_model("odd", url, "mystery-model-y")]
    trials = [{"name": "a", "incumbent": "inc", "candidates": ["ds"], "budget_usd": 1},
              {"name": "b", "incumbent": "inc", "candidates": ["odd"], "budget_usd": 1},
              {"name": "c", "mode": "canary", "incumbent": "inc", "candidates": ["ds"], "budget_usd": 1,
               "judge": {"model": "ds"}}]
    with caplog.at_level("WARNING", logger="kaiyuan.trials"):
        TrialsRuntime(Gateway(parse_config({"models": models, "trials": trials})))
    warned = [r.getMessage() for r in caplog.records if "no price" in r.getMessage()]
    assert len(warned) == 2  # trial a's catalog-priced candidate is fine
    assert "trial b: no price for odd" in warned[0] and "trial c: no price for inc" in warned[1]


@pytest.mark.parametrize("upstream, stops", [("deepseek-chat", True), ("mystery-model-x", False)])
def test_catalog_priced_candidate_stops_at_the_cap(make_gateway: Any, fake_openai: FakeOpenAI, upstream: str, stops: bool) -> None:
    url = fake_openai.url  # type: ignore[attr-defined]
    gw = make_gateway({
        "models": [openai_model("gpt-big", url, "big"), openai_model("deepseek-chat", url, upstream)],
        "trials": [{"name": "cap", "mode": "shadow", "incumbent": "gpt-big", "candidates": ["deepseek-chat"],
                    "sample_rate": 1.0, "budget_usd": 0.000001, "max_concurrency": 1}],  # no `prices`
    })
    rt = runtime_of(gw)
    c = client(gw)
    for i in range(4):
        c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": f"question number {i}"}])
        gw.settle()  # the answer may reach the client before the trial's hook has seen the request
        wait_for(lambda: rt.pending["cap"] == 0, "shadow idle")
    sent = sum(1 for r in fake_openai.requests if r["model"] == upstream)
    gw.servers.call(rt.flush())
    assert rt.store is not None
    rows = rt.store.results("cap")
    if stops:  # one call at the catalog's price exhausts the cap; later requests are not mirrored
        assert sent == 1 and rt.counters["cap"]["results"] == 1 and rt.exhausted(rt.trials["cap"])
        assert rows[0]["candidate_cost"] == pytest.approx(rt.spent["cap"]) and rt.spent["cap"] > 0.000001
        assert rt.store.spent("cap") == pytest.approx(rt.spent["cap"])
    else:  # a model no price source knows costs "unknown": the cap cannot stop it
        assert sent == 4 and not rt.exhausted(rt.trials["cap"]) and rows[0]["candidate_cost"] is None


# -- 2. shadowing Anthropic Messages traffic ------------------------------------------------------------


def anthropic_shadow_gateway(make_gateway: Any, claude_url: str, cand_url: str, **trial: Any) -> RunningGateway:
    cand_extra = trial.pop("cand_extra", {})
    return make_gateway({
        "models": [claude_model("claude", claude_url),
                   openai_model("qwen-small", cand_url, "small", **cand_extra)],
        "trials": [{"name": "sh", "mode": "shadow", "incumbent": "claude", "candidates": ["qwen-small"],
                    "sample_rate": 1.0, "scorers": [{"type": "regex", "pattern": "^echo: "}], **trial}],
    })


@pytest.mark.parametrize("stream", [False, True])
def test_messages_shadow_never_changes_or_delays_the_response(make_gateway: Any, fake_anthropic: Any, stalled: StallingFake,
                                                              servers: ServerThread, stream: bool) -> None:
    plain = make_gateway({"models": [claude_model("claude", fake_anthropic.url)]})
    shadowed = anthropic_shadow_gateway(make_gateway, fake_anthropic.url, stalled.url)  # type: ignore[attr-defined]
    kw: dict[str, Any] = {"model": "claude", "max_tokens": 50, "system": "be brief",
                          "messages": [{"role": "user", "content": "what is two plus two"}]}

    def ask(gw: RunningGateway) -> Any:
        if stream:
            with aclient(gw).messages.stream(**kw) as s:
                final = s.get_final_message()
            return [final.model, [b.model_dump() for b in final.content], final.stop_reason]
        r = aclient(gw).messages.create(**kw)
        return [r.model, [b.model_dump() for b in r.content], r.stop_reason, r.usage.model_dump()]

    expected = ask(plain)
    got = ask(shadowed)  # the candidate is stalled: this returns only if nothing waits for it
    assert got == expected
    rt = runtime_of(shadowed)
    wait_for(lambda: len(stalled.requests) == 1, "the shadow call to reach the stalled candidate")
    assert rt.pending["sh"] == 1 and rt.counters["sh"]["results"] == 0
    servers.call(_set(stalled))
    wait_for(lambda: rt.counters["sh"]["results"] == 1, "the shadow result")
    assert rt.counters["sh"]["no_incumbent_answer"] == 0
    servers.call(rt.flush())
    assert rt.store is not None
    row = rt.store.results("sh")[0]
    assert (row["incumbent_answer"], row["candidate_answer"], row["candidate_error"]) == (
        "echo: what is two plus two", "echo: what is two plus two", None)
    assert row["scores"] == '{"regex":{"incumbent":1.0,"candidate":1.0}}'
    sent = stalled.requests[-1]  # the Anthropic request reached the OpenAI candidate translated, system prompt included
    assert sent["model"] == "small" and sent["messages"][0]["role"] == "system" and not sent.get("stream")
    assert "be brief" in str(sent["messages"][0]["content"])


def test_messages_shadow_respects_data_policy_and_passes_through(make_gateway: Any, fake_anthropic: Any,
                                                                 fake_openai: FakeOpenAI) -> None:
    gw = make_gateway({
        "models": [claude_model("claude", fake_anthropic.url, tags=["self_hosted"]),
                   openai_model("qwen-small", fake_openai.url, "small"),  # hosted elsewhere
                   claude_model("claude-2", fake_anthropic.url, "claude-up-2", tags=["self_hosted"])],
        "trials": [{"name": "out", "incumbent": "claude", "candidates": ["qwen-small"], "sample_rate": 1.0},
                   {"name": "in", "incumbent": "claude", "candidates": ["claude-2"], "sample_rate": 1.0}],
    })
    rt = runtime_of(gw)
    c = aclient(gw)
    c.messages.create(model="claude", max_tokens=20, messages=[{"role": "user", "content": "secret"}],
                      extra_headers={"x-kaiyuan-policy": "self_hosted", "anthropic-beta": "some-beta-2025"})
    wait_for(lambda: rt.counters["out"]["skipped_policy"] == 1 and rt.counters["in"]["results"] == 1, "policy skip + mirror")
    assert not fake_openai.requests  # never mirrored to the hosted candidate
    mirrored = [i for i, r in enumerate(fake_anthropic.requests) if r.get("model") == "claude-up-2"]
    assert len(mirrored) == 1 and fake_anthropic.requests[mirrored[0]]["messages"] == [{"role": "user", "content": "secret"}]
    assert fake_anthropic.headers[mirrored[0]].get("anthropic-beta") == "some-beta-2025"  # forwarded like the handler does
    mirrored = [fake_anthropic.requests[i] for i in mirrored]
    assert mirrored[0]["max_tokens"] == 20 and "stream" not in mirrored[0]
    c.messages.create(model="claude", max_tokens=20, messages=[{"role": "user", "content": "public"}])
    wait_for(lambda: rt.counters["out"]["results"] == 1, "the unrestricted mirror")
    assert [r["messages"][-1]["content"] for r in fake_openai.requests] == ["public"]


def test_translated_streams_are_captured(make_gateway: Any, fake_anthropic: Any, fake_openai: FakeOpenAI) -> None:
    """OpenAI caller streaming from an Anthropic incumbent, and Anthropic caller streaming from an
    OpenAI incumbent: the answer is captured and mirrored (no ``no_incumbent_answer``)."""
    gw = make_gateway({
        "models": [claude_model("claude", fake_anthropic.url), openai_model("gpt-big", fake_openai.url, "big"),
                   openai_model("qwen-small", fake_openai.url, "small")],
        "trials": [{"name": "a", "incumbent": "claude", "candidates": ["qwen-small"], "sample_rate": 1.0},
                   {"name": "o", "incumbent": "gpt-big", "candidates": ["qwen-small"], "sample_rate": 1.0}],
    })
    rt = runtime_of(gw)
    chunks = list(client(gw).chat.completions.create(model="claude", max_tokens=30, stream=True,
                                                     messages=[{"role": "user", "content": "from openai"}]))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "echo: from openai"
    with aclient(gw).messages.stream(model="gpt-big", max_tokens=30, messages=[{"role": "user", "content": "from claude"}]) as s:
        assert s.get_final_text() == "echo: from claude"
    wait_for(lambda: rt.counters["a"]["results"] == 1 and rt.counters["o"]["results"] == 1, "both mirrors")
    assert rt.counters["a"]["no_incumbent_answer"] == 0 and rt.counters["o"]["no_incumbent_answer"] == 0
    gw.servers.call(rt.flush())
    assert rt.store is not None
    assert rt.store.results("a")[0]["incumbent_answer"] == "echo: from openai"
    assert rt.store.results("o")[0]["incumbent_answer"] == "echo: from claude"


def test_anthropic_answers_are_read() -> None:
    msg = (b'{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Let me check. "},'
           b'{"type":"tool_use","id":"tu_1","name":"weather","input":{"city":"Paris"}}],"stop_reason":"tool_use"}')
    a = answer_of("anthropic", msg)
    assert a.text == "Let me check. " and a.tool_calls == [{"name": "weather", "arguments": '{"city":"Paris"}'}]
    sse = b"".join([
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","content":[],"usage":{"input_tokens":3}}}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi "}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"there"}}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"x\\":"}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"1}"}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ])
    a = answer_of("anthropic", sse)
    assert a.text == "Hi there" and a.tool_calls == [{"name": "f", "arguments": '{"x":1}'}]
    # bad input: not JSON, empty, garbage events -> an empty answer, never an exception
    assert answer_of("anthropic", b"not json").text == "" and answer_of("anthropic", None).text == ""
    assert answer_of("anthropic", b"event: x\ndata: {broken\n\n").text == ""
    assert answer_of("openai", b'{"choices":[{"index":0,"message":{"role":"assistant","content":"o"}}]}').text == "o"
    req = {"system": [{"type": "text", "text": "sys"}], "messages": [{"role": "user", "content": "q"}]}
    assert judge_request("anthropic", req)["messages"][0] == {"role": "system", "content": "sys"}
    assert judge_request("openai", req) is req


# -- 3. judged canary arms ------------------------------------------------------------------------------


@pytest.fixture
def quiz(servers: ServerThread) -> Any:
    fake = FakeQuiz({"big": 1.0, "small": 0.0}, api_key="sk-upstream")
    fake.url = servers.serve(fake.app)  # type: ignore[attr-defined]
    yield fake
    servers.stop(fake.app)


def canary_gateway(make_gateway: Any, url: str, **trial: Any) -> RunningGateway:
    cand_extra = trial.pop("cand_extra", {})
    return make_gateway({
        "models": [openai_model("gpt-big", url, "big"), openai_model("qwen-small", url, "small", **cand_extra),
                   openai_model("judge", url, "quiz-judge", **cand_extra)],
        "trials": [{"name": "ca", "mode": "canary", "incumbent": "gpt-big", "candidates": ["qwen-small"], "sample_rate": 1.0,
                    "judge": {"model": "judge"}, "canary_judge_rate": 1.0,
                    "prices": {m: {"input_per_mtok": 1, "output_per_mtok": 1} for m in ("gpt-big", "qwen-small", "judge")},
                    **trial}],
    })


def test_canary_candidate_arm_is_judged_against_a_background_incumbent_call(make_gateway: Any, quiz: FakeQuiz) -> None:
    gw = canary_gateway(make_gateway, quiz.url)  # type: ignore[attr-defined]
    rt = runtime_of(gw)
    c = client(gw)
    items = quiz_items(6)
    for it in items:  # every request is answered by the (always wrong) candidate
        got = c.chat.completions.create(model="gpt-big", messages=it["messages"]).choices[0].message.content
        assert got == quiz.answer_for("small", it["messages"][0]["content"])
    wait_for(lambda: rt.counters["ca"]["canary_judged"] == 6 and rt.pending["ca"] == 0, "the canary judgements")
    gw.servers.call(rt.flush())
    assert rt.store is not None
    rows = rt.store.results("ca")
    assert len(rows) == 6 and all(r["source"] == "canary" for r in rows)  # one row per request, not two
    assert all(r["judge_status"] == "ok" and r["judge_score"] == 0.0 for r in rows)  # the right incumbent wins
    assert all(r["candidate_ms"] is not None and r["incumbent_ms"] is None for r in rows)  # arm latency stays the live one
    assert sum(1 for r in quiz.requests if r.get("model") == "big") == 6  # the background incumbent calls
    rep = build_report(rt.trials["ca"], rt.store, resamples=200)
    j = rep["by_candidate"][0]["judge"]
    assert j["n"] == 6 and j["rates"]["loss"]["rate"] == 1.0
    assert set(rep["spend"]["by_kind"]) == {"candidate", "incumbent", "judge"}


def test_canary_judging_respects_policy_and_rate(make_gateway: Any, quiz: FakeQuiz) -> None:
    own = {"deployment": {"tags": ["self_hosted"]}}
    gw = canary_gateway(make_gateway, quiz.url, cand_extra=own)  # type: ignore[attr-defined]
    rt = runtime_of(gw)
    c = client(gw)
    c.chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": "What is 1 + 2?"}],
                              extra_headers={"x-kaiyuan-policy": "self_hosted"})
    wait_for(lambda: rt.counters["ca"]["canary_judge_skipped_policy"] == 1 and rt.pending["ca"] == 0, "the policy skip")
    assert not any(r.get("model") == "big" for r in quiz.requests)  # the incumbent never saw the restricted request
    gw.servers.call(rt.flush())
    assert rt.store is not None and rt.store.results("ca")[0]["judge_status"] == "skipped_policy"
    # canary_judge_rate 0: nothing judged, the arm is still recorded
    gw0 = canary_gateway(make_gateway, quiz.url, canary_judge_rate=0.0)  # type: ignore[attr-defined]
    rt0 = runtime_of(gw0)
    client(gw0).chat.completions.create(model="gpt-big", messages=[{"role": "user", "content": "What is 2 + 2?"}])
    wait_for(lambda: rt0.counters["ca"]["canary_candidate"] == 1, "the canary row")
    assert rt0.counters["ca"]["canary_judged"] == 0 and rt0.pending["ca"] == 0


def test_canary_judging_stops_at_the_cap(make_gateway: Any, quiz: FakeQuiz) -> None:
    gw = canary_gateway(make_gateway, quiz.url, budget_usd=0.000001)  # type: ignore[attr-defined]
    rt = runtime_of(gw)
    c = client(gw)
    for it in quiz_items(4, seed=1):
        c.chat.completions.create(model="gpt-big", messages=it["messages"])
        gw.settle()  # the answer may reach the client before the trial's hook has seen the request
        wait_for(lambda: rt.pending["ca"] == 0, "canary idle")
    assert rt.exhausted(rt.trials["ca"]) and rt.counters["ca"]["canary_candidate"] == 4
    assert sum(1 for r in quiz.requests if r.get("model") == "big") <= 1  # at most the one in flight at the cap
    assert sum(1 for r in quiz.requests if r.get("model") == "quiz-judge") <= 2


def test_canary_judge_rate_is_validated() -> None:
    with pytest.raises(ValueError, match="canary_judge_rate"):
        TrialConfig.model_validate({"name": "x", "incumbent": "a", "candidates": ["b"], "canary_judge_rate": 1.5})
