"""/v1/messages driven by the official anthropic SDK, to the fake OpenAI-compatible (DeepSeek-style) upstream."""

from __future__ import annotations

import urllib.error
import urllib.request

import anthropic
import orjson
import pytest

from kaiyuan.testing.fake_openai import Behaviour, FakeOpenAI
from kaiyuan.testing.harness import RunningGateway

TOOLS = [{"name": "search", "description": "search the web",
          "input_schema": {"type": "object", "properties": {"query": {"type": "string"}, "n": {"type": "integer"}}}},
         {"name": "lookup", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]


def post(url: str, body: dict) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def client(gw: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)


def test_messages_non_streaming(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    r = client(gateway).messages.create(
        model="fake-chat", max_tokens=50, system="be brief", extra_body={"temperature": 0.3}, stop_sequences=["END"],
        metadata={"user_id": "u-1"}, messages=[{"role": "user", "content": "hello there"}],
    )
    assert r.type == "message" and r.role == "assistant" and r.model == "fake-chat"
    assert r.content[0].type == "text" and r.content[0].text == "echo: hello there"
    assert r.stop_reason == "end_turn"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    sent = fake_openai.requests[-1]
    assert sent["model"] == "upstream-chat"
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.3 and sent["stop"] == ["END"] and sent["user"] == "u-1"
    rows = gateway.log_rows()
    assert rows[-1]["status"] == 200 and rows[-1]["prompt_tokens"]


def test_messages_streaming_text(gateway: RunningGateway) -> None:
    with client(gateway).messages.stream(model="fake-chat", max_tokens=50,
                                         messages=[{"role": "user", "content": "one two three"}]) as s:
        events = [e.type for e in s]
        final = s.get_final_message()
    assert "".join(b.text for b in final.content if b.type == "text") == "echo: one two three"
    assert events[0] == "message_start" and "content_block_start" in events and "content_block_stop" in events
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0 and final.usage.input_tokens > 0


def test_raw_stream_event_sequence(gateway: RunningGateway) -> None:
    body = {"model": "fake-chat", "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    status, headers, text = post(gateway.url + "/v1/messages", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    names = [ln[7:] for ln in text.split("\n") if ln.startswith("event: ")]
    assert names[0] == "message_start" and "ping" in names
    assert names[-2:] == ["message_delta", "message_stop"]
    for block in text.strip().split("\n\n"):  # every event is `event: x\ndata: {...}` with a matching type
        ev, data = block.split("\n")
        assert orjson.loads(data[6:])["type"] == ev[7:]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_and_multi_turn_loop(gateway: RunningGateway, fake_openai: FakeOpenAI, stream: bool) -> None:
    c = client(gateway)
    msgs: list = [{"role": "user", "content": "weather in Paris"}]
    if stream:
        with c.messages.stream(model="fake-chat", max_tokens=100, tools=TOOLS, messages=msgs) as s:
            r = s.get_final_message()
    else:
        r = c.messages.create(model="fake-chat", max_tokens=100, tools=TOOLS, messages=msgs)
    assert r.stop_reason == "tool_use"  # not end_turn
    uses = [b for b in r.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "search" and uses[0].input == {"query": "weather in Paris", "n": 0}
    sent = fake_openai.requests[-1]
    assert sent["tools"][0]["function"]["parameters"] == TOOLS[0]["input_schema"]
    msgs += [{"role": "assistant", "content": r.content},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"}]}]
    r2 = c.messages.create(model="fake-chat", max_tokens=100, tools=TOOLS, messages=msgs)
    assert r2.stop_reason == "end_turn" and r2.content[0].text == "tool said: sunny"
    sent = fake_openai.requests[-1]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == uses[0].id
    assert sent[2] == {"role": "tool", "tool_call_id": uses[0].id, "content": "sunny"}


def test_parallel_tool_calls_streamed(gateway: RunningGateway) -> None:
    with client(gateway).messages.stream(model="fake-chat", max_tokens=100, tools=TOOLS,
                                         messages=[{"role": "user", "content": "do parallel lookups"}]) as s:
        deltas = [e for e in s if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
        r = s.get_final_message()
    uses = [b for b in r.content if b.type == "tool_use"]
    assert [u.name for u in uses] == ["search", "lookup"]
    assert [u.input for u in uses] == [{"query": "do parallel lookups", "n": 0}, {"query": "do parallel lookups", "n": 1}]
    assert len(deltas) > 2  # arguments arrived in pieces, not lost
    assert r.stop_reason == "tool_use"


def test_tool_choice_and_disable_parallel(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    client(gateway).messages.create(model="fake-chat", max_tokens=10, tools=TOOLS,
                                    tool_choice={"type": "tool", "name": "lookup", "disable_parallel_tool_use": True},
                                    messages=[{"role": "user", "content": "x"}])
    sent = fake_openai.requests[-1]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert sent["parallel_tool_calls"] is False
    client(gateway).messages.create(model="fake-chat", max_tokens=10, tools=TOOLS, tool_choice={"type": "any"},
                                    messages=[{"role": "user", "content": "x"}])
    assert fake_openai.requests[-1]["tool_choice"] == "required"


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_round_trip_with_deepseek_reasoner(gateway: RunningGateway, fake_openai: FakeOpenAI, stream: bool) -> None:
    """reasoning_content -> thinking block, and back on the next turn (DeepSeek 400s without it)."""
    c = client(gateway)
    msgs: list = [{"role": "user", "content": "plan a trip"}]
    kw = {"model": "deepseek-reasoner", "max_tokens": 200, "tools": TOOLS,
          "thinking": {"type": "enabled", "budget_tokens": 1024}}
    if stream:
        with c.messages.stream(messages=msgs, **kw) as s:
            r = s.get_final_message()
    else:
        r = c.messages.create(messages=msgs, **kw)
    assert r.content[0].type == "thinking" and r.content[0].thinking.strip() == "thinking about: plan a trip"
    assert r.content[1].type == "tool_use" and r.stop_reason == "tool_use"
    msgs += [{"role": "assistant", "content": r.content},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": r.content[1].id, "content": "ok"}]}]
    r2 = c.messages.create(messages=msgs, **kw)
    assert [b.type for b in r2.content] == ["thinking", "text"] and r2.content[1].text == "tool said: ok"
    assert fake_openai.requests[-1]["messages"][1]["reasoning_content"].strip() == "thinking about: plan a trip"


def test_images_base64_and_url(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    client(gateway).messages.create(model="fake-chat", max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "what is this"}]}])
    parts = fake_openai.requests[-1]["messages"][0]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    assert parts[1] == {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
    assert parts[2] == {"type": "text", "text": "what is this"}


def test_max_tokens_stop_reason(gateway: RunningGateway) -> None:
    r = client(gateway).messages.create(model="fake-chat", max_tokens=2,
                                        messages=[{"role": "user", "content": "a b c d e f"}])
    assert r.stop_reason == "max_tokens"


def test_count_tokens(gateway: RunningGateway) -> None:
    r = client(gateway).messages.count_tokens(model="fake-chat", messages=[{"role": "user", "content": "hello world " * 20}])
    assert 40 <= r.input_tokens <= 60
    with pytest.raises(anthropic.BadRequestError):
        client(gateway).messages.count_tokens(model="fake-chat", messages=[])


@pytest.mark.parametrize(("messages", "needle"), [
    ([], "at least one message"),
    ([{"role": "user", "content": [{"type": "hologram", "data": "x"}]}], "unknown content block type 'hologram'"),
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}]}],
     "corresponding `tool_use` block"),
    ([{"role": "assistant", "content": "hi"}], "first message must use the 'user' role"),
    ([{"role": "system", "content": "hi"}], "top-level 'system'"),
    ([{"role": "user", "content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"}}]}],
     "document blocks cannot be translated"),
])
def test_bad_input_is_a_clear_anthropic_400(gateway: RunningGateway, messages: list, needle: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as ei:
        client(gateway).messages.create(model="fake-chat", max_tokens=10, messages=messages)
    body = ei.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert needle in body["error"]["message"]


def test_missing_max_tokens_and_unknown_model(gateway: RunningGateway) -> None:
    status, _, text = post(gateway.url + "/v1/messages", {"model": "fake-chat", "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and "max_tokens" in orjson.loads(text)["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as ei:
        client(gateway).messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


@pytest.mark.parametrize(("status", "exc", "etype"), [
    (529, anthropic.InternalServerError, "overloaded_error"),
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (400, anthropic.BadRequestError, "invalid_request_error"),
])
def test_upstream_errors_in_anthropic_shape(gateway: RunningGateway, fake_openai: FakeOpenAI, status: int, exc: type, etype: str) -> None:
    fake_openai.default = Behaviour(status=status, error_message="nope")  # persistent: retries must not hide it
    with pytest.raises(exc) as ei:
        client(gateway).messages.create(model="fake-chat", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == status
    assert ei.value.body["type"] == "error" and ei.value.body["error"]["type"] == etype


def test_broken_upstream_stream_ends_with_error_event(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    fake_openai.next(Behaviour(omit_done=True))
    with pytest.raises(anthropic.APIStatusError), client(gateway).messages.stream(
            model="fake-chat", max_tokens=10, messages=[{"role": "user", "content": "x y"}]) as s:
        for _ in s:
            pass


def test_auth_with_x_api_key(make_gateway, fake_openai: FakeOpenAI) -> None:
    from tests.conftest import openai_model

    gw = make_gateway({"server": {"master_key": "sk-master"}, "models": [openai_model("fake-chat", fake_openai.url)]})
    with pytest.raises(anthropic.AuthenticationError) as ei:
        anthropic.Anthropic(base_url=gw.url, api_key="wrong", max_retries=0).messages.create(
            model="fake-chat", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["error"]["type"] == "authentication_error"
    r = anthropic.Anthropic(base_url=gw.url, api_key="sk-master", max_retries=0).messages.create(
        model="fake-chat", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert r.content[0].text == "echo: x"


def test_client_disconnect_cancels_upstream(gateway: RunningGateway, fake_openai: FakeOpenAI) -> None:
    import time

    fake_openai.next(Behaviour(chunk_delay=0.2))
    with client(gateway).messages.stream(model="fake-chat", max_tokens=100,
                                         messages=[{"role": "user", "content": " ".join(["w"] * 12)}]) as s:
        for ev in s:
            if ev.type == "content_block_delta":
                break  # leave mid-stream; closing the stream drops the connection
    for _ in range(100):  # bounded wait for the gateway to notice and cancel the upstream call
        if fake_openai.cancelled:
            break
        time.sleep(0.05)
    assert fake_openai.cancelled == 1
    for _ in range(100):
        rows = [r for r in gateway.log_rows() if r["dialect"] == "anthropic"]
        if rows and rows[-1]["cancelled"]:
            break
        time.sleep(0.05)
    assert rows[-1]["cancelled"] and rows[-1]["status"] == 499


def test_unknown_routes_under_messages_answer_in_anthropic_shape(gateway: RunningGateway) -> None:
    status, _, text = post(gateway.url + "/v1/messages/batches/nope", {})
    body = orjson.loads(text)
    assert status in (404, 405) and body["type"] == "error" and body["error"]["type"] in ("not_found_error", "invalid_request_error")
    req = urllib.request.Request(gateway.url + "/v1/messages", method="GET")
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("GET /v1/messages must fail")
    except urllib.error.HTTPError as e:
        assert e.code == 405 and orjson.loads(e.read())["type"] == "error"


def test_bad_json_and_wrong_types_are_anthropic_400s(gateway: RunningGateway) -> None:
    for body in ({"model": "fake-chat", "max_tokens": "10", "messages": [{"role": "user", "content": "x"}]},
                 {"model": "fake-chat", "max_tokens": 10, "messages": [{"role": "user", "content": 5}]},
                 {"model": "fake-chat", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
                 {"model": "fake-chat", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}):
        status, _, text = post(gateway.url + "/v1/messages", body)
        assert status == 400 and orjson.loads(text)["error"]["type"] == "invalid_request_error", body


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_upstream_reply_is_a_502_not_a_crash(gateway: RunningGateway, fake_openai: FakeOpenAI, stream: bool) -> None:
    if stream:
        fake_openai.next(Behaviour(raw_body=b'data: {"choices": 5}\n\ndata: [DONE]\n\n', headers={"Content-Type": "text/event-stream"}))
        with pytest.raises(anthropic.APIStatusError) as ei, client(gateway).messages.stream(
                model="fake-chat", max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
            list(s)
    else:
        fake_openai.next(Behaviour(raw_body=b'{"choices": [{"message": {"tool_calls": [{"function": 3}]}}]}'))
        with pytest.raises(anthropic.APIStatusError) as ei:
            client(gateway).messages.create(model="fake-chat", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert ei.value.status_code == 502
    assert "cannot read" in str(ei.value)
