"""The official openai SDK through Kaiyuan to the fake Anthropic and Gemini upstreams."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from kaiyuan.testing.fake_openai import Behaviour
from kaiyuan.testing.harness import RunningGateway

TOOLS: Any = [
    {"type": "function", "function": {"name": "search", "description": "search the web", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "n": {"type": "integer"}}, "required": ["query"]}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}},
]
MODELS = ["claude", "gemini"]


def client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0)


def _fake(request: pytest.FixtureRequest, model: str) -> Any:
    return request.getfixturevalue("fake_anthropic" if model == "claude" else "fake_gemini")


@pytest.mark.parametrize("model", MODELS)
def test_chat_non_streaming(native_gateway: RunningGateway, request: pytest.FixtureRequest, model: str) -> None:
    r = client(native_gateway).chat.completions.create(
        model=model, messages=[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there"}],
        max_tokens=40, temperature=0.5, stop=["zzz"])
    assert r.choices[0].message.content == "echo: hello there"
    assert r.choices[0].finish_reason == "stop" and r.model == model
    assert r.usage is not None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    sent = _fake(request, model).requests[-1]
    if model == "claude":
        assert sent["system"] == "be kind" and sent["max_tokens"] == 40 and sent["stop_sequences"] == ["zzz"]
        assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
        assert _fake(request, model).headers[-1]["anthropic-version"] == "2023-06-01"
    else:
        assert sent["systemInstruction"] == {"parts": [{"text": "be kind"}]}
        assert sent["generationConfig"] == {"temperature": 0.5, "maxOutputTokens": 40, "stopSequences": ["zzz"]}
        assert _fake(request, model).paths[-1] == "/v1beta/models/gemini-up:generateContent"


@pytest.mark.parametrize("model", MODELS)
def test_chat_streaming_with_usage(native_gateway: RunningGateway, model: str) -> None:
    chunks = list(client(native_gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "one two three"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


@pytest.mark.parametrize("model", MODELS)
def test_stream_without_usage_request_has_no_usage_chunk(native_gateway: RunningGateway, model: str) -> None:
    chunks = list(client(native_gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_and_loop(native_gateway: RunningGateway, request: pytest.FixtureRequest, model: str, stream: bool) -> None:
    c = client(native_gateway)
    msgs: list[Any] = [{"role": "user", "content": "parallel weather"}]
    if stream:
        chunks = list(c.chat.completions.create(model=model, messages=msgs, tools=TOOLS, stream=True))
        calls: dict[int, dict[str, str]] = {}
        arg_pieces = 0
        for ch in chunks:
            for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
                slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                slot["name"] = (tc.function.name if tc.function and tc.function.name else slot["name"])
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
                    arg_pieces += 1
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        got = [calls[i] for i in sorted(calls)]
        if model == "claude":
            assert arg_pieces > 2  # Anthropic's input_json_delta pieces arrive as argument deltas
    else:
        r = c.chat.completions.create(model=model, messages=msgs, tools=TOOLS)
        finish = [r.choices[0].finish_reason]
        got = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments} for t in r.choices[0].message.tool_calls or []]
    assert finish == ["tool_calls"]  # Gemini says STOP; Anthropic says tool_use
    assert [g["name"] for g in got] == ["search", "lookup"]
    assert [json.loads(g["arguments"]) for g in got] == [{"query": "parallel weather", "n": 0}, {"query": "parallel weather", "n": 1}]
    assert all(g["id"] for g in got)
    msgs.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": g["id"], "type": "function", "function": {"name": g["name"], "arguments": g["arguments"]}} for g in got]})
    msgs += [{"role": "tool", "tool_call_id": got[0]["id"], "content": "sunny"},
             {"role": "tool", "tool_call_id": got[1]["id"], "content": "warm"}]
    r2 = c.chat.completions.create(model=model, messages=msgs, tools=TOOLS)
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content.startswith("tool said:")
    sent = _fake(request, model).requests[-1]
    if model == "claude":
        assert sent["messages"][1]["content"][0]["input"] == {"query": "parallel weather", "n": 0}
        assert [b["tool_use_id"] for b in sent["messages"][2]["content"]] == [got[0]["id"], got[1]["id"]]
    else:
        parts = sent["contents"][1]["parts"]
        assert parts[0]["functionCall"] == {"name": "search", "args": {"query": "parallel weather", "n": 0}}
        assert sent["contents"][2]["parts"][0]["functionResponse"] == {"name": "search", "response": {"result": "sunny"}}
        assert sent["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"] == TOOLS[0]["function"]["parameters"]


@pytest.mark.parametrize("model", MODELS)
def test_tool_choice_forced(native_gateway: RunningGateway, request: pytest.FixtureRequest, model: str) -> None:
    r = client(native_gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "lookup"}})
    assert r.choices[0].message.tool_calls[0].function.name == "lookup"  # type: ignore[index]
    sent = _fake(request, model).requests[-1]
    if model == "claude":
        assert sent["tool_choice"] == {"type": "tool", "name": "lookup"}
    else:
        assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["lookup"]}}


@pytest.mark.parametrize("model", MODELS)
def test_json_mode(native_gateway: RunningGateway, model: str) -> None:
    r = client(native_gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content or "") == {"answer": "hi"}


@pytest.mark.parametrize("model", MODELS)
def test_length_finish_reason(native_gateway: RunningGateway, model: str) -> None:
    r = client(native_gateway).chat.completions.create(model=model, messages=[{"role": "user", "content": "a b c d e"}], max_tokens=2)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_thinking_to_reasoning_content_and_back(native_gateway: RunningGateway, fake_anthropic: Any, stream: bool) -> None:
    """reasoning_effort -> thinking; the signed thinking comes back as reasoning_content (+ reasoning_signature)
    and is handed back to Anthropic intact on the next turn (the fake, like Anthropic, 400s on unsigned thinking)."""
    c = client(native_gateway)
    msgs: list[Any] = [{"role": "user", "content": "plan"}]
    if stream:
        chunks = list(c.chat.completions.create(model="claude", messages=msgs, tools=TOOLS, reasoning_effort="low", stream=True))
        reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
        assert reasoning == "thinking about: plan"
        r = c.chat.completions.create(model="claude", messages=msgs, tools=TOOLS, reasoning_effort="low")
    else:
        r = c.chat.completions.create(model="claude", messages=msgs, tools=TOOLS, reasoning_effort="low")
    sent = fake_anthropic.requests[-1]
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024} and sent["max_tokens"] > 1024
    msg = r.choices[0].message.model_dump(exclude_none=True)
    assert msg["reasoning_content"] == "thinking about: plan" and msg["reasoning_signature"].startswith("sig_")
    msgs += [msg, {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "ok"}]
    r2 = c.chat.completions.create(model="claude", messages=msgs, tools=TOOLS, reasoning_effort="low")
    assert r2.choices[0].message.content == "tool said: ok"
    back = fake_anthropic.requests[-1]["messages"][1]["content"][0]
    assert back == {"type": "thinking", "thinking": "thinking about: plan", "signature": msg["reasoning_signature"]}


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_thoughts_become_reasoning_content(native_gateway: RunningGateway, fake_gemini: Any, stream: bool) -> None:
    c = client(native_gateway)
    kw: Any = {"model": "gemini", "messages": [{"role": "user", "content": "why"}], "reasoning_effort": "medium"}
    if stream:
        chunks = list(c.chat.completions.create(stream=True, **kw))
        reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    else:
        r = c.chat.completions.create(**kw)
        reasoning, text = r.choices[0].message.reasoning_content, r.choices[0].message.content  # type: ignore[attr-defined]
    assert reasoning == "thinking about: why" and text == "echo: why"
    assert fake_gemini.requests[-1]["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 4096, "includeThoughts": True}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"n": 2}, "'n' has no equivalent"),
    ({"logprobs": True}, "'logprobs' has no equivalent"),
    ({"extra_body": {"mystery": 1}}, "mystery"),
])
def test_untranslatable_parameters_are_a_clear_400(native_gateway: RunningGateway, model: str, kwargs: dict, needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client(native_gateway).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], **kwargs)
    assert needle in ei.value.message


def test_seed_and_penalties_refused_for_anthropic_but_sent_to_gemini(native_gateway: RunningGateway, fake_gemini: Any) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client(native_gateway).chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}], seed=1)
    assert "'seed' has no equivalent in the Anthropic" in ei.value.message
    client(native_gateway).chat.completions.create(model="gemini", messages=[{"role": "user", "content": "x"}], seed=1,
                                                   presence_penalty=0.5)
    assert fake_gemini.requests[-1]["generationConfig"] == {"seed": 1, "presencePenalty": 0.5}


@pytest.mark.parametrize("model", MODELS)
def test_unmatched_tool_message_is_a_400(native_gateway: RunningGateway, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client(native_gateway).chat.completions.create(model=model, messages=[
            {"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_nope", "content": "r"}])
    assert "call_nope" in ei.value.message


@pytest.mark.parametrize("model", MODELS)
def test_embeddings_on_native_deployment_is_a_clear_400(native_gateway: RunningGateway, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client(native_gateway).embeddings.create(model=model, input="x")
    assert "no embeddings endpoint" in ei.value.message


@pytest.mark.parametrize(("model", "status", "exc"), [
    ("claude", 529, openai.InternalServerError), ("claude", 429, openai.RateLimitError),
    ("gemini", 429, openai.RateLimitError), ("gemini", 400, openai.BadRequestError),
])
def test_upstream_errors_keep_their_status(native_gateway: RunningGateway, request: pytest.FixtureRequest,
                                           model: str, status: int, exc: type) -> None:
    _fake(request, model).default = Behaviour(status=status, error_message="upstream says no")  # persistent
    with pytest.raises(exc) as ei:
        client(native_gateway).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == status and "upstream says no" in ei.value.message


@pytest.mark.parametrize("model", MODELS)
def test_truncated_upstream_stream_is_an_error(native_gateway: RunningGateway, request: pytest.FixtureRequest, model: str) -> None:
    _fake(request, model).next(Behaviour(omit_done=True))
    with pytest.raises(openai.APIError):
        list(client(native_gateway).chat.completions.create(model=model, messages=[{"role": "user", "content": "a b"}], stream=True))


def test_gemini_thought_signature_rides_in_the_call_id(native_gateway: RunningGateway, fake_gemini: Any) -> None:
    """Gemini 3 refuses a function-call turn that comes back without its thoughtSignature."""
    c = client(native_gateway)
    msgs: list[Any] = [{"role": "user", "content": "sig"}]
    r = c.chat.completions.create(model="gemini", messages=msgs, tools=TOOLS)
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert "__ts__" in call.id
    msgs += [r.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "ok"}]
    assert c.chat.completions.create(model="gemini", messages=msgs, tools=TOOLS).choices[0].message.content == "tool said: ok"
    sig_sent_by_upstream = fake_gemini.requests[-1]["contents"][1]["parts"][0]["thoughtSignature"]
    assert sig_sent_by_upstream.startswith("CiQB0e2Kb+") and sig_sent_by_upstream.endswith("/x==")
    stripped = [msgs[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_plain", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_plain", "content": "ok"}]
    # a call Gemini did not make (another upstream's, or hand-built) goes with Gemini's documented stand-in
    # signature instead of a 400; the fake, like Gemini 3, refuses a first call without any signature
    assert c.chat.completions.create(model="gemini", messages=stripped, tools=TOOLS).choices[0].message.content == "tool said: ok"
    assert fake_gemini.requests[-1]["contents"][1]["parts"][0]["thoughtSignature"] == "context_engineering_is_the_way_to_go"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("messages", "needle"), [
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAA=", "format": "wav"}}]}], "input_audio"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{not json"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "r"}], "not valid JSON"),
    ([{"role": "function", "name": "f", "content": "x"}], "role 'function'"),
])
def test_untranslatable_messages_are_a_clear_400(native_gateway: RunningGateway, model: str, messages: list, needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client(native_gateway).chat.completions.create(model=model, messages=messages)
    assert needle in ei.value.message and ei.value.body["type"] == "invalid_request_error"  # type: ignore[index]


@pytest.mark.parametrize(("fixture", "text", "tool_args"), [
    ("stream_text.sse", "Hello!", None),
    ("stream_tool_use.sse", "Okay, let's check the weather for San Francisco, CA:", {"location": "San Francisco, CA", "unit": "fahrenheit"}),
])
def test_anthropic_docs_stream_replayed_byte_for_byte(native_gateway: RunningGateway, fake_anthropic: Any,
                                                      fixture: str, text: str, tool_args: Any) -> None:
    """The exact SSE bytes of Anthropic's streaming examples, sent by the fake upstream, reach the openai SDK intact."""
    raw = (Path(__file__).parent / "fixtures" / "anthropic" / fixture).read_bytes()
    fake_anthropic.next(Behaviour(raw_body=raw, headers={"Content-Type": "text/event-stream"}))
    chunks = list(client(native_gateway).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "weather?"}], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    if tool_args is None:
        assert not calls and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    else:
        assert calls[0].id == "toolu_01T1x1fJ34qAmk2tNTrN7Up6" and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == tool_args  # type: ignore[union-attr]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == (15 if tool_args is None else 89)


def test_anthropic_docs_error_body_keeps_status_and_message(native_gateway: RunningGateway, fake_anthropic: Any) -> None:
    """Anthropic's documented error shape (with request_id), as an OpenAI caller sees it."""
    raw = (Path(__file__).parent / "fixtures" / "anthropic" / "error_not_found.json").read_bytes()
    fake_anthropic.default = Behaviour(status=404, raw_body=raw, headers={"Content-Type": "application/json"})  # persistent
    with pytest.raises(openai.NotFoundError) as ei:
        client(native_gateway).chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}])
    assert "The requested resource could not be found." in ei.value.message
