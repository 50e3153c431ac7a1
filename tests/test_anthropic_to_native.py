"""The anthropic SDK through Kaiyuan to the fake Anthropic (pass-through) and fake Gemini upstreams."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from kaiyuan.testing.fake_openai import Behaviour
from kaiyuan.testing.harness import RunningGateway

TOOLS: Any = [{"name": "search", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}},
              {"name": "lookup", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]


def client(gw: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)


def test_pass_through_to_anthropic(native_gateway: RunningGateway, fake_anthropic: Any) -> None:
    body_extra = {"cache_control": {"type": "ephemeral"}}
    r = client(native_gateway).messages.create(model="claude", max_tokens=30, messages=[{"role": "user", "content": "hi"}],
                                               extra_body=body_extra, extra_headers={"anthropic-beta": "some-beta"})
    assert r.content[0].text == "echo: hi" and r.model == "claude"  # the public name (docs/translation.md)
    sent = fake_anthropic.requests[-1]
    assert sent == {"max_tokens": 30, "messages": [{"role": "user", "content": "hi"}], "model": "claude-up", **body_extra}
    assert fake_anthropic.headers[-1]["anthropic-beta"] == "some-beta"
    assert fake_anthropic.headers[-1]["x-api-key"] == "sk-ant-upstream"
    row = native_gateway.log_rows()[-1]
    assert row["status"] == 200 and row["prompt_tokens"] and row["completion_tokens"]


def test_pass_through_stream_with_tools_and_thinking(native_gateway: RunningGateway) -> None:
    with client(native_gateway).messages.stream(model="claude", max_tokens=2000, tools=TOOLS,
                                                thinking={"type": "enabled", "budget_tokens": 1024},
                                                messages=[{"role": "user", "content": "parallel things"}]) as s:
        r = s.get_final_message()
    assert [b.type for b in r.content] == ["thinking", "tool_use", "tool_use"]
    assert r.content[0].signature.startswith("sig_")  # type: ignore[union-attr]
    assert r.content[1].input == {"query": "parallel things", "n": 0} and r.stop_reason == "tool_use"  # type: ignore[union-attr]
    row = native_gateway.log_rows()[-1]
    assert row["status"] == 200 and row["completion_tokens"] and row["prompt_tokens"]


def test_pass_through_count_tokens_asks_upstream(native_gateway: RunningGateway, fake_anthropic: Any) -> None:
    r = client(native_gateway).messages.count_tokens(model="claude", messages=[{"role": "user", "content": "a b c"}])
    assert r.input_tokens == 6  # the fake's count (3 words + 3), not the local estimate
    assert fake_anthropic.requests[-1]["model"] == "claude-up"


@pytest.mark.parametrize(("status", "exc", "etype"), [
    (529, anthropic.InternalServerError, "overloaded_error"), (401, anthropic.AuthenticationError, "authentication_error")])
def test_pass_through_errors(native_gateway: RunningGateway, fake_anthropic: Any, status: int, exc: type, etype: str) -> None:
    fake_anthropic.default = Behaviour(status=status)  # persistent: retries must not hide it
    with pytest.raises(exc) as ei:
        client(native_gateway).messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == status and ei.value.body["error"]["type"] == etype


def test_mid_stream_overload_reaches_both_dialects(native_gateway: RunningGateway, fake_anthropic: Any) -> None:
    fake_anthropic.next(Behaviour(error_event_after_chunks=3))
    with pytest.raises(anthropic.APIStatusError), client(native_gateway).messages.stream(
            model="claude", max_tokens=50, messages=[{"role": "user", "content": "a b c d"}]) as s:
        list(s)
    fake_anthropic.next(Behaviour(error_event_after_chunks=3))
    oc = openai.OpenAI(base_url=native_gateway.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):
        list(oc.chat.completions.create(model="claude", messages=[{"role": "user", "content": "a b c d"}], stream=True))


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_to_gemini_tools_loop(native_gateway: RunningGateway, fake_gemini: Any, stream: bool) -> None:
    c = client(native_gateway)
    msgs: list[Any] = [{"role": "user", "content": "parallel look"}]
    kw: Any = {"model": "gemini", "max_tokens": 100, "tools": TOOLS, "thinking": {"type": "enabled", "budget_tokens": 2048}}
    if stream:
        with c.messages.stream(messages=msgs, **kw) as s:
            r = s.get_final_message()
    else:
        r = c.messages.create(messages=msgs, **kw)
    assert [b.type for b in r.content] == ["thinking", "tool_use", "tool_use"]
    assert r.stop_reason == "tool_use"  # Gemini said STOP
    assert [b.input for b in r.content[1:]] == [{"query": "parallel look", "n": 0}, {"query": "parallel look", "n": 1}]  # type: ignore[union-attr]
    assert fake_gemini.requests[-1]["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 2048, "includeThoughts": True}
    msgs += [{"role": "assistant", "content": r.content}, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": r.content[1].id, "content": "one"},  # type: ignore[union-attr]
        {"type": "tool_result", "tool_use_id": r.content[2].id, "content": "two"}]}]  # type: ignore[union-attr]
    r2 = c.messages.create(messages=msgs, **kw)
    assert r2.content[-1].text == "tool said: one two" and r2.stop_reason == "end_turn"  # type: ignore[union-attr]
    sent = fake_gemini.requests[-1]["contents"]
    assert [p["functionResponse"]["name"] for p in sent[2]["parts"]] == ["search", "lookup"]


def test_anthropic_to_gemini_structured_output(native_gateway: RunningGateway, fake_gemini: Any) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    r = client(native_gateway).messages.create(model="gemini", max_tokens=50, messages=[{"role": "user", "content": "q"}],
                                               output_config={"format": {"type": "json_schema", "schema": schema}})  # type: ignore[typeddict-item]
    assert r.content[0].text == '{"answer":"q"}'  # type: ignore[union-attr]
    gc = fake_gemini.requests[-1]["generationConfig"]
    assert gc["responseMimeType"] == "application/json" and gc["responseJsonSchema"] == schema


def test_fallback_across_protocols(make_gateway: Any, fake_anthropic: Any, fake_openai: Any) -> None:
    """Each attempt is built for its own deployment's protocol, and the reply translated from the one that answered."""
    gw = make_gateway({"models": [{"name": "mixed", "deployments": [
        {"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up", "api_key": "sk-ant-upstream"},
        {"provider": "openai_compatible", "base_url": fake_openai.url + "/v1", "model": "ds", "api_key": "sk-upstream",
         "weight": 0}]}]})  # weight 0: tried last
    fake_anthropic.default = Behaviour(status=529)  # persistently overloaded
    r = client(gw).messages.create(model="mixed", max_tokens=20, tools=TOOLS, messages=[{"role": "user", "content": "go"}])
    assert r.stop_reason == "tool_use" and r.content[0].input == {"query": "go", "n": 0}  # type: ignore[union-attr]
    assert fake_anthropic.requests[-1]["model"] == "claude-up" and fake_openai.requests[-1]["model"] == "ds"
    oc = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    chunks = list(oc.chat.completions.create(model="mixed", messages=[{"role": "user", "content": "a b"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: a b"
    row = gw.log_rows()[-1]
    assert row["attempts"] >= 2 and row["status"] == 200
