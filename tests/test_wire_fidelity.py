"""Wire fidelity: what a spec check (OpenAI's OpenAPI spec, the anthropic SDK's types, recorded
vendor streams) found wrong in translated and passed-through replies (issue 10), each with its fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from kaiyuan.dialects.streams import OpenAIToAnthropic
from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway
from tests.conftest import openai_model

TOOLS: Any = [{"name": "search", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}},
              {"name": "lookup", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]


@pytest.fixture
def wire_gateway(make_gateway: Callable[[dict[str, Any]], RunningGateway], fake_openai: FakeOpenAI,
                 fake_anthropic: Any, fake_gemini: Any) -> RunningGateway:
    return make_gateway({"models": [
        openai_model("oa", fake_openai.url, "up-chat"),  # type: ignore[attr-defined]
        {"name": "claude", "deployments": [{"provider": "anthropic", "base_url": fake_anthropic.url, "model": "claude-up",
                                            "api_key": "sk-ant-upstream"}]},
        {"name": "gemini", "deployments": [{"provider": "gemini", "base_url": fake_gemini.url + "/v1beta", "model": "gemini-up",
                                            "api_key": "gm-upstream"}]},
    ]})


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.split(b"\n\n"):
        lines = dict(ln.split(b": ", 1) for ln in block.split(b"\n") if b": " in ln)
        if b"event" in lines:
            out.append((lines[b"event"].decode(), orjson.loads(lines[b"data"])))
    return out


def assert_one_block_open_at_a_time(events: list[tuple[str, dict[str, Any]]]) -> None:
    open_block: int | None = None
    for name, data in events:
        if name == "content_block_start":
            assert open_block is None, f"block {data['index']} started while block {open_block} was open"
            open_block = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_block, f"delta for block {data['index']} while {open_block} is open"
        elif name == "content_block_stop":
            assert data["index"] == open_block
            open_block = None
    assert open_block is None


@pytest.mark.parametrize("model", ["oa", "gemini"])
def test_parallel_tool_calls_into_an_anthropic_stream(wire_gateway: RunningGateway, model: str) -> None:
    body = {"model": model, "max_tokens": 100, "stream": True, "tools": TOOLS,
            "messages": [{"role": "user", "content": "parallel things"}]}
    raw = httpx.post(wire_gateway.url + "/v1/messages", json=body, timeout=30).content
    events = sse_events(raw)
    assert_one_block_open_at_a_time(events)
    starts = [d["content_block"] for n, d in events if n == "content_block_start" and d["content_block"]["type"] == "tool_use"]
    assert [s["name"] for s in starts] == ["search", "lookup"]
    cl = anthropic.Anthropic(base_url=wire_gateway.url, api_key="x", max_retries=0)
    with cl.messages.stream(**{k: v for k, v in body.items() if k != "stream"}) as s:
        msg = s.get_final_message()
    assert [b.input for b in msg.content if b.type == "tool_use"] == [{"query": "parallel things", "n": 0},
                                                                       {"query": "parallel things", "n": 1}]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _tc(i: int, args: str, name: str | None = None) -> dict[str, Any]:
    fn: dict[str, Any] = {"arguments": args}
    if name:
        fn["name"] = name
    tc: dict[str, Any] = {"index": i, "function": fn}
    if name:
        tc["id"] = f"call_{i}"
    return _chunk({"tool_calls": [tc]})


def test_interleaved_argument_deltas_are_buffered_per_tool() -> None:
    tr = OpenAIToAnthropic("m", input_tokens=42)
    chunks = [_chunk({"content": "Let me look."}), _tc(0, '{"a":', "f"), _tc(1, '{"b":', "g"), _tc(0, " 1}"),
              _tc(1, " 2}"), _tc(2, "", "h"), _chunk({}, "tool_calls")]
    raw = b"".join(b for ch in chunks for b in tr.feed(ch)) + b"".join(tr.end())
    events = sse_events(raw)
    assert_one_block_open_at_a_time(events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == 42
    args: dict[int, str] = {}
    for name, d in events:
        if name == "content_block_delta" and d["delta"]["type"] == "input_json_delta":
            args[d["index"]] = args.get(d["index"], "") + d["delta"]["partial_json"]
    assert args == {1: '{"a": 1}', 2: '{"b": 2}'}  # block 0 is the text, block 3 (h) has no arguments
    assert [d["content_block"]["name"] for n, d in events if n == "content_block_start" and d["index"]] == ["f", "g", "h"]


def test_no_argument_tool_call_from_anthropic_stream_is_an_empty_object(wire_gateway: RunningGateway,
                                                                      fake_anthropic: Any) -> None:
    fake_anthropic.default = Behaviour(agent_tools={"search": {}})
    cl = openai.OpenAI(base_url=wire_gateway.base_url, api_key="x", max_retries=0)
    tools: Any = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}]
    args = ""
    for ch in cl.chat.completions.create(model="claude", stream=True, tools=tools, messages=[{"role": "user", "content": "go"}]):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            args += (tc.function.arguments or "") if tc.function else ""
    assert args == "{}"
    whole = cl.chat.completions.create(model="claude", tools=tools, messages=[{"role": "user", "content": "go"}])
    assert whole.choices[0].message.tool_calls[0].function.arguments == "{}"  # type: ignore[index, union-attr]


def test_usage_is_absent_unless_asked(wire_gateway: RunningGateway, fake_anthropic: Any) -> None:
    for model in ("oa", "claude", "gemini"):
        body: dict[str, Any] = {"model": model, "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
        chunks = [orjson.loads(ln[6:]) for ln in httpx.post(wire_gateway.base_url + "/chat/completions", json=body).content.split(b"\n\n")
                  if ln.startswith(b"data: {")]
        assert chunks and all("usage" not in ch for ch in chunks), model
        body["stream_options"] = {"include_usage": True}
        chunks = [orjson.loads(ln[6:]) for ln in httpx.post(wire_gateway.base_url + "/chat/completions", json=body).content.split(b"\n\n")
                  if ln.startswith(b"data: {")]
        assert chunks[-1]["usage"]["prompt_tokens"] > 0 and chunks[-1]["choices"] == [], model


@pytest.mark.parametrize("model", ["oa", "gemini"])
def test_translated_anthropic_stream_reports_the_prompt_size_at_the_start(wire_gateway: RunningGateway, model: str) -> None:
    cl = anthropic.Anthropic(base_url=wire_gateway.url, api_key="x", max_retries=0)
    with cl.messages.stream(model=model, max_tokens=50, messages=[{"role": "user", "content": "one two three " * 20}]) as s:
        first = next(iter(s))
        assert first.type == "message_start" and first.message.usage.input_tokens > 20
        final = s.get_final_message()
    assert final.usage.input_tokens > 20


def test_cooling_down_sends_the_remaining_time(wire_gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.next(Behaviour(status=429, headers={"Retry-After": "30"}))
    cl = openai.OpenAI(base_url=wire_gateway.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as first:
        cl.chat.completions.create(model="oa", messages=[{"role": "user", "content": "x"}])
    assert first.value.response.headers["retry-after"] == "30"
    r = httpx.post(wire_gateway.base_url + "/chat/completions", json={"model": "oa", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and "cooling down" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 30


def test_replies_carry_the_public_model_name_on_every_path(wire_gateway: RunningGateway) -> None:
    oa = openai.OpenAI(base_url=wire_gateway.base_url, api_key="x", max_retries=0)
    an = anthropic.Anthropic(base_url=wire_gateway.url, api_key="x", max_retries=0)
    hi: Any = [{"role": "user", "content": "hi"}]
    for model in ("oa", "claude", "gemini"):
        assert oa.chat.completions.create(model=model, messages=hi).model == model
        assert {ch.model for ch in oa.chat.completions.create(model=model, messages=hi, stream=True)} == {model}
        assert an.messages.create(model=model, max_tokens=20, messages=hi).model == model
        with an.messages.stream(model=model, max_tokens=20, messages=hi) as s:
            assert s.get_final_message().model == model
