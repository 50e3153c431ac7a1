"""Each translation, against golden fixtures written from the vendors' public API references
(tests/fixtures/<vendor>/): requests, whole responses, SSE streams and error bodies, both directions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from kaiyuan.context import RequestContext
from kaiyuan.dialects import anthropic as anth
from kaiyuan.dialects import gemini as gem
from kaiyuan.dialects import openai_chat as oc
from kaiyuan.dialects.streams import AnthropicToOpenAI, GeminiToOpenAI, OpenAIToAnthropic
from kaiyuan.errors import ErrorKind, GatewayError, invalid
from kaiyuan.server.translate import usage_into_ctx

FIX = Path(__file__).parent / "fixtures"


def load(name: str) -> Any:
    return orjson.loads((FIX / name).read_bytes())


def sse_objects(name: str) -> list[dict[str, Any]]:
    """The data objects of an SSE fixture, checking its framing on the way."""
    raw = (FIX / name).read_bytes().replace(b"\r\n", b"\n")
    assert raw.endswith(b"\n")  # docs code blocks sometimes stop right after the last event's data line
    out = []
    for ev in raw.strip().split(b"\n\n"):
        lines = ev.split(b"\n")
        data = [ln[6:] for ln in lines if ln.startswith(b"data: ")]
        named = [ln[7:].decode() for ln in lines if ln.startswith(b"event: ")]
        assert len(data) == 1
        if data[0] == b"[DONE]":
            continue
        obj = orjson.loads(data[0])
        if named:
            assert obj["type"] == named[0]  # Anthropic: the event name matches the data's type
        out.append(obj)
    return out


def parse_anthropic_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for ev in raw.strip().split(b"\n\n"):
        name, data = ev.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        obj = orjson.loads(data[6:])
        assert obj["type"] == name[7:].decode()
        out.append((name[7:].decode(), obj))
    return out


def accumulate_openai(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What the openai SDK would build from the chunks."""
    msg: dict[str, Any] = {"content": "", "reasoning": "", "signature": "", "tool_calls": {}}
    finish, usage = None, None
    for ch in chunks:
        if ch.get("usage"):
            usage = ch["usage"]
        for c in ch["choices"]:
            d = c["delta"]
            msg["content"] += d.get("content") or ""
            msg["reasoning"] += d.get("reasoning_content") or ""
            msg["signature"] += d.get("reasoning_signature") or ""
            for tc in d.get("tool_calls") or []:
                slot = msg["tool_calls"].setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                slot["id"] = tc.get("id") or slot["id"]
                slot["name"] = (tc.get("function") or {}).get("name") or slot["name"]
                slot["arguments"] += (tc.get("function") or {}).get("arguments") or ""
            finish = c.get("finish_reason") or finish
    return {**msg, "finish": finish, "usage": usage}


def accumulate_anthropic(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """What the anthropic SDK would build from the events."""
    msg: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for name, ev in events:
        if name == "message_start":
            msg = ev["message"]
        elif name == "content_block_start":
            assert ev["index"] == len(msg["content"])
            msg["content"].append(dict(ev["content_block"]))
        elif name == "content_block_delta":
            b, d = msg["content"][ev["index"]], ev["delta"]
            if d["type"] == "text_delta":
                b["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                b["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                b["signature"] = d["signature"]
            elif d["type"] == "input_json_delta":
                partial[ev["index"]] = partial.get(ev["index"], "") + d["partial_json"]
        elif name == "content_block_stop":
            if ev["index"] in partial:
                msg["content"][ev["index"]]["input"] = orjson.loads(partial[ev["index"]] or "{}")
        elif name == "message_delta":
            msg.update(ev["delta"])
            msg["usage"].update(ev["usage"])
    assert events[-1][0] == "message_stop"
    return msg


# -- streams --------------------------------------------------------------------------------------
def test_anthropic_tool_use_stream_to_openai() -> None:
    tr = AnthropicToOpenAI("claude", include_usage=True)
    chunks = [ch for ev in sse_objects("anthropic/stream_tool_use.sse") for ch in tr.feed(ev)]
    got = accumulate_openai(chunks)
    assert got["content"] == "Okay, let's check the weather for San Francisco, CA:"
    assert got["tool_calls"] == {0: {"id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
                                     "arguments": '{"location": "San Francisco, CA", "unit": "fahrenheit"}'}}
    assert got["finish"] == "tool_calls"
    assert got["usage"] == {"prompt_tokens": 472, "completion_tokens": 89, "total_tokens": 561,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert chunks[-1]["choices"] == [] and all(c["object"] == "chat.completion.chunk" for c in chunks)
    arg_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(arg_chunks) == 9  # the start, then every non-empty partial_json as its own delta


def test_anthropic_thinking_stream_to_openai_keeps_signature() -> None:
    """The docs' extended-thinking example: no usage in message_start nor message_delta."""
    tr = AnthropicToOpenAI("claude", include_usage=False)
    chunks = [ch for ev in sse_objects("anthropic/stream_thinking.sse") for ch in tr.feed(ev)]
    got = accumulate_openai(chunks)
    assert got["reasoning"].startswith("Let me solve this step by step:\n\n1. First") and got["reasoning"].endswith("= 12,231")
    assert got["signature"] == "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds..."
    assert got["content"] == "27 * 453 = 12,231"
    assert got["finish"] == "stop" and got["usage"] is None and all("usage" not in c for c in chunks)


def test_stream_without_usage_leaves_the_cost_unknown() -> None:
    """An upstream stream that reports no usage (the docs' thinking example) must not be priced as 0 tokens:
    the request's usage stays unknown, so accounting charges the reservation instead of $0."""
    tr = AnthropicToOpenAI("claude", include_usage=True)
    for ev in sse_objects("anthropic/stream_thinking.sse"):
        tr.feed(ev)
    ctx = RequestContext(request_id="r", dialect="openai", endpoint="chat")
    usage_into_ctx(tr.usage, ctx)
    assert ctx.usage.prompt_tokens is None and ctx.usage.completion_tokens is None
    known = AnthropicToOpenAI("claude", include_usage=True)
    for ev in sse_objects("anthropic/stream_text.sse"):
        known.feed(ev)
    usage_into_ctx(known.usage, ctx)
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (25, 15)


def test_anthropic_basic_text_stream_to_openai() -> None:
    """The docs' basic streaming example, byte for byte (spaces after colons, ``"stop_sequence":null``)."""
    tr = AnthropicToOpenAI("claude", include_usage=True)
    chunks = [ch for ev in sse_objects("anthropic/stream_text.sse") for ch in tr.feed(ev)]
    got = accumulate_openai(chunks)
    assert got["content"] == "Hello!" and got["finish"] == "stop"
    assert got["usage"] == {"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40,
                            "prompt_tokens_details": {"cached_tokens": 0}}


def test_anthropic_error_event_from_docs_is_an_overloaded_error() -> None:
    tr = AnthropicToOpenAI("claude", include_usage=False)
    (ev,) = sse_objects("anthropic/stream_error.sse")
    with pytest.raises(GatewayError) as ei:
        tr.feed(ev)
    assert ei.value.kind is ErrorKind.OVERLOADED and ei.value.status == 529
    # what Kaiyuan itself writes for the same error carries the same fields
    ours = orjson.loads(anth.stream_error_event(GatewayError(ErrorKind.OVERLOADED, "Overloaded")).split(b"data: ", 1)[1])
    assert ours == ev


def test_openai_parallel_tool_stream_to_anthropic() -> None:
    tr = OpenAIToAnthropic("deepseek-chat")
    raw = b"".join(b"".join(tr.feed(ch)) for ch in sse_objects("openai/stream_parallel_tool_calls.sse")) + b"".join(tr.end())
    events = parse_anthropic_sse(raw)
    names = [n for n, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    msg = accumulate_anthropic(events)
    assert msg["content"] == [
        {"type": "tool_use", "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "name": "get_weather", "input": {"location": "Paris"}},
        {"type": "tool_use", "id": "call_ABCDEFGHIJKLMNOPQRSTUVWX", "name": "get_weather", "input": {"location": "Tokyo"}},
    ]
    assert msg["stop_reason"] == "tool_use" and msg["model"] == "deepseek-chat"
    assert msg["usage"] == {"input_tokens": 18, "cache_read_input_tokens": 64, "cache_creation_input_tokens": 0, "output_tokens": 36}


def test_deepseek_reasoner_stream_to_anthropic_thinking() -> None:
    tr = OpenAIToAnthropic("r1")
    raw = b"".join(b"".join(tr.feed(ch)) for ch in sse_objects("openai/stream_reasoner.sse")) + b"".join(tr.end())
    msg = accumulate_anthropic(parse_anthropic_sse(raw))
    assert [b["type"] for b in msg["content"]] == ["thinking", "text"]
    assert msg["content"][0]["thinking"] == "9.11 vs 9.8: compare tenths."
    assert msg["content"][1]["text"] == "9.8 is greater." and msg["stop_reason"] == "end_turn"


def test_gemini_stream_to_openai_and_anthropic() -> None:
    tr = GeminiToOpenAI("gemini", include_usage=True)
    objs = sse_objects("gemini/stream_function_call.sse")
    chunks = [ch for o in objs for ch in tr.feed(o)] + tr.end()
    got = accumulate_openai(chunks)
    assert got["content"] == "Let me check"
    assert [(t["name"], orjson.loads(t["arguments"])) for t in got["tool_calls"].values()] == [
        ("get_weather", {"location": "Paris"}), ("get_weather", {"location": "Tokyo"})]  # args not dropped
    assert all(t["id"] for t in got["tool_calls"].values())
    assert got["finish"] == "tool_calls"  # Gemini said STOP
    assert got["usage"]["completion_tokens"] == 52 and got["usage"]["completion_tokens_details"] == {"reasoning_tokens": 38}
    ta = OpenAIToAnthropic("gemini")
    raw = b"".join(b"".join(ta.feed(c)) for c in chunks) + b"".join(ta.end())
    msg = accumulate_anthropic(parse_anthropic_sse(raw))
    assert [b["type"] for b in msg["content"]] == ["text", "tool_use", "tool_use"] and msg["stop_reason"] == "tool_use"


# -- whole responses --------------------------------------------------------------------------------
def test_anthropic_message_to_openai_and_back() -> None:
    src = load("anthropic/message_tool_use.json")
    r = anth.response_to_canonical(src)
    out = oc.response_from_canonical(r, "claude")
    msg = out["choices"][0]["message"]
    assert msg["content"] == "I'll check the current weather in San Francisco for you."
    assert msg["tool_calls"] == [{"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"location":"San Francisco, CA","unit":"celsius"}'}}]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"]["prompt_tokens"] == 384 and out["usage"]["completion_tokens"] == 92
    back = anth.response_from_canonical(oc.response_to_canonical(out), "claude-sonnet-4-5")
    assert back["content"] == src["content"] and back["stop_reason"] == "tool_use" and back["usage"] == src["usage"]


def test_openai_response_to_anthropic() -> None:
    out = anth.response_from_canonical(oc.response_to_canonical(load("openai/chat_tool_calls.json")), "m")
    assert out["content"] == [{"type": "tool_use", "id": "call_abc123", "name": "get_current_weather",
                               "input": {"location": "Boston, MA"}}]
    assert out["stop_reason"] == "tool_use" and out["type"] == "message" and out["id"].startswith("msg_")
    assert out["usage"] == {"input_tokens": 82, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 17}


def test_gemini_response_to_openai() -> None:
    out = oc.response_from_canonical(gem.response_to_canonical(load("gemini/generate_function_call.json")), "gemini")
    msg = out["choices"][0]["message"]
    assert msg["reasoning_content"] == "**Weighing the call**" and msg["content"] is None
    call = msg["tool_calls"][0]
    assert call["function"]["name"] == "schedule_meeting"
    assert orjson.loads(call["function"]["arguments"]) == {"attendees": ["Bob", "Alice"], "date": "2025-03-27",
                                                           "time": "10:00", "topic": "Q3 planning"}
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"] == {"prompt_tokens": 108, "completion_tokens": 82, "total_tokens": 190,
                            "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 45}}


# -- requests -----------------------------------------------------------------------------------------
def test_anthropic_request_to_openai() -> None:
    src = load("anthropic/request_tools.json")
    anth.validate(src)
    out = oc.request_from_canonical(anth.request_to_canonical(src), "deepseek-chat")
    assert out == {
        "model": "deepseek-chat",
        "messages": [
            {"role": "system", "content": "You are a weather assistant."},
            {"role": "user", "content": "What's the weather like in San Francisco?"},
            {"role": "assistant", "content": "I'll check the current weather in San Francisco for you.", "tool_calls": [
                {"id": "toolu_01A09q90qw90lq917835lq9", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"location":"San Francisco, CA","unit":"celsius"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "max_tokens": 1024, "temperature": 0.7, "user": "13803d75-b4b5-4c3e-b2a2-6f21399b021b", "stop": ["\n\nHuman:"],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a given location",
                                                    "parameters": src["tools"][0]["input_schema"]}}],
        "tool_choice": "auto", "parallel_tool_calls": False,
    }


def test_openai_request_to_anthropic_and_gemini() -> None:
    src = load("openai/request_tools.json")
    canon = oc.request_to_canonical(src)
    a = anth.request_from_canonical(canon, "claude-sonnet-4-5", 4096)
    assert a["system"] == "You are a helpful assistant.\n\nRespond with a single JSON object and nothing else."
    assert a["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "What's the weather like in Boston today? See the photo."},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQSkZJRg=="}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_abc123", "name": "get_current_weather",
                                           "input": {"location": "Boston, MA"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_abc123",
                                      "content": '{"temperature": 22, "unit": "celsius"}'}]},
    ]
    assert a["tools"][0]["input_schema"] == src["tools"][0]["function"]["parameters"]
    assert (a["max_tokens"], a["temperature"], a["stop_sequences"], a["tool_choice"]) == (256, 0.2, ["\n\n"], {"type": "auto"})
    g = gem.request_from_canonical(canon)
    assert g["contents"][1] == {"role": "model", "parts": [{"functionCall": {"name": "get_current_weather", "args": {"location": "Boston, MA"}},
                                                            "thoughtSignature": gem.FOREIGN_SIGNATURE}]}  # not Gemini's call
    assert g["contents"][2] == {"role": "user", "parts": [{"functionResponse": {
        "name": "get_current_weather", "response": {"temperature": 22, "unit": "celsius"}}}]}
    assert g["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQSkZJRg=="}}
    assert g["generationConfig"] == {"temperature": 0.2, "maxOutputTokens": 256, "stopSequences": ["\n\n"],
                                     "responseMimeType": "application/json"}
    assert g["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}


# -- error bodies ---------------------------------------------------------------------------------------
def test_anthropic_error_bodies_byte_for_byte() -> None:
    assert anth.error_body(GatewayError(ErrorKind.OVERLOADED, "Overloaded")) == (FIX / "anthropic/error_overloaded.json").read_bytes()
    err = invalid("messages: at least one message is required")
    assert anth.error_body(err) == (FIX / "anthropic/error_invalid_request.json").read_bytes()
    assert anth.stream_error_event(GatewayError(ErrorKind.OVERLOADED, "Overloaded")) == (
        b"event: error\ndata: " + (FIX / "anthropic/error_overloaded.json").read_bytes() + b"\n\n")


def test_gemini_error_body_keeps_status() -> None:
    e = gem.error_from_body(load("gemini/error_429.json"), 429)
    assert e.status == 429 and e.kind is ErrorKind.RATE_LIMITED and "Resource has been exhausted" in e.message


@pytest.mark.parametrize(("kind", "etype"), [(ErrorKind.RATE_LIMITED, "rate_limit_error"), (ErrorKind.AUTHENTICATION, "authentication_error"),
                                             (ErrorKind.PERMISSION, "permission_error"), (ErrorKind.NOT_FOUND, "not_found_error"),
                                             (ErrorKind.UPSTREAM_ERROR, "api_error"), (ErrorKind.REQUEST_TOO_LARGE, "request_too_large")])
def test_anthropic_error_types(kind: ErrorKind, etype: str) -> None:
    assert orjson.loads(anth.error_body(GatewayError(kind, "m")))["error"]["type"] == etype


def test_tool_calls_with_finish_stop_still_end_in_tool_use() -> None:
    """Some OpenAI-compatible servers say "stop" after calling a tool; Anthropic callers must see tool_use."""
    src = load("openai/chat_tool_calls.json")
    src["choices"][0]["finish_reason"] = "stop"
    assert anth.response_from_canonical(oc.response_to_canonical(src), "m")["stop_reason"] == "tool_use"
    tr = OpenAIToAnthropic("m")
    chunks = sse_objects("openai/stream_parallel_tool_calls.sse")
    for ch in chunks:
        for c in ch["choices"]:
            if c["finish_reason"]:
                c["finish_reason"] = "stop"
    raw = b"".join(b"".join(tr.feed(ch)) for ch in chunks) + b"".join(tr.end())
    assert accumulate_anthropic(parse_anthropic_sse(raw))["stop_reason"] == "tool_use"


def test_tool_choice_none_without_tools_is_not_sent_to_openai() -> None:
    body = {"model": "m", "max_tokens": 5, "tool_choice": {"type": "none"}, "messages": [{"role": "user", "content": "x"}]}
    assert "tool_choice" not in oc.request_from_canonical(anth.request_to_canonical(body), "m")


def test_anthropic_message_delta_usage_is_cumulative_not_added() -> None:
    """Anthropic's message_delta usage is cumulative and, on the current API, repeats input_tokens and the
    cache counts; the stream carries extra fields (service_tier, cache_creation, a tool_use ``caller``)."""
    tr = AnthropicToOpenAI("claude", include_usage=True)
    chunks = [ch for ev in sse_objects("anthropic/stream_cumulative_usage.sse") for ch in tr.feed(ev)]
    got = accumulate_openai(chunks)
    assert got["content"] == "Checking Paris."
    assert got["tool_calls"] == {0: {"id": "toolu_01WireCumulativeUsage01", "name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert got["finish"] == "tool_calls"
    assert got["usage"] == {"prompt_tokens": 35, "completion_tokens": 30, "total_tokens": 65,
                            "prompt_tokens_details": {"cached_tokens": 10}}


def test_openai_reference_stream_to_anthropic() -> None:
    """The API reference's chunk objects (spaces and all), as an Anthropic caller sees them."""
    tr = OpenAIToAnthropic("gpt-4o-mini")
    raw = b"".join(b"".join(tr.feed(ch)) for ch in sse_objects("openai/stream_text.sse")) + b"".join(tr.end())
    events = parse_anthropic_sse(raw)
    assert [n for n, _ in events][:2] == ["message_start", "ping"]
    msg = accumulate_anthropic(events)
    assert msg["content"] == [{"type": "text", "text": "Hello"}] and msg["stop_reason"] == "end_turn"


def test_fake_openai_chunks_have_the_reference_fields() -> None:
    """The fake upstream's chunks carry exactly the fields (and key order) of the reference's chunk objects."""
    ref = sse_objects("openai/stream_text.sse")
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from kaiyuan.testing.fake_openai import FakeOpenAI

    async def fetch() -> list[dict[str, Any]]:
        fake = FakeOpenAI()
        async with TestClient(TestServer(fake.app)) as cl:
            r = await cl.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "stream": True,
                                                            "messages": [{"role": "user", "content": "Hello"}]})
            body = await r.read()
        return [orjson.loads(x[6:]) for x in body.split(b"\n\n") if x.startswith(b"data: {")]

    got = asyncio.run(fetch())
    assert [list(c) for c in got] == [list(ref[0])] * len(got)
    assert [list(c["choices"][0]) for c in got] == [list(ref[0]["choices"][0])] * len(got)
    assert got[0]["choices"][0]["delta"]["role"] == "assistant" and got[-1]["choices"][0]["delta"] == {}


def test_gemini_parallel_calls_signature_only_on_the_first_and_sent_back_exactly() -> None:
    """Gemini's thought-signature docs: with parallel calls only the first functionCall carries the
    signature, and it must come back exactly as received (here a placeholder that is not base64)."""
    out = oc.response_from_canonical(gem.response_to_canonical(load("gemini/generate_parallel_signature.json")), "gemini")
    msg = out["choices"][0]["message"]
    assert [orjson.loads(t["function"]["arguments"]) for t in msg["tool_calls"]] == [{"location": "Paris"}, {"location": "London"}]
    assert out["choices"][0]["finish_reason"] == "tool_calls"  # no finishReason at all: still a tool turn
    history = {"model": "gemini", "messages": [
        {"role": "user", "content": "Check the weather in Paris and London."}, msg,
        {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": '{"temp": "15C"}'},
        {"role": "tool", "tool_call_id": msg["tool_calls"][1]["id"], "content": '{"temp": "12C"}'}]}
    g = gem.request_from_canonical(oc.request_to_canonical(history))
    assert g["contents"][1]["parts"] == [
        {"functionCall": {"name": "get_current_temperature", "args": {"location": "Paris"}}, "thoughtSignature": "<Signature_A>"},
        {"functionCall": {"name": "get_current_temperature", "args": {"location": "London"}}}]
    assert g["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_current_temperature", "response": {"temp": "15C"}}},
        {"functionResponse": {"name": "get_current_temperature", "response": {"temp": "12C"}}}]


@pytest.mark.parametrize("sig", ["CiQB0e2Kb+abc/x==", "Ab-_c", "context_engineering_is_the_way_to_go", "<Signature_A>", "a b=="])
def test_any_thought_signature_survives_the_call_id(sig: str) -> None:
    cid = gem.call_id_with_signature("call_1", sig)
    assert gem.signature_of(cid) == sig and cid.startswith("call_1")
    assert all(ch.isalnum() or ch in "_-" for ch in cid)  # still a valid Anthropic tool_use id


def test_foreign_function_calls_get_geminis_documented_stand_in_signature() -> None:
    """History Gemini did not produce (another upstream's calls) would be a 400 on Gemini 3 without a signature."""
    history = {"model": "m", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "call_b", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "1"}, {"role": "tool", "tool_call_id": "call_b", "content": "2"}]}
    parts = gem.request_from_canonical(oc.request_to_canonical(history))["contents"][1]["parts"]
    assert [p.get("thoughtSignature") for p in parts] == [gem.FOREIGN_SIGNATURE, None]


def test_fake_gemini_enforces_signatures_like_gemini_3() -> None:
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from kaiyuan.testing.fake_gemini import FakeGemini

    def body(sig: str | None) -> dict[str, Any]:
        call: dict[str, Any] = {"functionCall": {"name": "f", "args": {}}}
        if sig:
            call["thoughtSignature"] = sig
        return {"contents": [{"role": "user", "parts": [{"text": "x"}]}, {"role": "model", "parts": [call]},
                             {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"r": 1}}}]}]}

    async def statuses() -> list[int]:
        async with TestClient(TestServer(FakeGemini().app)) as cl:
            out = []
            for sig in (None, gem.FOREIGN_SIGNATURE):
                r = await cl.post("/v1beta/models/g:generateContent", json=body(sig))
                out.append(r.status)
            return out

    assert asyncio.run(statuses()) == [400, 200]


def test_gemini_cookbook_stream_every_chunk_says_stop_and_no_usage() -> None:
    """Google's recorded streamGenerateContent?alt=sse output: finishReason STOP on every chunk, safety
    ratings, promptFeedback on the first, and no usageMetadata at all."""
    tr = GeminiToOpenAI("gemini", include_usage=True)
    chunks = [ch for o in sse_objects("gemini/stream_cookbook_text.sse") for ch in tr.feed(o)] + tr.end()
    got = accumulate_openai(chunks)
    assert got["content"].startswith("In the quaint, sunlit cottage") and got["content"].endswith("stronger than ever.")
    assert "\"冒险伙伴\" (Adventure Buddies)" in got["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == ["stop"]
    ctx = RequestContext(request_id="r", dialect="openai", endpoint="chat")
    usage_into_ctx(tr.usage, ctx)
    assert ctx.usage.prompt_tokens is None  # unknown, not 0 tokens
