"""The OpenAI data plane, driven by the official openai SDK against a fake OpenAI-compatible upstream."""

from __future__ import annotations

import json

import openai
import pytest

from kaiyuan.testing.fake_openai import FakeOpenAI
from kaiyuan.testing.harness import RunningGateway


def client(gw: RunningGateway, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, **kw)


def test_chat_non_streaming(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    r = client(gateway).chat.completions.create(
        model="fake-chat", messages=[{"role": "user", "content": "hello there"}], seed=7, temperature=0.2
    )
    assert r.choices[0].message.content == "echo: hello there"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens > 0
    sent = fake_openai.requests[-1]
    assert sent["model"] == "upstream-chat"  # public name rewritten to the upstream's
    assert sent["seed"] == 7 and sent["temperature"] == 0.2
    assert fake_openai.headers[-1]["Authorization"] == "Bearer sk-upstream"


def test_unknown_parameters_pass_through_untouched(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    client(gateway).chat.completions.create(
        model="fake-chat",
        messages=[{"role": "user", "content": "x"}],
        extra_body={"top_k": 5, "enable_thinking": False, "vendor": {"nested": [1, 2]}},
        logprobs=True,
        top_logprobs=2,
        stop=["\n\n"],
        n=2,
        max_completion_tokens=50,
    )
    sent = fake_openai.requests[-1]
    assert sent["top_k"] == 5 and sent["enable_thinking"] is False and sent["vendor"] == {"nested": [1, 2]}
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2 and sent["stop"] == ["\n\n"]
    assert sent["n"] == 2 and sent["max_completion_tokens"] == 50


def test_chat_streaming_without_usage_request(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    stream = client(gateway).chat.completions.create(
        model="fake-chat", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three"
    # The gateway asked the upstream for usage on the caller's behalf, and hid the extra chunk.
    assert fake_openai.requests[-1]["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)
    rows = gateway.log_rows()
    assert rows[-1]["prompt_tokens"] and rows[-1]["completion_tokens"] and rows[-1]["stream"]
    assert rows[-1]["ttft_ms"] is not None and rows[-1]["status"] == 200


def test_chat_streaming_with_usage(gateway: RunningGateway) -> None:
    chunks = list(
        client(gateway).chat.completions.create(
            model="fake-chat",
            messages=[{"role": "user", "content": "a b"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens is not None


async def test_async_client_streaming_and_tools(gateway: RunningGateway) -> None:
    c = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
    r = await c.chat.completions.create(model="fake-chat", messages=[{"role": "user", "content": "weather in Oslo"}], tools=tools, tool_choice="auto")
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["query"] == "weather in Oslo"
    # Streamed tool-call argument deltas reassemble into the same arguments.
    args = ""
    name = None
    async for chunk in await c.chat.completions.create(
        model="fake-chat", messages=[{"role": "user", "content": "weather in Oslo"}], tools=tools, stream=True
    ):
        for tc in chunk.choices[0].delta.tool_calls or []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
    assert name == "get_weather" and json.loads(args)["query"] == "weather in Oslo"
    # Second turn with the tool result.
    r2 = await c.chat.completions.create(
        model="fake-chat",
        messages=[
            {"role": "user", "content": "weather in Oslo"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
        tools=tools,
    )
    assert r2.choices[0].message.content == "tool said: sunny"
    await c.close()


def test_response_format_json_schema(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    schema = {"name": "a", "schema": {"type": "object", "properties": {"answer": {"type": "string"}}}}
    r = client(gateway).chat.completions.create(
        model="fake-chat", messages=[{"role": "user", "content": "q"}], response_format={"type": "json_schema", "json_schema": schema}
    )
    assert json.loads(r.choices[0].message.content) == {"answer": "q"}
    assert fake_openai.requests[-1]["response_format"]["json_schema"] == schema


def test_reasoning_content_round_trips(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    c = client(gateway)
    r = c.chat.completions.create(model="deepseek-reasoner", messages=[{"role": "user", "content": "2+2"}])
    msg = r.choices[0].message
    assert msg.reasoning_content == "thinking about: 2+2"  # type: ignore[attr-defined]
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    reasoning = ""
    for chunk in c.chat.completions.create(model="deepseek-reasoner", messages=[{"role": "user", "content": "2+2"}], stream=True):
        if chunk.choices:
            reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
    assert reasoning.strip() == "thinking about: 2+2"
    # The assistant turn sent back with its reasoning_content reaches the upstream untouched.
    c.chat.completions.create(
        model="deepseek-reasoner",
        messages=[
            {"role": "user", "content": "2+2"},
            {"role": "assistant", "content": "4", "reasoning_content": "thinking about: 2+2"},  # type: ignore[typeddict-unknown-key]
            {"role": "user", "content": "and 3+3?"},
        ],
    )
    assert fake_openai.requests[-1]["messages"][1]["reasoning_content"] == "thinking about: 2+2"
    rows = gateway.log_rows()
    assert rows[-1]["cached_tokens"] is not None and rows[-1]["reasoning_tokens"] is not None


def test_completions_and_embeddings(gateway: RunningGateway) -> None:
    c = client(gateway)
    r = c.completions.create(model="fake-chat", prompt="say hi", max_tokens=5)
    assert r.choices[0].text == "completed: say hi"
    chunks = list(c.completions.create(model="fake-chat", prompt="a b c", stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices).startswith("completed:")
    e = c.embeddings.create(model="fake-chat", input=["alpha", "beta"])  # SDK default: base64
    assert len(e.data) == 2 and len(e.data[0].embedding) == 8
    e2 = c.embeddings.create(model="fake-chat", input="alpha", encoding_format="float", dimensions=4)
    assert len(e2.data[0].embedding) == 4
    assert abs(e2.data[0].embedding[0] - e.data[0].embedding[0]) < 1e-6


def test_models_list(gateway: RunningGateway) -> None:
    ids = [m.id for m in client(gateway).models.list()]
    assert ids == ["fake-chat", "deepseek-reasoner"]


def test_request_log_records_every_request(gateway: RunningGateway) -> None:
    c = client(gateway)
    c.chat.completions.create(model="fake-chat", messages=[{"role": "user", "content": "logged"}])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    rows = gateway.log_rows()
    ok, bad = rows[-2], rows[-1]
    assert ok["model"] == "fake-chat" and ok["status"] == 200 and ok["deployment"].startswith("openai_compatible:upstream-chat")
    assert ok["latency_ms"] > 0 and ok["prompt_tokens"] and ok["error"] is None
    assert ok["request_body"] and "logged" in ok["request_body"] and "echo: logged" in ok["response_body"]
    assert bad["status"] == 404 and "does not exist" in bad["error"]


def test_cost_header_on_whole_answers_matches_the_log(make_gateway, fake_openai: FakeOpenAI) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import openai_model

    gw = make_gateway({"models": [openai_model("deepseek-chat", fake_openai.url)]})
    raw = client(gw).chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "price me"}]
    )
    cost = float(raw.headers["x-kaiyuan-cost"])
    assert cost > 0
    row = gw.log_rows()[-1]
    assert abs(row["cost_usd"] - cost) < 1e-9
    # Streams send headers before usage exists: the cost is in the log only.
    stream = client(gw).chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "x"}], stream=True
    )
    assert "x-kaiyuan-cost" not in stream.headers
    list(stream.parse())
    assert gw.log_rows()[-1]["cost_usd"] > 0
