"""POST /v1/responses with the official openai SDK, through a real gateway onto the fake
OpenAI-compatible upstream and the fake Anthropic-native upstream (create, stream, parse, tool
episodes, stored state, sealed reasoning) and its bad inputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

MODELS = ["fake-chat", "claude"]
TOOLS: Any = [{"type": "function", "name": "search", "description": "search the web",
               "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}]


@pytest.fixture
def rgw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: Any, fake_anthropic: Any) -> RunningGateway:
    return make_gateway({"models": [
        openai_model("fake-chat", fake_openai.url, "upstream-chat", log_bodies=True),
        openai_model("deepseek-reasoner", fake_openai.url),
        openai_model("strict-chat", fake_openai.url, "upstream-chat", hosted_tools="refuse"),
        {"name": "claude", "deployments": [
            {"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up", "api_key": "sk-ant-upstream"}]},
    ]})


def client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", MODELS)
def test_create_string_input(rgw: RunningGateway, model: str) -> None:
    r = client(rgw).responses.create(model=model, input="hello there", instructions="be kind", max_output_tokens=50)
    assert r.output_text == "echo: hello there"
    assert r.status == "completed" and r.model == model and r.id.startswith("resp_")
    assert r.instructions == "be kind" and r.max_output_tokens == 50
    assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.output[0].type == "message" and r.output[0].role == "assistant"


def test_fields_reach_the_chat_upstream(rgw: RunningGateway, fake_openai: Any) -> None:
    client(rgw).responses.create(
        model="fake-chat", instructions="sys", temperature=0.3, top_p=0.9, max_output_tokens=77, user="u1",
        input=[{"role": "developer", "content": "dev rule"},
               {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                            {"type": "input_image", "image_url": "https://example.com/a.png"}]}],
        metadata={"k": "v"}, store=False, prompt_cache_key="pk", include=["reasoning.encrypted_content"],
        extra_body={"client_metadata": {"x": "y"}})
    sent = fake_openai.requests[-1]
    assert sent["model"] == "upstream-chat" and sent["max_tokens"] == 77 and sent["temperature"] == 0.3
    assert sent["top_p"] == 0.9 and sent["user"] == "u1"
    assert sent["messages"][0] == {"role": "system", "content": "sys\ndev rule"} or sent["messages"][0]["role"] == "system"
    assert sent["messages"][1]["content"][1] == {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


@pytest.mark.parametrize("model", MODELS)
def test_tool_episode_stateless(rgw: RunningGateway, model: str) -> None:
    c = client(rgw)
    r1 = c.responses.create(model=model, input="weather in Paris", tools=TOOLS, store=False)
    calls = [o for o in r1.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "search"
    assert json.loads(calls[0].arguments)["query"] == "weather in Paris"
    items: list[Any] = [{"role": "user", "content": "weather in Paris"}]
    items += [o.model_dump(exclude_none=True) for o in r1.output]
    items.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"})
    r2 = c.responses.create(model=model, input=items, tools=TOOLS, store=False)
    assert r2.output_text == "tool said: sunny"
    with pytest.raises(openai.NotFoundError):  # store: false keeps nothing
        c.responses.retrieve(r1.id)


@pytest.mark.parametrize("model", MODELS)
def test_tool_episode_previous_response_id(rgw: RunningGateway, model: str) -> None:
    c = client(rgw)
    r1 = c.responses.create(model=model, input="weather in Rome", tools=TOOLS)
    call = next(o for o in r1.output if o.type == "function_call")
    r2 = c.responses.create(model=model, previous_response_id=r1.id, tools=TOOLS,
                            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "rain"}])
    assert r2.output_text == "tool said: rain" and r2.previous_response_id == r1.id
    got = c.responses.retrieve(r2.id)
    assert got.output_text == "tool said: rain"
    items = c.responses.input_items.list(r2.id)
    assert [i.type for i in items.data] == ["function_call_output"]
    c.responses.delete(r2.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r2.id)
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.create(model=model, previous_response_id=r2.id, input="more")
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "previous_response_id"


def test_state_survives_the_write_behind(rgw: RunningGateway) -> None:
    c = client(rgw)
    r1 = c.responses.create(model="fake-chat", input="first")
    from kaiyuan.server.responses_state import RUNTIME_KEY

    rt = next(r.app[RUNTIME_KEY] for r in rgw.servers._runners if r.app is not None and RUNTIME_KEY in r.app
              and r.app[RUNTIME_KEY].gw is rgw.gateway)
    import time

    deadline = time.monotonic() + 10  # the background writer takes it (woken by the put, one batch later)
    while rt.store.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not rt.store.pending
    assert rgw.servers.call(rt.store.get(r1.id, None)) is not None  # now read back from the database
    r2 = c.responses.create(model="fake-chat", input="second", previous_response_id=r1.id)
    assert r2.output_text == "echo: second"
    assert c.responses.retrieve(r1.id).output_text == "echo: first"


@pytest.mark.parametrize("model", MODELS)
def test_stream_text(rgw: RunningGateway, model: str) -> None:
    with client(rgw).responses.stream(model=model, input="one two three") as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    for k in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
              "response.output_text.done", "response.content_part.done", "response.output_item.done"):
        assert k in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "echo: one two three"
    assert final.usage is not None and final.usage.output_tokens > 0


@pytest.mark.parametrize("model", MODELS)
def test_stream_tool_call(rgw: RunningGateway, model: str) -> None:
    with client(rgw).responses.stream(model=model, input="parallel lookups", tools=TOOLS) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    calls = [o for o in final.output if o.type == "function_call"]
    assert len(calls) == 2 and all(json.loads(c.arguments)["query"] == "parallel lookups" for c in calls)


class Answer(BaseModel):
    answer: str


@pytest.mark.parametrize("model", MODELS)
def test_parse_json_schema(rgw: RunningGateway, model: str) -> None:
    r = client(rgw).responses.parse(model=model, input="capital of France", text_format=Answer)
    assert r.output_parsed == Answer(answer="capital of France")


def test_reasoning_summary_and_encrypted_round_trip(rgw: RunningGateway, fake_openai: Any) -> None:
    c = client(rgw)
    with c.responses.stream(model="deepseek-reasoner", input="why", tools=TOOLS, store=False,
                            reasoning={"summary": "auto"}, include=["reasoning.encrypted_content"]) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert "response.reasoning_summary_text.delta" in kinds and "response.reasoning_summary_text.done" in kinds
    rs = next(o for o in final.output if o.type == "reasoning")
    assert rs.summary[0].text == "thinking about: why " or rs.summary[0].text.startswith("thinking about: why")
    assert rs.encrypted_content and "thinking" not in rs.encrypted_content
    call = next(o for o in final.output if o.type == "function_call")
    items: list[Any] = [{"role": "user", "content": "why"}, {"type": "reasoning", "id": rs.id, "summary": [],
                                                             "encrypted_content": rs.encrypted_content},
                        call.model_dump(exclude_none=True),
                        {"type": "function_call_output", "call_id": call.call_id, "output": "42"}]
    r2 = c.responses.create(model="deepseek-reasoner", input=items, tools=TOOLS, store=False)
    assert r2.output_text == "tool said: 42"
    assistant = next(m for m in fake_openai.requests[-1]["messages"] if m["role"] == "assistant")
    assert assistant["reasoning_content"].startswith("thinking about: why")  # DeepSeek needs it back
    tampered = dict(items[1], encrypted_content=rs.encrypted_content[:-4] + "AAAA")
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="deepseek-reasoner", input=[items[0], tampered, *items[2:]], tools=TOOLS, store=False)
    assert "encrypted_content" in str(e.value)


def test_hosted_tools_omitted_with_header_or_refused(rgw: RunningGateway, fake_openai: Any) -> None:
    c = client(rgw)
    raw = c.responses.with_raw_response.create(model="fake-chat", input="hi",
                                               tools=[{"type": "web_search"}, *TOOLS])
    assert raw.headers["x-kaiyuan-omitted-tools"] == "web_search"
    assert [t["function"]["name"] for t in fake_openai.requests[-1]["tools"]] == ["search"]
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="strict-chat", input="hi", tools=[{"type": "web_search"}])
    assert "web_search" in str(e.value)


def test_namespace_tools_flattened_and_mapped_back(rgw: RunningGateway, fake_openai: Any) -> None:
    ns: Any = {"type": "namespace", "name": "crm", "description": "CRM tools",
               "tools": [{"type": "function", "name": "find", "parameters": {"type": "object", "properties": {}}}]}
    r = client(rgw).responses.create(model="fake-chat", input="find bob", tools=[ns])
    assert fake_openai.requests[-1]["tools"][0]["function"]["name"] == "crm__find"
    call = next(o for o in r.output if o.type == "function_call")
    assert call.name == "find" and call.namespace == "crm"


@pytest.mark.parametrize("body,param", [
    ({"model": "fake-chat"}, "input"),
    ({"model": "fake-chat", "input": 5}, "input"),
    ({"model": "fake-chat", "input": "x", "bogus": 1}, "bogus"),
    ({"model": "fake-chat", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "fake-chat", "input": "x", "reasoning": {"effort": "galactic"}}, "reasoning.effort"),
    ({"model": "fake-chat", "input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"model": "fake-chat", "input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "input[0].call_id"),
    ({"model": "fake-chat", "input": [{"type": "message", "role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"model": "fake-chat", "input": [{"type": "telepathy"}]}, "input[0].type"),
    ({"model": "fake-chat", "input": "x", "background": True}, "background"),
    ({"model": "fake-chat", "input": "x", "include": ["everything"]}, "include[0]"),
])
def test_bad_input_is_a_400_naming_the_field(rgw: RunningGateway, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(rgw).post("/responses", body=body, cast_to=dict)
    err = e.value.body
    assert isinstance(err, dict) and err.get("param") == param, err


def test_unknown_model_and_previous_id(rgw: RunningGateway) -> None:
    c = client(rgw)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="nope", input="x")
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="fake-chat", input="x", previous_response_id="resp_missing")
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_missing")
    r = c.responses.create(model="fake-chat", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        c.get(f"/responses/{r.id}/input_items?limit=0", cast_to=dict)
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "limit"


def test_broken_upstream_stream_ends_with_error_and_failed(rgw: RunningGateway, fake_openai: Any) -> None:
    from kaiyuan.testing.fake_openai import Behaviour

    fake_openai.next(Behaviour(drop_after_chunks=2))
    with pytest.raises(openai.APIError):
        with client(rgw).responses.stream(model="fake-chat", input="a b c d e f") as s:
            for _ in s:
                pass


# -- keys, cost, the request log, redaction --------------------------------------------------------
MASTER = "sk-master-responses-test"


@pytest.fixture
def kgw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: Any) -> RunningGateway:
    return make_gateway({"server": {"master_key": MASTER}, "models": [
        openai_model("cheap", fake_openai.url, "upstream-chat", deployment={"price": {"input": 1.0, "output": 2.0}},
                     log_bodies=True)]})


def _key(gw: RunningGateway, **body: Any) -> str:
    from tests.http import http

    r = http("POST", gw.url + "/admin/keys", {"name": "k", **body}, MASTER)
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def test_stored_responses_are_scoped_to_their_key(kgw: RunningGateway) -> None:
    a = openai.OpenAI(base_url=kgw.base_url, api_key=_key(kgw), max_retries=0)
    b = openai.OpenAI(base_url=kgw.base_url, api_key=_key(kgw), max_retries=0)
    r = a.responses.create(model="cheap", input="mine")
    assert a.responses.retrieve(r.id).output_text == "echo: mine"
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.create(model="cheap", input="theirs?", previous_response_id=r.id)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=kgw.base_url, api_key="sk-wrong", max_retries=0).responses.retrieve(r.id)
    assert a.responses.retrieve(r.id).id == r.id  # b's delete did nothing


def test_cost_usage_and_request_log(kgw: RunningGateway) -> None:
    c = openai.OpenAI(base_url=kgw.base_url, api_key=_key(kgw), max_retries=0)
    raw = c.responses.with_raw_response.create(model="cheap", input="count me")
    r = raw.parse()
    assert r.usage is not None
    expected = (r.usage.input_tokens * 1.0 + r.usage.output_tokens * 2.0) / 1e6
    assert float(raw.headers["x-kaiyuan-cost"]) == pytest.approx(expected)
    with c.responses.stream(model="cheap", input="stream me") as s:
        for _ in s:
            pass
    rows = [row for row in kgw.log_rows() if row["endpoint"] == "responses"]
    assert [row["stream"] for row in rows] == [False, True]
    assert all(row["status"] == 200 and row["prompt_tokens"] and row["completion_tokens"] for row in rows)
    assert rows[0]["cost_usd"] == pytest.approx(expected)
    assert rows[1]["cost_usd"] and rows[1]["cached_tokens"] is not None


def test_budget_applies_to_responses(kgw: RunningGateway) -> None:
    key = _key(kgw, budgets=[{"period": "month", "limit_usd": 0.0000001}])
    c = openai.OpenAI(base_url=kgw.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        for _ in range(3):
            c.responses.create(model="cheap", input="spend " * 50)


def test_stored_bodies_are_scrubbed_of_secrets(rgw: RunningGateway) -> None:
    c = client(rgw)
    secret = "sk-proj-" + "a1B2" * 8
    r = c.responses.create(model="fake-chat", input=f"my key is {secret}")
    items = c.responses.input_items.list(r.id)
    text = items.data[0].content[0].text  # type: ignore[union-attr]
    assert secret not in text and "[REDACTED]" in text


# -- reasoning with signatures, Gemini, pass-through ----------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_thinking_signature_survives_a_stateless_turn(rgw: RunningGateway, fake_anthropic: Any,
                                                                 stream: bool) -> None:
    c = client(rgw)
    kw: Any = {"model": "claude", "tools": TOOLS, "store": False, "reasoning": {"effort": "low", "summary": "auto"},
               "include": ["reasoning.encrypted_content"]}
    if stream:
        with c.responses.stream(input="think then call", **kw) as s:
            for _ in s:
                pass
            r1 = s.get_final_response()
    else:
        r1 = c.responses.create(input="think then call", **kw)
    assert fake_anthropic.requests[-1]["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    rs = next(o for o in r1.output if o.type == "reasoning")
    assert rs.summary and rs.summary[0].text == "thinking about: think then call"
    call = next(o for o in r1.output if o.type == "function_call")
    items: list[Any] = [{"role": "user", "content": "think then call"},
                        *(o.model_dump(exclude_none=True) for o in r1.output),
                        {"type": "function_call_output", "call_id": call.call_id, "output": "done"}]
    r2 = c.responses.create(input=items, **kw)
    assert r2.output_text == "tool said: done"
    sent = fake_anthropic.requests[-1]["messages"][1]["content"]
    assert sent[0]["type"] == "thinking" and sent[0]["thinking"] == "thinking about: think then call"
    assert sent[0]["signature"].startswith("sig_")  # the upstream's own signature, carried in the sealed blob


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_upstream(native_gateway: RunningGateway, fake_gemini: Any, stream: bool) -> None:
    c = client(native_gateway)
    if stream:
        with c.responses.stream(model="gemini", input="weather in Lima", tools=TOOLS) as s:
            for _ in s:
                pass
            r1 = s.get_final_response()
    else:
        r1 = c.responses.create(model="gemini", input="weather in Lima", tools=TOOLS)
    call = next(o for o in r1.output if o.type == "function_call")
    r2 = c.responses.create(model="gemini", previous_response_id=r1.id, tools=TOOLS,
                            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "warm"}])
    assert r2.output_text == "tool said: warm"
    assert "functionResponse" in str(fake_gemini.requests[-1]["contents"])


@pytest.fixture
def pgw(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: Any) -> RunningGateway:
    return make_gateway({"models": [openai_model("native", fake_openai.url, "upstream-resp",
                                                 deployment={"responses_api": True})]})


@pytest.mark.parametrize("stream", [False, True])
def test_pass_through_to_a_responses_upstream(pgw: RunningGateway, fake_openai: Any, stream: bool) -> None:
    c = client(pgw)
    if stream:
        with c.responses.stream(model="native", input="hi there", previous_response_id="resp_upstream_state") as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    else:
        r = c.responses.create(model="native", input="hi there", previous_response_id="resp_upstream_state")
    assert r.output_text == "echo: hi there"
    sent = fake_openai.requests[-1]
    assert sent["model"] == "upstream-resp" and sent["previous_response_id"] == "resp_upstream_state"
    assert fake_openai.headers[-1]["Authorization"] == "Bearer sk-upstream"
    row = pgw.log_rows()[-1]
    assert row["endpoint"] == "responses" and row["prompt_tokens"] == 7 and row["cached_tokens"] == 2


def test_pass_through_stream_cut_short_is_an_error(pgw: RunningGateway, fake_openai: Any) -> None:
    from kaiyuan.testing.fake_openai import Behaviour

    fake_openai.next(Behaviour(drop_after_chunks=3))
    with pytest.raises(openai.APIError):
        with client(pgw).responses.stream(model="native", input="a b c d") as s:
            for _ in s:
                pass


def test_canary_trial_splits_responses_traffic(make_gateway: Callable[[dict[str, Any]], RunningGateway],
                                               fake_openai: Any) -> None:
    trial = {"name": "ca", "mode": "canary", "incumbent": "big", "candidates": ["small"], "sample_rate": 1.0,
             "prices": {"big": {"input_per_mtok": 10, "output_per_mtok": 30}, "small": {"input_per_mtok": 1, "output_per_mtok": 1}}}
    gw = make_gateway({"models": [openai_model("big", fake_openai.url, "up-big"),
                                  openai_model("small", fake_openai.url, "up-small")], "trials": [trial]})
    r = client(gw).responses.create(model="big", input="hello")
    assert r.output_text == "echo: hello" and fake_openai.requests[-1]["model"] == "up-small"


@pytest.mark.parametrize("stream", [False, True])
def test_output_cap_is_sent_and_enforced(rgw: RunningGateway, fake_openai: Any, stream: bool) -> None:
    from kaiyuan.testing.fake_openai import Behaviour

    fake_openai.default = Behaviour(ignore_max_tokens=True, content=" ".join(f"w{i}" for i in range(60)))
    c = client(rgw)
    if stream:
        with c.responses.stream(model="fake-chat", input="long please", max_output_tokens=5) as s:
            events = list(s)
        assert events[-1].type == "response.incomplete"  # (the SDK's get_final_response wants .completed)
        r = events[-1].response  # type: ignore[union-attr]
    else:
        r = c.responses.create(model="fake-chat", input="long please", max_output_tokens=5)
    sent = fake_openai.requests[-1]
    assert sent["max_tokens"] == 5 or sent.get("max_completion_tokens") == 5
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert 0 < len(r.output_text) <= len(" ".join(f"w{i}" for i in range(60))) * 6 // 60  # cut near the cap
