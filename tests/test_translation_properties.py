"""Property tests: OpenAI -> canonical -> OpenAI and Anthropic -> canonical -> Anthropic lose nothing that
both dialects can express (requests, whole responses, and streams through the translators)."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaiyuan.dialects import anthropic as anth
from kaiyuan.dialects import openai_chat as oc
from kaiyuan.dialects.streams import AnthropicToOpenAI, OpenAIToAnthropic

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
text = st.text(min_size=1, max_size=20)
name = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
ids = st.from_regex(r"[a-zA-Z0-9]{4,12}", fullmatch=True)
json_scalar = st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.none(), text)
json_obj = st.dictionaries(name, st.one_of(json_scalar, st.lists(json_scalar, max_size=3)), max_size=4)
schema = st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(name, st.just({"type": "string"}), max_size=3)})
b64 = st.from_regex(r"[A-Za-z0-9+/]{4,16}={0,2}", fullmatch=True)
num = st.floats(0, 2, allow_nan=False).map(lambda f: round(f, 3))


# -- OpenAI ------------------------------------------------------------------------------------------
@st.composite
def openai_turns(draw: Any) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(text)})
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            content: Any = draw(text)
        else:
            img = draw(st.one_of(b64.map(lambda d: "data:image/png;base64," + d),
                                 name.map(lambda n: f"https://img.example/{n}.png")))
            content = [{"type": "text", "text": draw(text)}, {"type": "image_url", "image_url": {"url": img}}]
        msgs.append({"role": "user", "content": content})
        calls = [{"id": "call_" + draw(ids) + str(i), "type": "function",
                  "function": {"name": draw(name), "arguments": orjson.dumps(draw(json_obj)).decode()}}
                 for i in range(draw(st.integers(0, 3)))]
        a: dict[str, Any] = {"role": "assistant", "content": draw(text) if not calls or draw(st.booleans()) else None}
        if draw(st.booleans()):
            a["reasoning_content"] = draw(text)
        if calls:
            a["tool_calls"] = calls
        msgs.append(a)
        msgs += [{"role": "tool", "tool_call_id": c["id"], "content": draw(text)} for c in calls]
    return msgs


@st.composite
def openai_requests(draw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": draw(openai_turns())}
    for key, strat in (("max_tokens", st.integers(1, 4096)), ("temperature", num), ("top_p", num),
                       ("stop", st.lists(text, min_size=1, max_size=3)), ("user", text), ("seed", st.integers(0, 99)),
                       ("presence_penalty", num), ("frequency_penalty", num), ("top_k", st.integers(1, 50)),
                       ("response_format", st.sampled_from([{"type": "json_object"},
                                                            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}]))):
        if draw(st.booleans()):
            body[key] = draw(strat)
    if draw(st.booleans()):
        tools = draw(st.lists(st.tuples(name, st.one_of(st.none(), text), schema), min_size=1, max_size=3))
        body["tools"] = [{"type": "function", "function": {"name": n, **({"description": d} if d else {}), "parameters": s}}
                         for n, d, s in tools]
        body["tool_choice"] = draw(st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": tools[0][0]}}]))
        if draw(st.booleans()):
            body["parallel_tool_calls"] = draw(st.booleans())
    if draw(st.booleans()):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


@SETTINGS
@given(openai_requests())
def test_openai_request_round_trip(body: dict[str, Any]) -> None:
    assert oc.request_from_canonical(oc.request_to_canonical(body), "m") == body


@SETTINGS
@given(st.lists(st.tuples(name, st.lists(text, max_size=3)), max_size=3), st.one_of(st.none(), text),
       st.sampled_from(["stop", "length", "tool_calls", "content_filter"]), st.integers(0, 999), st.integers(0, 999))
def test_openai_response_round_trip(calls: list, content: str | None, finish: str, p: int, c: int) -> None:
    msg: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None, "refusal": None}
    if calls:
        msg["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": orjson.dumps(a).decode()}}
                             for i, (n, a) in enumerate(calls)]
        finish = "tool_calls" if finish == "stop" else finish
    if content is None and not calls:
        msg["content"] = ""
    src = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
           "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}
    out = oc.response_from_canonical(oc.response_to_canonical(src), "m")
    out["created"] = 1
    assert out == src


# -- Anthropic ------------------------------------------------------------------------------------
@st.composite
def anthropic_requests(draw: Any) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = []
    pending: list[str] = []
    for turn in range(draw(st.integers(1, 4))):
        user: list[dict[str, Any]] = []
        for tid in pending:
            r: dict[str, Any] = {"type": "tool_result", "tool_use_id": tid, "content": draw(text)}
            if draw(st.booleans()):
                r["is_error"] = True
            user.append(r)
        if not pending or draw(st.booleans()):
            user.append({"type": "text", "text": draw(text)})
        if draw(st.booleans()):
            src = draw(st.one_of(
                b64.map(lambda d: {"type": "base64", "media_type": "image/png", "data": d}),
                name.map(lambda n: {"type": "url", "url": f"https://img.example/{n}.jpg"})))
            user.append({"type": "image", "source": src})
        msgs.append({"role": "user", "content": user})
        if turn == 3 and draw(st.booleans()):
            break
        blocks: list[dict[str, Any]] = []
        if draw(st.booleans()):
            blocks.append({"type": "thinking", "thinking": draw(text), "signature": "sig" + draw(ids)})
        if draw(st.booleans()):
            blocks.append({"type": "text", "text": draw(text)})
        pending = []
        for i in range(draw(st.integers(0 if blocks else 1, 3))):
            tid = f"toolu_{draw(ids)}{i}"
            pending.append(tid)
            blocks.append({"type": "tool_use", "id": tid, "name": draw(name), "input": draw(json_obj)})
        msgs.append({"role": "assistant", "content": blocks})
    if msgs[-1]["role"] == "assistant" and pending:
        msgs.pop()
    body: dict[str, Any] = {"model": "m", "max_tokens": draw(st.integers(1, 8192)), "messages": msgs}
    for key, strat in (("system", text), ("temperature", num), ("top_p", num), ("top_k", st.integers(1, 50)),
                       ("stop_sequences", st.lists(text, min_size=1, max_size=3)),
                       ("metadata", text.map(lambda u: {"user_id": u})),
                       ("thinking", st.one_of(st.integers(1024, 9000).map(lambda b: {"type": "enabled", "budget_tokens": b}),
                                              st.just({"type": "disabled"}))),
                       ("output_config", schema.map(lambda s: {"format": {"type": "json_schema", "schema": s}})),
                       ("stream", st.just(True))):
        if draw(st.booleans()):
            body[key] = draw(strat)
    if draw(st.booleans()):
        tools = draw(st.lists(st.tuples(name, st.one_of(st.none(), text), schema), min_size=1, max_size=3))
        body["tools"] = [{"name": n, **({"description": d} if d else {}), "input_schema": s} for n, d, s in tools]
        choice: dict[str, Any] = draw(st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                                       {"type": "tool", "name": tools[0][0]}]))
        if choice["type"] != "none" and draw(st.booleans()):
            choice = {**choice, "disable_parallel_tool_use": True}
        if draw(st.booleans()):
            body["tool_choice"] = choice
    return body


@SETTINGS
@given(anthropic_requests())
def test_anthropic_request_round_trip(body: dict[str, Any]) -> None:
    anth.validate(body)
    assert anth.request_from_canonical(anth.request_to_canonical(body), "m", 4096) == body


@st.composite
def anthropic_messages(draw: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if draw(st.booleans()):
        content.append({"type": "thinking", "thinking": draw(text), "signature": "sig" + draw(ids)})
    if draw(st.booleans()):
        content.append({"type": "text", "text": draw(text)})
    calls = draw(st.integers(0, 3))
    content += [{"type": "tool_use", "id": f"toolu_{i}{draw(ids)}", "name": draw(name), "input": draw(json_obj)} for i in range(calls)]
    stop = "tool_use" if calls else draw(st.sampled_from(["end_turn", "max_tokens", "stop_sequence", "refusal"]))
    inp, read = draw(st.integers(0, 999)), draw(st.integers(0, 99))
    return {"id": "msg_" + draw(ids), "type": "message", "role": "assistant", "model": "m", "content": content,
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": inp, "cache_creation_input_tokens": 0, "cache_read_input_tokens": read,
                      "output_tokens": draw(st.integers(0, 999))}}


@SETTINGS
@given(anthropic_messages())
def test_anthropic_response_round_trip(msg: dict[str, Any]) -> None:
    assert anth.response_from_canonical(anth.response_to_canonical(msg), "m") == msg


def _events(msg: dict[str, Any], cut: int) -> list[dict[str, Any]]:
    """``msg`` as the Anthropic stream would carry it, text and JSON cut in ``cut``-sized pieces."""
    start = {**msg, "content": [], "stop_reason": None, "usage": {**msg["usage"], "output_tokens": 1}}
    evs: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for i, b in enumerate(msg["content"]):
        if b["type"] == "text":
            first, pieces, dk, key = {"type": "text", "text": ""}, b["text"], "text_delta", "text"
        elif b["type"] == "thinking":
            first, pieces, dk, key = {"type": "thinking", "thinking": "", "signature": ""}, b["thinking"], "thinking_delta", "thinking"
        else:
            first, pieces, dk, key = {**b, "input": {}}, orjson.dumps(b["input"]).decode(), "input_json_delta", "partial_json"
        evs.append({"type": "content_block_start", "index": i, "content_block": first})
        evs += [{"type": "content_block_delta", "index": i, "delta": {"type": dk, key: pieces[j:j + cut]}}
                for j in range(0, len(pieces), cut)]
        if b["type"] == "thinking":
            evs.append({"type": "content_block_delta", "index": i, "delta": {"type": "signature_delta", "signature": b["signature"]}})
        evs.append({"type": "content_block_stop", "index": i})
    evs.append({"type": "message_delta", "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": msg["usage"]["output_tokens"]}})
    evs.append({"type": "message_stop"})
    return evs


@SETTINGS
@given(anthropic_messages(), st.integers(1, 7))
def test_anthropic_stream_round_trip_through_openai_chunks(msg: dict[str, Any], cut: int) -> None:
    """Anthropic events -> OpenAI chunks -> Anthropic events rebuild the same message."""
    if msg["stop_reason"] in ("stop_sequence", "refusal"):
        msg["stop_reason"] = "end_turn"  # OpenAI's finish_reason cannot tell these apart from "stop"/filtering
    to_oai = AnthropicToOpenAI("m", include_usage=True)
    back = OpenAIToAnthropic("m")
    raw = b""
    for ev in _events(msg, cut):
        for ch in to_oai.feed(ev):
            raw += b"".join(back.feed(ch))
    raw += b"".join(back.end())
    from tests.test_translation_golden import accumulate_anthropic, parse_anthropic_sse

    got = accumulate_anthropic(parse_anthropic_sse(raw))
    for b in got["content"]:
        b.pop("signature", None) if b["type"] == "thinking" and not b.get("signature") else None
    assert got["content"] == msg["content"]
    assert got["stop_reason"] == msg["stop_reason"]
    assert got["usage"] == msg["usage"]


def test_the_translators_read_a_chunk_once_and_alike() -> None:
    """``openai_chat.read_chunk``: the one reading of a chat chunk the stream translators share."""
    u = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    usage, delta, reasoning, finish = oc.read_chunk({"choices": [], "usage": u})
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (3, 2)
    assert (delta, reasoning, finish) == (None, None, None)
    both = {"reasoning_content": "deepseek", "reasoning": "vllm", "content": "x"}
    chunk = {"choices": [{"index": 1, "delta": {"content": "other"}}, {"index": 0, "delta": both, "finish_reason": "stop"}]}
    assert oc.read_chunk(chunk) == (None, both, "deepseek", "stop")  # choice 0 wherever it is; DeepSeek's field first
    assert oc.read_chunk({"choices": [{"delta": {"reasoning": "vllm"}}]})[2] == "vllm"  # no index: choice 0
    for odd in ("", None, 5, ["x"]):
        assert oc.read_chunk({"choices": [{"index": 0, "delta": {"reasoning_content": odd}}]})[2] is None
    assert oc.read_chunk({"choices": [{"index": 0, "delta": None}]})[1] == {}
    assert oc.read_chunk({"usage": None})[0] is None
